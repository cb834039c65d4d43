"""The torch backend of ``model.predictor.Predictor``: a bundle's network, eager, on the CPU or a GPU.

The network runs behind ``NormalizedInput``, so it takes the same uint8 batches as the ONNX export and
the normalisation happens where the network runs. On CUDA the batch is copied through a pinned host
buffer (``non_blocking``), cuDNN picks its kernels once per input shape (``cudnn.benchmark``: the
shape is fixed but for the batch size), convolution nets run channels-last, and half precision
(bf16 or fp16) is used only where it agrees with fp32 on the check photos (``precision="auto"``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.bundle import Bundle, load_bundle, model_from_bundle
from model.normalization import NormalizedInput
from model.predictor import DEVICES, PRECISIONS, Predictor, available_cpus

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Half precision is kept only if, on the check batch, it gives the same top-1 as fp32 for every image
# and no probability moves by more than this.
HALF_PRECISION_TOLERANCE = 1e-3


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
        precision: str = "auto",
        check_batch: np.ndarray | None = None,
        warmup: bool = True,
        warmup_batch_sizes: Sequence[int] = (1,),
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
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
        network = model if model is not None else model_from_bundle(bundle, source=name)
        self.model = NormalizedInput(network, bundle.preprocessing).eval().to(torch_device)
        self.channels_last = torch_device.type == "cuda"
        if self.channels_last:
            torch.backends.cudnn.benchmark = True  # fixed input shape: pick the fastest kernels once
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = torch.float32
        self.precision = "fp32"
        if torch_device.type == "cuda" and precision != "fp32":
            self._choose_precision(precision, check_batch)
        self.warmup_seconds = self.warm_up(warmup_batch_sizes) if warmup else 0.0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> TorchPredictor:
        started = time.perf_counter()
        bundle, model = load_bundle(path)
        kwargs.setdefault("name", Path(path).stem)
        predictor = cls(bundle, model, **kwargs)
        predictor.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s (%s, %d classes) on %s (%s) with %d threads in %.2fs",
            predictor.name,
            predictor.arch,
            len(predictor.class_names),
            predictor.device,
            predictor.precision,
            predictor.num_threads,
            predictor.load_seconds,
        )
        return predictor

    @property
    def device(self) -> str:
        return str(self._device)

    def _choose_precision(self, precision: str, check_batch: np.ndarray | None) -> None:
        """fp16/bf16 as asked, or for "auto" the first of bf16, fp16 that agrees with fp32 on ``check_batch``."""
        if precision != "auto":
            self._set_dtype(precision)
            return
        if check_batch is None:
            rng = np.random.default_rng(0)
            check_batch = rng.integers(0, 256, (8, *self.input_shape), dtype=np.uint8)
        reference = self.infer(check_batch)
        for candidate in ("bf16", "fp16"):
            if candidate == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            self._set_dtype(candidate)
            probs = self.infer(check_batch)
            same_top1 = bool((probs.argmax(1) == reference.argmax(1)).all())
            diff = float(np.abs(probs - reference).max())
            logger.info("%s on %s: top-1 agreement %s, max |dp| %.2e", candidate, self.name, same_top1, diff)
            if same_top1 and diff <= HALF_PRECISION_TOLERANCE:
                return
        self._set_dtype("fp32")

    def _set_dtype(self, precision: str) -> None:
        self.dtype = _DTYPES[precision]
        self.precision = precision
        self.model = self.model.to(self.dtype)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            if self._device.type == "cuda":
                x = x.pin_memory().to(self._device, non_blocking=True)
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
            return out.float().cpu().numpy()
