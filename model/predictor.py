"""Inference on a model: loaded once, warmed up, then ``preprocess -> infer -> postprocess``.

The three steps are separate so a server can decode and preprocess requests on its own threads, batch
the arrays of several requests into one ``infer`` call, and split the result back per request. This
module needs no torch: preprocessing is Pillow and numpy (``model.pixels``) and a batch is a uint8
numpy array, so a worker serving an ONNX export never imports torch. Backends (``TorchPredictor`` in
``model.torch_predictor``, ``OnnxPredictor`` in ``model.onnx_runner``) differ only in how they load
and in ``logits``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from model.cpus import available_cpus
from model.pixels import prepare_batch
from model.preprocessing import Preprocessing

DEVICES = ("auto", "cpu", "cuda")
# the torch backend's number formats on a GPU; auto = half precision where it agrees with fp32
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

__all__ = ["DEVICES", "PRECISIONS", "Predictor", "available_cpus", "softmax", "top_scores"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float32 (stable: the row maximum is subtracted)."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def top_scores(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the ``k`` largest per row, largest first; ties keep the lower index first."""
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(probs, indices, axis=1), indices


class Predictor(abc.ABC):
    """A model with its eval preprocessing and class names: ``preprocess -> infer -> postprocess``.

    Everything but loading and ``logits`` is shared; a backend (torch, ONNX Runtime) sets the fields
    below through ``__init__`` and implements ``logits`` and ``device``.
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
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0

    @abc.abstractmethod
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """A uint8 batch (N, C, crop, crop) -> logits (N, classes) as a float32 numpy array."""

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where ``logits`` runs: 'cpu', 'cuda' or 'cuda:N'."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        p = self.preprocessing
        return (p.channels, p.crop, p.crop)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """A forward pass per batch size, so the first real requests do not pay for lazy initialisation."""
        started = time.perf_counter()
        for size in batch_sizes:
            self.infer(np.zeros((size, *self.input_shape), dtype=np.uint8))
        return time.perf_counter() - started

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded images -> one uint8 batch (N, C, crop, crop): ``model.pixels``, the only definition."""
        return prepare_batch(images, self.preprocessing)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """A uint8 batch -> class probabilities (N, classes), temperature applied, float32 on the CPU."""
        return softmax(self.logits(batch), self.temperature)

    def postprocess(self, probs: np.ndarray, top_k: int = 3) -> list[list[dict[str, Any]]]:
        """Probabilities -> per image, the top_k ``{label, index, score}`` sorted by score."""
        k = max(1, min(int(top_k), len(self.class_names)))
        scores, indices = top_scores(np.asarray(probs), k)
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
