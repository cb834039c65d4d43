"""The service on a GPU: torch on ``cuda`` in the precision ``auto`` chose, against the CPU export.

Marked ``cuda``: skipped here (no GPU on this machine), run by ``python -m bench.gpu_check`` on a CUDA
machine. The backend choice itself is tested on any machine in tests/test_backend_choice.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from app import create_app
from model.images import decode_image
from model.onnx_runner import OnnxPredictor
from model.torch_predictor import HALF_PRECISION_TOLERANCE, TorchPredictor
from tests.support.photos import CAT_LABELS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)"),
]


def test_torch_on_cuda_agrees_with_the_cpu_export(default_bundle, photos) -> None:
    gpu = TorchPredictor.from_file(default_bundle, device="cuda", precision="auto", warmup_batch_sizes=(1, 5))
    cpu = OnnxPredictor(default_bundle.with_suffix(".onnx"), device="cpu", warmup=False)
    images = [decode_image(p.read_bytes(), draft_size=256) for p in photos.values()]
    batch = cpu.preprocess(images)
    on_gpu, on_cpu = gpu.infer(batch), cpu.infer(batch)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).all()
    assert np.abs(on_gpu - on_cpu).max() <= (HALF_PRECISION_TOLERANCE if gpu.precision != "fp32" else 1e-4)
    assert gpu.device.startswith("cuda") and gpu.precision in ("fp32", "bf16", "fp16")


def test_fp32_is_kept_when_asked_for(default_bundle) -> None:
    gpu = TorchPredictor.from_file(default_bundle, device="cuda", precision="fp32")
    assert gpu.precision == "fp32" and next(gpu.model.parameters()).dtype == torch.float32


def test_the_app_serves_on_the_gpu_by_default(default_bundle, photos, tmp_path) -> None:
    for suffix in (".pth", ".onnx"):
        shutil.copy(default_bundle.with_suffix(suffix), tmp_path / f"default{suffix}")
    client = create_app({"MODEL_DIR": str(tmp_path)}).test_client()
    ready = client.get("/readyz").get_json()
    assert (ready["backend"], ready["device"]) in (("torch", "cuda"), ("onnx", "cuda"))
    model = client.get("/models").get_json()["models"][0]
    assert model["device"].startswith("cuda") and model["batch_max_size"] == 32
    with open(photos["chelsea"], "rb") as f:
        answer = client.post("/predict", data={"file": (f, "chelsea.png")}).get_json()
    assert answer["predictions"][0]["label"] in CAT_LABELS
