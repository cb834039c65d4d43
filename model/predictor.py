"""Inference on a bundle: loaded once, warmed up, then ``preprocess -> infer -> postprocess``.

The three steps are separate so a server can decode and preprocess requests on its own threads, batch
the tensors of several requests into one ``infer`` call, and split the result back per request.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.bundle import Bundle, load_bundle, model_from_bundle
from model.preprocessing import Preprocessing
from model.transforms import build_eval_transform

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def available_cpus() -> int:
    """CPUs this process may run on (container/affinity aware), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def configure_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (process-wide); default: the CPUs this process may use."""
    n = num_threads if num_threads and num_threads > 0 else available_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class Predictor(abc.ABC):
    """A model with its eval transform and class names: ``preprocess -> infer -> postprocess``.

    Everything but loading and ``infer`` is shared; a backend (torch, ONNX Runtime) sets the fields
    below through ``__init__`` and implements ``infer`` and ``device``.
    """

    backend = "unknown"

    def __init__(
        self,
        *,
        name: str,
        arch: str,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        temperature: float,
        training: dict[str, Any],
        num_threads: int,
    ) -> None:
        self.name = name
        self.arch = arch
        self.class_names: list[str] = list(class_names)
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.training = training
        self.num_threads = num_threads
        self.transform = build_eval_transform(preprocessing)
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0

    @abc.abstractmethod
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch (N, C, H, W) -> class probabilities (N, classes) on the CPU, temperature applied."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where ``infer`` runs."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        p = self.preprocessing
        return (p.channels, p.crop, p.crop)

    def warm_up(self) -> float:
        """One forward pass so the first real request does not pay for lazy initialisation."""
        started = time.perf_counter()
        self.infer(torch.zeros((1, *self.input_shape)))
        return time.perf_counter() - started

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> one float batch (N, C, H, W) on the CPU."""
        if not images:
            raise ValueError("no images")
        return torch.stack([self.transform(img) for img in images])

    def postprocess(self, probs: torch.Tensor, top_k: int = 3) -> list[list[dict[str, Any]]]:
        """Probabilities -> per image, the top_k ``{label, index, score}`` sorted by score."""
        k = max(1, min(int(top_k), len(self.class_names)))
        scores, indices = probs.topk(k, dim=1)
        return [
            [
                {"label": self.class_names[i], "index": i, "score": round(float(s), 6)}
                for s, i in zip(row_scores.tolist(), row_indices.tolist(), strict=True)
            ]
            for row_scores, row_indices in zip(scores, indices, strict=True)
        ]

    def predict(self, images: Sequence[Image.Image], top_k: int = 3) -> list[list[dict[str, Any]]]:
        return self.postprocess(self.infer(self.preprocess(images)), top_k)

    def describe(self) -> dict[str, Any]:
        """What a client may know about the model (no weights)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "num_classes": len(self.class_names),
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "temperature": self.temperature,
            "metrics": self.training.get("metrics", {}),
            "created": self.training.get("date"),
            "backend": self.backend,
        }


class TorchPredictor(Predictor):
    """A bundle's model run by torch (eager), on the CPU or a CUDA device."""

    backend = "torch"

    def __init__(
        self,
        bundle: Bundle,
        model: torch.nn.Module | None = None,
        *,
        name: str = "model",
        device: str = "auto",
        num_threads: int | None = None,
        warmup: bool = True,
    ) -> None:
        torch_device = resolve_device(device)
        threads = configure_threads(num_threads) if torch_device.type == "cpu" else torch.get_num_threads()
        super().__init__(
            name=name,
            arch=bundle.arch,
            class_names=bundle.class_names,
            preprocessing=bundle.preprocessing,
            temperature=bundle.temperature,
            training=bundle.training,
            num_threads=threads,
        )
        self.bundle = bundle
        self._device = torch_device
        model = model if model is not None else model_from_bundle(bundle, source=name)
        self.model = model.eval().to(torch_device)
        self.warmup_seconds = self.warm_up() if warmup else 0.0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> TorchPredictor:
        started = time.perf_counter()
        bundle, model = load_bundle(path)
        kwargs.setdefault("name", Path(path).stem)
        predictor = cls(bundle, model, **kwargs)
        predictor.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s (%s, %d classes) on %s with %d threads in %.2fs",
            predictor.name,
            predictor.arch,
            len(predictor.class_names),
            predictor.device,
            predictor.num_threads,
            predictor.load_seconds,
        )
        return predictor

    @property
    def device(self) -> torch.device:
        return self._device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(batch.to(self._device, non_blocking=True))
            return torch.softmax(logits.float() / self.temperature, dim=1).cpu()
