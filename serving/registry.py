"""The models one worker serves: the manifest's files, loaded once, warmed up, batched.

The manifest (``serving.manifest``) is written once per start by ``serving.prepare`` (gunicorn's master
runs it before forking; an app made outside gunicorn prepares its own), so a worker on the ONNX
backend loads checked ``.onnx`` files and never imports torch; the torch backend loads the bundles
(``model.torch_predictor``, imported only then). Model names are the bundles' file stems; a
request's ``model`` is looked up in that set and is never used to build a path. A model that cannot be
loaded stops the worker with a message naming the file: a worker serves every model or none.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from model.onnx_runner import OnnxPredictor
from model.predictor import Predictor
from serving.batching import Batcher
from serving.manifest import MANIFEST_ENV, Manifest, ModelLoadError, ServedFile, read_manifest

logger = logging.getLogger(__name__)

# The automatic BATCH_MAX_SIZE (0) per device: on a CPU a batch of 8 already runs the model at its best
# rate; a GPU keeps gaining up to a few dozen images per pass (docs/performance.md).
AUTO_BATCH_MAX_SIZE = {"cpu": 8, "cuda": 32}

__all__ = ["ModelLoadError", "ModelRegistry", "ServedModel", "current_manifest"]


class ServedModel:
    """A predictor and the batcher in front of its ``infer``."""

    def __init__(self, predictor: Predictor, batcher: Batcher, load_seconds: float) -> None:
        self.predictor = predictor
        self.batcher = batcher
        self.load_seconds = load_seconds

    @property
    def name(self) -> str:
        return self.predictor.name

    def describe(self) -> dict[str, Any]:
        info = self.predictor.describe()
        info["device"] = str(self.predictor.device)
        info["precision"] = getattr(self.predictor, "precision", "fp32")
        info["batch_max_size"] = self.batcher.max_size
        info["load_seconds"] = round(self.load_seconds, 3)
        return info


def current_manifest(config: Mapping[str, Any]) -> Manifest:
    """The manifest the master prepared (``IMGCLF_MANIFEST``), or one prepared here, in this process.

    Preparing needs torch (it may export), so ``serving.prepare`` is imported only on that path: a
    gunicorn worker, which gets the master's manifest, never loads it.
    """
    path = os.environ.get(MANIFEST_ENV)
    if path:
        return read_manifest(path)
    prepare = importlib.import_module("serving.prepare")
    return prepare.prepare_models(config)


class ModelRegistry:
    def __init__(self, models: dict[str, ServedModel], default: str, manifest: Manifest) -> None:
        self.models = models
        self.default = default
        self.manifest = manifest
        self.draining = False

    @classmethod
    def load(
        cls,
        manifest: Manifest,
        *,
        num_threads: int | None,
        precision: str = "auto",
        batch_max_size: int = 0,
        batch_max_delay_ms: float,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> ModelRegistry:
        max_size = batch_max_size or AUTO_BATCH_MAX_SIZE.get(manifest.device, 8)
        models: dict[str, ServedModel] = {}
        for entry in manifest.models:
            started = time.perf_counter()
            try:
                predictor = load_served_file(entry, manifest, num_threads, precision, max_size)
            except ModelLoadError:
                raise
            except (RuntimeError, ValueError, OSError) as exc:
                raise ModelLoadError(f"cannot serve the bundle {entry.bundle}: {exc}") from exc
            seconds = time.perf_counter() - started

            def report(size: int, secs: float, name: str = predictor.name) -> None:
                if on_batch is not None:
                    on_batch(name, size, secs)

            batcher = Batcher(
                predictor.infer,
                max_size=max_size,
                max_delay_ms=batch_max_delay_ms,
                name=predictor.name,
                on_batch=report,
            )
            batcher.start()
            models[predictor.name] = ServedModel(predictor, batcher, seconds)
            logger.info("serving %s from %s (load + warm-up %.2fs)", predictor.name, entry.path, seconds)
        return cls(models, manifest.default, manifest)

    @property
    def ready(self) -> bool:
        """Readiness: the load balancer may send requests here."""
        return not self.draining and self.serving

    @property
    def serving(self) -> bool:
        """Requests can still be answered: every batcher runs (also while draining, until ``close``)."""
        return all(m.batcher.alive for m in self.models.values())

    def get(self, name: str | None) -> ServedModel | None:
        return self.models.get(name or self.default)

    def names(self) -> list[str]:
        return list(self.models)

    def start_draining(self) -> None:
        """Readiness turns false so the load balancer stops sending; requests that already arrived (in
        flight, or still on their way to a request thread) are answered as usual.

        Only sets a flag: it is called from the worker's SIGTERM handler.
        """
        self.draining = True

    def close(self) -> None:
        """Stop taking requests (readiness turns false); queued ones are still answered."""
        self.draining = True
        for served in self.models.values():
            served.batcher.close()


def load_served_file(
    entry: ServedFile, manifest: Manifest, num_threads: int | None, precision: str, max_batch: int
) -> Predictor:
    """One model of the manifest, loaded and warm; its file must still be the one that was checked."""
    data = Path(entry.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ModelLoadError(
            f"{entry.path} changed after the service checked it at start (retrained or exported again while "
            f"it ran?): restart the service (or send gunicorn's master SIGHUP) to serve the new file"
        )
    if manifest.backend == "onnx":
        # ONNX Runtime's pool does not spin when idle: the worker's request threads decode on the same cores
        return OnnxPredictor(
            entry.path,
            model=data,
            name=entry.name,
            device=manifest.device,
            num_threads=num_threads,
            spinning=False,
            training=dict(entry.training),
        )
    del data  # the torch backend reads the bundle itself
    torch_predictor = importlib.import_module("model.torch_predictor")
    sizes = range(1, max_batch + 1) if manifest.device == "cuda" else (1,)
    return torch_predictor.TorchPredictor.from_file(
        entry.path,
        name=entry.name,
        device=manifest.device,
        num_threads=num_threads or None,
        precision=precision,
        warmup_batch_sizes=sizes,
    )
