"""POST /explain: the top-k answer of /predict plus a Grad-CAM heat map over the photo, from the torch model.

Explanations need gradients, so they run on the bundle's torch network (``model.explain``) whatever
backend serves /predict. A worker on the ONNX backend must not import torch at start (it stays lean:
tests/test_pixels.py), so each model's explainer is built on the first /explain that names it, once per
worker, under a lock, from the bundle the manifest names; the bundle's hash must still be the one the
start-up step checked. ``EXPLAIN`` (``FLASK_EXPLAIN=off``) turns the route off: it then answers 404
``explanations_off`` and the page shows no "Why?" button.

The request is /predict's (a multipart ``file`` or an image body, ``model``, ``top_k``), for one image,
with the same limits and errors; it counts against the same admission limit. The answer is JSON with
the overlay as base64 PNG (``overlay_png``), or the PNG itself for ``Accept: image/png``.
"""

from __future__ import annotations

import base64
import importlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from model.files import file_sha256
from model.predictor import softmax
from serving.admission import admitted
from serving.api import (
    check_api_key,
    open_uploads,
    parse_top_k,
    pick_model,
    prepared_or_error,
    read_uploads,
    request_param,
)
from serving.errors import ApiError
from serving.manifest import Manifest, ServedFile

logger = logging.getLogger(__name__)

EXTENSION = "imgclf.explainers"
METHOD = "grad-cam"
PNG = "image/png"

bp = Blueprint("explain", __name__)


class Explainers:
    """Each model's Grad-CAM, built on first use (torch is imported then, not before) and kept.

    One lock guards the building: a second /explain waits for the first one's load instead of loading
    the same model again. A model that cannot be explained (a transformer) is remembered as such.

    Building and explaining run on one thread of their own (``run``): glibc gives each thread that
    allocates its own heap arena, and this worker's allocator keeps freed memory (serving/allocator.py),
    so gradients computed on whichever request thread took the request would leave one explanation's
    worth of memory behind in each of up to 8 arenas per CPU. On one thread, one is kept, however many
    explanations come.
    """

    def __init__(self, manifest: Manifest, *, enabled: bool, num_threads: int | None) -> None:
        self.enabled = enabled
        self.num_threads = num_threads
        self._files = {entry.name: entry for entry in manifest.models}
        self._device = manifest.device
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explain")  # started on first use
        self._built: dict[str, Any] = {}  # name -> GradCam, or the ApiError it answers with
        self.load_seconds: dict[str, float] = {}

    def get(self, name: str) -> Any:
        """The model's ``model.explain.GradCam``; ApiError when it cannot have one."""
        with self._lock:
            if name not in self._built:
                self._built[name] = self.run(self._build, self._files[name])
            built = self._built[name]
        if isinstance(built, ApiError):
            raise ApiError(built.code, built.message)  # a fresh one: requests on other threads raise it too
        return built

    def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the explainers' own thread (see the class's docstring); its exception is raised here."""
        return self._thread.submit(fn, *args).result()

    def _build(self, entry: ServedFile) -> Any:
        started = time.perf_counter()
        if file_sha256(entry.bundle) != entry.bundle_sha256:
            # not remembered: the answer is right until the service restarts with the new file
            raise ApiError(
                "not_ready",
                f"the bundle of {entry.name!r} changed after the service checked it at start; restart the "
                "service to explain (and serve) the new file",
            )
        torch_predictor = importlib.import_module("model.torch_predictor")  # torch, from here on
        explain = importlib.import_module("model.explain")
        bundle = importlib.import_module("model.bundle").read_bundle(entry.bundle)
        if self._device == "cpu":
            torch_predictor.configure_threads(self.num_threads)
        try:
            cam = explain.GradCam.from_bundle(bundle, device=self._device, source=entry.name)
        except explain.ExplanationUnsupported as exc:
            logger.info("%s cannot be explained: %s", entry.name, exc)
            message = f"model {entry.name!r} ({bundle.arch}) cannot be explained: {exc}"
            return ApiError("explanation_unsupported", message)
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory: not remembered, tried again
            logger.exception("cannot build the explainer for %s", entry.name)
            raise ApiError("not_ready", f"explanations of {entry.name!r} cannot be loaded now: {exc}") from None
        self.load_seconds[entry.name] = time.perf_counter() - started
        logger.info("explainer for %s: Grad-CAM on %s (%.2fs)", entry.name, cam.layer, self.load_seconds[entry.name])
        return cam


def install(app: Flask) -> None:
    """The explainers (nothing loaded yet) and the route."""
    models = app.extensions["imgclf.models"]
    app.extensions[EXTENSION] = Explainers(
        models.manifest, enabled=app.config["EXPLAIN"], num_threads=app.config["TORCH_THREADS"] or None
    )
    app.register_blueprint(bp)


def explainers() -> Explainers:
    return current_app.extensions[EXTENSION]


@bp.post("/explain")
@admitted
def explain() -> Response:
    started = time.perf_counter()
    found = explainers()
    if not found.enabled:
        raise ApiError("explanations_off", "explanations are turned off on this server (FLASK_EXPLAIN=off)")
    check_api_key()
    uploads = read_uploads()
    if len(uploads) != 1:
        raise ApiError("too_many_files", f"{len(uploads)} files sent; /explain takes one image per request")
    served = pick_model(request_param("model"))
    top_k = parse_top_k(request_param("top_k"))
    cfg = current_app.config
    [opened] = open_uploads(uploads, cfg["MAX_IMAGE_PIXELS"], cfg["MAX_REQUEST_PIXELS"])
    pixels = prepared_or_error(opened, served.predictor)
    if isinstance(pixels, ApiError):
        raise pixels
    cam = found.get(served.name)
    computed = time.perf_counter()
    [explanation] = found.run(cam.explain, pixels)
    current_app.extensions["imgclf.metrics"].observe_explanation(served.name, time.perf_counter() - computed)
    drawing = importlib.import_module("model.explain")  # loaded with the explainer
    png = drawing.png_bytes(drawing.overlay(pixels[0], explanation.heatmap))
    label = served.predictor.class_names[explanation.target]
    if request.accept_mimetypes.best_match(["application/json", PNG]) == PNG:
        return Response(png, mimetype=PNG, headers={"X-Explained-Index": str(explanation.target)})
    probs = softmax(explanation.logits[None], served.predictor.temperature)
    return jsonify(
        model=served.name,
        predictions=served.predictor.postprocess(probs, top_k)[0],
        explained={"label": label, "index": explanation.target},
        method=METHOD,
        layer=cam.layer,
        overlay_png=base64.b64encode(png).decode("ascii"),
        time_ms=round((time.perf_counter() - started) * 1000, 1),
    )
