"""The models one worker serves: every ``*.pth`` in the model folder, loaded once, warmed up, batched.

Model names are the file stems found at start; a request's ``model`` is looked up in that set and is
never used to build a path. A bundle that cannot be loaded stops the start with a message naming the
file: a worker either serves every model it was given or none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.bundle import BundleError
from model.default import ensure_default_model
from model.files import file_lock
from model.predictor import Predictor, TorchPredictor, configure_threads
from serving.batching import Batcher
from serving.exports import onnx_predictor_for_bundle

logger = logging.getLogger(__name__)

BUILT_IN_DEFAULT = "default"


class ModelLoadError(RuntimeError):
    """The service cannot start with this model folder."""


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
        info["load_seconds"] = round(self.load_seconds, 3)
        return info


class ModelRegistry:
    def __init__(self, models: dict[str, ServedModel], default: str) -> None:
        self.models = models
        self.default = default
        self.draining = False

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        default: str,
        device: str,
        num_threads: int | None,
        backend: str = "torch",
        onnx_dir: str | None = None,
        batch_max_size: int,
        batch_max_delay_ms: float,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> ModelRegistry:
        folder = Path(model_dir)
        if default == BUILT_IN_DEFAULT and not (folder / f"{default}.pth").exists():
            try:  # several workers may start at once: one builds, the others wait
                with file_lock(folder / ".build.lock"):
                    ensure_default_model(folder / f"{default}.pth")
            except OSError as exc:  # e.g. a read-only mounted folder of the user's own bundles
                raise ModelLoadError(
                    f"{folder.resolve()} has no {default}.pth and it cannot be built there ({exc}); "
                    f"set FLASK_DEFAULT_MODEL to one of your bundles' names"
                ) from None
        paths = sorted(folder.glob("*.pth")) if folder.is_dir() else []
        if not paths:
            raise ModelLoadError(f"no model bundles (*.pth) in {folder.resolve()}")
        stems = [p.stem for p in paths]
        if default not in stems:
            raise ModelLoadError(f"default model {default!r} is not in {folder.resolve()} (found: {', '.join(stems)})")
        models: dict[str, ServedModel] = {}
        for path in paths:
            started = time.perf_counter()
            try:
                predictor = load_predictor(path, backend, device=device, num_threads=num_threads, onnx_dir=onnx_dir)
            except BundleError as exc:  # its message names the file
                raise ModelLoadError(f"cannot serve the bundle {exc}") from exc
            except (RuntimeError, ValueError, OSError) as exc:
                raise ModelLoadError(f"cannot serve the bundle {path}: {exc}") from exc
            seconds = time.perf_counter() - started

            def report(size: int, secs: float, name: str = predictor.name) -> None:
                if on_batch is not None:
                    on_batch(name, size, secs)

            batcher = Batcher(
                predictor.infer,
                max_size=batch_max_size,
                max_delay_ms=batch_max_delay_ms,
                name=predictor.name,
                on_batch=report,
            )
            batcher.start()
            models[predictor.name] = ServedModel(predictor, batcher, seconds)
            logger.info("serving %s from %s (load + warm-up %.2fs)", predictor.name, path, seconds)
        return cls(models, default)

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


def load_predictor(
    path: Path, backend: str, *, device: str, num_threads: int | None, onnx_dir: str | None
) -> Predictor:
    """One bundle, loaded and warm, on the chosen backend."""
    if backend == "torch":
        return TorchPredictor.from_file(path, device=device, num_threads=num_threads or None)
    if backend != "onnx":
        raise ValueError(f"unknown backend {backend!r}")
    # torch only preprocesses single images here: its own thread pool would just compete with ONNX
    # Runtime's for the same cores. ONNX Runtime's pool does not spin when idle, for the same reason.
    configure_threads(1)
    return onnx_predictor_for_bundle(path, onnx_dir=onnx_dir, device=device, num_threads=num_threads, spinning=False)
