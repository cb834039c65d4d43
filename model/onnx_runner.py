"""Serving an exported ``.onnx`` with ONNX Runtime: the ``model.predictor.Predictor`` for that backend.

Same steps and contract: ``preprocess(images) -> uint8 batch``, ``infer(batch) -> probs`` (softmax of
the logits divided by the temperature), ``postprocess(probs)``. The class names, preprocessing and
temperature come from the file's metadata (written by ``model.export``), so the file needs no bundle
beside it, and nothing here imports torch: a serving worker on this backend is Pillow, numpy and
ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model.export_metadata import ExportMetadata, parse_metadata
from model.predictor import DEVICES, Predictor, available_cpus

logger = logging.getLogger(__name__)


def session_options(num_threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """CPU-tuned options: all graph optimisations, ``num_threads`` intra-op threads, sequential graph.

    ``spinning=False`` stops idle pool threads from busy-waiting, which matters when the process also
    decodes images on other threads; ONNX Runtime's default is to spin.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = num_threads if num_threads and num_threads > 0 else available_cpus()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return opts


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """An ONNX file's metadata properties (raw strings), read by ONNX Runtime without optimising the graph.

    The one reader of an export's metadata: ``parse_metadata`` turns the result into typed values.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def providers_for(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device``: CUDA first when asked for (or auto) and present."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise RuntimeError("device 'cuda' was asked for but this onnxruntime has no CUDAExecutionProvider")
    if device in ("auto", "cuda") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxPredictor(Predictor):
    """An exported model under ONNX Runtime, with its preprocessing and class names from its metadata.

    ``model`` is the file's path, or its bytes when the caller has read (and checked) them already.
    """

    backend = "onnx"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model: bytes | None = None,
        name: str | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        spinning: bool = True,
        warmup: bool = True,
        training: dict[str, Any] | None = None,
    ) -> None:
        started = time.perf_counter()
        self.path = Path(path)
        opts = session_options(num_threads, spinning=spinning)
        source = model if model is not None else str(self.path)
        providers = providers_for(device)
        if providers[0] == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # the CUDA and cuDNN libraries of the pip wheels, which no torch import loaded
        self.session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        self.providers: list[str] = self.session.get_providers()
        if device == "cuda" and self.providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(
                f"device 'cuda' was asked for but ONNX Runtime could not start its CUDA provider for {self.path} "
                "(CUDA or cuDNN libraries missing?); it would have run on the CPU"
            )
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info: ExportMetadata = parse_metadata(self.metadata, source=str(self.path))
        super().__init__(
            name=name or self.path.stem,
            arch=self.info.arch,
            class_names=self.info.class_names,
            preprocessing=self.info.preprocessing,
            temperature=self.info.temperature,
            training=training or {},
            num_threads=opts.intra_op_num_threads,
        )
        self.input_name = self.session.get_inputs()[0].name
        self.load_seconds = time.perf_counter() - started
        self.warmup_seconds = self.warm_up() if warmup else 0.0
        logger.info(
            "loaded %s (%s, %d classes) with ONNX Runtime %s on %s, %d threads, in %.2fs",
            self.name,
            self.arch,
            len(self.class_names),
            ort.__version__,
            self.providers[0],
            self.num_threads,
            self.load_seconds,
        )

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.uint8)
        return self.session.run(None, {self.input_name: x})[0]

    def describe(self) -> dict[str, Any]:
        """What a client may know about the model (no weights): Predictor's fields, plus the providers."""
        return {**super().describe(), "providers": self.providers}
