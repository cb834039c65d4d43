"""Which backend and device serve the models on this host: decided once, at start, from what it has.

``BACKEND=auto`` (the default) serves on a GPU when the host has one: ONNX Runtime's CUDA provider
when that build of onnxruntime is installed, else torch on ``cuda``; on a host without CUDA, ONNX
Runtime on the CPU, in lean workers that never import torch. A pure function of the two probes, so
the rule is tested on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "onnx", "torch")


class BackendUnavailable(RuntimeError):
    """The backend or device asked for cannot run on this host; the message says what is missing."""


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # onnx | torch
    device: str  # cpu | cuda
    reason: str


def choose_backend(backend: str, device: str, *, torch_cuda: bool, ort_cuda: bool) -> BackendChoice:
    """``backend`` (auto/onnx/torch) and ``device`` (auto/cpu/cuda) as configured, resolved for a host
    where torch does (``torch_cuda``) or does not see a GPU and onnxruntime has (``ort_cuda``) or lacks
    its CUDA provider."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if device == "cpu":
        chosen = "onnx" if backend == "auto" else backend
        return BackendChoice(chosen, "cpu", "DEVICE=cpu")
    if backend == "onnx":
        if ort_cuda:
            return BackendChoice("onnx", "cuda", "BACKEND=onnx with onnxruntime's CUDA provider")
        if device == "cuda":
            raise BackendUnavailable(
                "device 'cuda' was asked for but this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu, or set FLASK_BACKEND=torch or auto)"
            )
        return BackendChoice("onnx", "cpu", "BACKEND=onnx; onnxruntime has no CUDA provider")
    if backend == "torch":
        if torch_cuda:
            return BackendChoice("torch", "cuda", "BACKEND=torch on the GPU torch sees")
        if device == "cuda":
            raise BackendUnavailable("device 'cuda' was asked for but torch sees no CUDA device")
        return BackendChoice("torch", "cpu", "BACKEND=torch; torch sees no GPU")
    if ort_cuda and (torch_cuda or device == "cuda"):
        return BackendChoice("onnx", "cuda", "a GPU, and onnxruntime has its CUDA provider")
    if torch_cuda:
        return BackendChoice("torch", "cuda", "a GPU, and this onnxruntime has no CUDA provider: torch on cuda")
    if device == "cuda":
        raise BackendUnavailable("device 'cuda' was asked for but this host shows no CUDA device")
    return BackendChoice("onnx", "cpu", "no GPU: ONNX Runtime on the CPU")
