"""Training on a real CUDA GPU: one short run with --amp auto, float16 with its GradScaler, pinned batches,
and torchrun with NCCL. Marked ``cuda``: skipped where torch sees no GPU (the reason is in the report);
``python -m pytest -m cuda tests/`` runs only these on a GPU machine. The data are crops of the installed
sample photos (training.photo_folder), so no Debian package is needed there.

The same decisions are tested on CPU, with only the hardware probes mocked, in tests/test_devices.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.bundle import load_bundle, read_bundle
from tests.support import ROOT
from training import recipes, train
from training.builders import build_loaders
from training.checkpoint import read_resume
from training.config import TrainConfig, splits_for
from training.distributed import Session

pytestmark = pytest.mark.cuda


def run_train(*argv: str) -> dict:
    return train.main(recipes.parse_args(train.get_args_parser(), list(argv)))


def native_bf16_gpu() -> bool:
    """Ampere (compute capability 8.0) or later: read from the device itself, not through training.precision."""
    return torch.cuda.get_device_capability() >= (8, 0)


def conv_output_dtypes(monkeypatch: pytest.MonkeyPatch) -> set[torch.dtype]:
    """The dtypes the network's convolutions produce while training (a spy, not a mock: the real forward runs)."""
    seen: set[torch.dtype] = set()
    forward = torch.nn.Conv2d.forward

    def spy(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        if torch.is_grad_enabled():
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    return seen


def test_short_amp_auto_training_run_on_cuda(photo_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """The default --amp auto on the GPU: bfloat16 where native (no scaler), else float16 with a GradScaler;
    channels-last; the run learns, and its bundle is float32 and loads on the CPU."""
    dtypes = conv_output_dtypes(monkeypatch)
    out = tmp_path / "run"
    result = run_train("--data", str(photo_folder), "--out", str(out), "--epochs", "3", "--batch-size", "16",
                       "--quiet", "--workers", "2", "--seed", "1")  # fmt: skip
    expected = torch.bfloat16 if native_bf16_gpu() else torch.float16
    saved = json.loads((out / "args.json").read_text())
    assert (saved["device"], saved["amp"], saved["amp_dtype"]) == ("cuda", "auto", str(expected).split(".")[1])
    assert saved["channels_last"] is True and saved["workers"] == 2
    assert dtypes == {expected}
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["train_acc"] > 0.5
    scaler_state = read_resume(out / "last.pth")["resume"]["scaler"]
    assert bool(scaler_state) == (expected == torch.float16)
    weights = read_bundle(out / "best.pth").state_dict
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    _, model = load_bundle(out / "best.pth")
    assert next(model.parameters()).device.type == "cpu"


def test_float16_with_its_grad_scaler_on_cuda(photo_folder: Path, tmp_path: Path, monkeypatch) -> None:
    dtypes = conv_output_dtypes(monkeypatch)
    out = tmp_path / "run"
    run_train("--data", str(photo_folder), "--out", str(out), "--epochs", "1", "--batch-size", "16", "--quiet",
              "--workers", "0", "--amp", "fp16")  # fmt: skip
    assert dtypes == {torch.float16}
    scaler_state = read_resume(out / "last.pth")["resume"]["scaler"]
    assert scaler_state and scaler_state["scale"] > 0


def test_batches_come_pinned_and_reach_the_gpu_without_blocking(photo_folder: Path, tmp_path: Path) -> None:
    config = TrainConfig.from_options({"data": str(photo_folder), "out": str(tmp_path), "workers": 2, "batch_size": 8})
    loaders = build_loaders(config, splits_for(config.options()), Session(0, 1, torch.device("cuda")))
    images, targets = next(iter(loaders.train))
    assert images.is_pinned() and targets.is_pinned()
    on_gpu = images.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), images)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL between processes)")
def test_torchrun_two_processes_on_two_gpus_use_nccl(photo_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.train",
            "--data",
            str(photo_folder),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--quiet",
            "--workers",
            "1",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2 on cuda:1, process group backend nccl" in proc.stderr
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
