"""The HTTP API: predict, health, readiness, models, metrics and the OpenAPI document."""

from __future__ import annotations

import hmac
import logging
import os
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from model import version as release
from model.images import ImageDecodeError, load_image, open_image
from model.predictor import Predictor
from serving.admission import admitted
from serving.batching import BatcherClosed
from serving.errors import ApiError
from serving.openapi import build_openapi
from serving.registry import ModelRegistry, ServedModel

logger = logging.getLogger(__name__)

bp = Blueprint("api", __name__)

RAW_BODY_TYPES = ("application/octet-stream",)
MAX_FILENAME = 255


def registry() -> ModelRegistry:
    return current_app.extensions["imgclf.models"]


@bp.get("/healthz")
def healthz() -> Response:
    """Alive: the worker answers. Says nothing about the models (that is /readyz)."""
    return jsonify(status="ok")


@bp.get("/version")
def version() -> Response:
    """Which build answers: the project's version, and the source revision when the image was given one."""
    return jsonify(version=release.__version__, revision=os.environ.get("IMGCLF_REVISION") or None)


@bp.get("/readyz")
def readyz() -> Response:
    reg = registry()
    if not reg.ready:
        raise ApiError("not_ready", "the models are not loaded and warm, or the worker is shutting down")
    m = reg.manifest
    return jsonify(status="ready", models=reg.names(), default_model=reg.default, backend=m.backend, device=m.device)


@bp.get("/models")
def models() -> Response:
    reg = registry()
    return jsonify(
        version=release.__version__,
        default_model=reg.default,
        serving={"backend": reg.manifest.backend, "device": reg.manifest.device, "reason": reg.manifest.reason},
        models=[m.describe() for m in reg.models.values()],
    )


@bp.get("/metrics")
def metrics() -> Response:
    m = current_app.extensions["imgclf.metrics"]
    return Response(m.exposition(), headers={"Content-Type": m.content_type})


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(build_openapi(current_app.config, registry().names()))


@bp.post("/predict")
@admitted
def predict() -> Response:
    started = time.perf_counter()
    check_api_key()
    uploads = read_uploads()
    served = pick_model(request_param("model"))
    top_k = parse_top_k(request_param("top_k"))
    outcomes = classify(served, uploads, top_k)
    time_ms = round((time.perf_counter() - started) * 1000, 1)
    if len(uploads) == 1:
        if isinstance(outcomes[0], ApiError):
            raise outcomes[0]
        return jsonify(model=served.name, predictions=outcomes[0], time_ms=time_ms)
    results = []
    for (filename, _), outcome in zip(uploads, outcomes, strict=True):
        entry: dict[str, Any] = {"filename": filename}
        if isinstance(outcome, ApiError):
            entry["error"] = outcome.body()["error"]
            entry["status"] = outcome.status
        else:
            entry["predictions"] = outcome
        results.append(entry)
    return jsonify(model=served.name, results=results, time_ms=time_ms)


def check_api_key() -> None:
    key = current_app.config["API_KEY"]
    if not key:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="imgclf"'}
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError("unauthorized", "this server needs an API key: Authorization: Bearer <key>", challenge)
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError("unauthorized", "the API key is not valid", challenge)


def read_uploads() -> list[tuple[str, bytes]]:
    """(filename, bytes) of each image: multipart `file` fields, or the raw body of an image/* request."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = request.files.getlist("file")
        if not files:
            others = sorted(request.files)
            hint = f" (got file fields: {', '.join(others)})" if others else ""
            raise ApiError("no_file", f"send the image in a multipart field named 'file'{hint}")
        limit = current_app.config["MAX_FILES"]
        if len(files) > limit:
            raise ApiError("too_many_files", f"{len(files)} files sent; at most {limit} per request")
        return [((f.filename or "")[:MAX_FILENAME], f.read()) for f in files]
    if mimetype.startswith("image/") or mimetype in RAW_BODY_TYPES:
        data = request.get_data(cache=False)
        if request.content_length is not None and len(data) < request.content_length:
            # the client went away (or was cut off as too slow) before sending all it announced
            raise ApiError("incomplete_body", f"got {len(data):,} of the {request.content_length:,} bytes announced")
        # A streamed (chunked) body is cut at MAX_CONTENT_LENGTH by Werkzeug without an error when it is
        # read in one go: a body that reached the limit is treated as over it.
        if request.content_length is None and len(data) >= current_app.config["MAX_CONTENT_LENGTH"]:
            raise RequestEntityTooLarge()
        return [("", data)]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise ApiError("no_file", "no image sent: use a multipart field 'file' or an image/* body")
    raise ApiError(
        "unsupported_media_type",
        f"Content-Type {mimetype or '(none)'} is not accepted: send multipart/form-data with a field "
        "'file', or the image bytes with Content-Type image/*",
    )


def request_param(name: str) -> str | None:
    value = request.args.get(name)
    if value is None and request.mimetype == "multipart/form-data":
        value = request.form.get(name)
    return value


def pick_model(name: str | None) -> ServedModel:
    reg = registry()
    if not reg.serving:  # not ``ready``: a worker that drains still answers the requests it has
        raise ApiError("not_ready", "the service is not ready (loading or shutting down); retry shortly")
    served = reg.get(name)
    if served is None:
        raise ApiError("model_not_found", f"no model named {name!r}; see GET /models ({', '.join(reg.names())})")
    return served


def parse_top_k(raw: str | None) -> int:
    cfg = current_app.config
    if raw is None or raw == "":
        return cfg["TOP_K_DEFAULT"]
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if not 1 <= k <= cfg["TOP_K_MAX"]:
        raise ApiError("bad_top_k", f"top_k must be an integer from 1 to {cfg['TOP_K_MAX']}, not {raw!r}")
    return k


def classify(
    served: ServedModel, uploads: list[tuple[str, bytes]], top_k: int
) -> list[list[dict[str, Any]] | ApiError]:
    """Decode and preprocess here, on the request thread; only the forward pass goes to the batcher.

    Every file's header is read first, so the request's pixel budget is spent before any pixel is
    decoded; then the files are decoded one at a time, each freed once it is a uint8 array.
    """
    predictor = served.predictor
    cfg = current_app.config
    opened = open_uploads(uploads, cfg["MAX_IMAGE_PIXELS"], cfg["MAX_REQUEST_PIXELS"])
    outcomes: list[list[dict[str, Any]] | ApiError] = []
    arrays: list[np.ndarray] = []
    for i, item in enumerate(opened):
        opened[i] = None  # the decoded image lives only as long as this iteration
        outcome = prepared_or_error(item, predictor)
        if isinstance(outcome, ApiError):
            outcomes.append(outcome)
        else:
            arrays.append(outcome)
            outcomes.append([])
    if arrays:
        try:
            probs = served.batcher.submit(np.concatenate(arrays))
        except BatcherClosed as exc:
            raise ApiError("not_ready", str(exc)) from None
        except FutureTimeout:
            raise ApiError("busy", "inference took too long; retry later") from None
        predictions = iter(predictor.postprocess(probs, top_k))
        outcomes = [o if isinstance(o, ApiError) else next(predictions) for o in outcomes]
    return outcomes


def open_uploads(
    uploads: list[tuple[str, bytes]], max_pixels: int, max_request_pixels: int
) -> list[Image.Image | ApiError | None]:
    """Each upload's header, checked (format, size, JPEG scans), and the request's pixel budget: a file
    whose pixels would take the request past ``max_request_pixels`` gets its own 413 and is never
    decoded. Files are counted in the order sent."""
    opened: list[Image.Image | ApiError | None] = []
    used = 0
    for _, data in uploads:
        try:
            img = open_image(data, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            opened.append(ApiError.from_image_error(exc))
            continue
        pixels = img.width * img.height
        if used + pixels > max_request_pixels:
            img.close()
            opened.append(
                ApiError(
                    "too_many_total_pixels",
                    f"this image's {pixels:,} pixels and the {used:,} of the files before it exceed the "
                    f"{max_request_pixels:,} pixels one request may hold; send it in another request",
                )
            )
            continue
        used += pixels
        opened.append(img)
    return opened


def prepared_or_error(item: Image.Image | ApiError, predictor: Predictor) -> np.ndarray | ApiError:
    """One opened upload (``open_uploads``) -> its model input (1, C, crop, crop), or the error to answer
    for it; the image is closed either way."""
    if isinstance(item, ApiError):
        return item
    try:
        return _prepared(item, predictor)
    except ImageDecodeError as exc:
        return ApiError.from_image_error(exc)
    except (ValueError, OSError) as exc:  # a mode Pillow cannot convert (e.g. some LAB TIFFs)
        logger.info("cannot convert an image for %s: %s", predictor.name, exc)
        return ApiError("unconvertible_image", f"the image cannot be converted: {exc}")
    finally:
        item.close()


def _prepared(img: Image.Image, predictor: Predictor) -> np.ndarray:
    """One opened image -> its model input; the full-size decoded image is freed on return."""
    return predictor.preprocess([load_image(img, draft_size=predictor.preprocessing.resize)])
