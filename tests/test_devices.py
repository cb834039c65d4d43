"""Training's choices per device, on this CPU: the autocast type (--amp), channels-last, pinned memory,
persistent workers that still replay an epoch exactly, DataLoader workers per CPU, the process-group backend.

What a GPU decides is tested here by mocking ONLY the hardware probes, which stand for hardware this machine
does not have: ``torch.cuda.is_available``, ``torch.cuda.is_bf16_supported`` and
``training.precision.cpu_has_native_bf16`` (the CPU's bfloat16 flags). Everything else is the real code on
real data; tests/test_cuda.py runs the same paths on a real GPU (skipped here).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
from pathlib import Path

import pytest
import torch

from training import precision, recipes, train
from training.builders import build_loaders, build_network, build_optimisation, make_loader
from training.config import TrainConfig, default_workers, splits_for
from training.data import ImageListDataset
from training.distributed import Session, process_group_backend, seed_everything
from training.precision import amp_choice, autocast_dtype, cpu_flags, cpu_has_native_bf16, grad_scaler
from training.worker_seeds import SeededSampler

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
bogomips\t: 4792.79

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
CPU implementer\t: 0x41
"""


def fake_cpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """Mock: stands for a CPU with (or without) native bfloat16, which this machine may not be."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)


def fake_gpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """Mock: stands for a CUDA GPU (Ampere or later when ``native_bf16``), which this machine does not have."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)


# ------------------------------------------------------------------------------------------------ the probe


def test_cpu_flags_read_the_kernels_flag_lines(tmp_path: Path) -> None:
    (tmp_path / "x86").write_text(X86_CPUINFO)
    (tmp_path / "arm").write_text(ARM_CPUINFO)
    x86, arm = cpu_flags(tmp_path / "x86"), cpu_flags(tmp_path / "arm")
    assert {"avx512_bf16", "avx512f", "sse2"} <= x86 and "4792.79" not in x86 and "AuthenticAMD" not in x86
    assert {"bf16", "asimd", "i8mm"} <= arm and "0x41" not in arm
    assert x86 & precision.NATIVE_BF16_FLAGS == {"avx512_bf16"} and arm & precision.NATIVE_BF16_FLAGS == {"bf16"}
    without = X86_CPUINFO.replace(" avx512_bf16", "")
    (tmp_path / "skylake").write_text(without)
    assert not cpu_flags(tmp_path / "skylake") & precision.NATIVE_BF16_FLAGS
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no flags, so float32


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not hasattr(torch.cpu, "_is_avx512_bf16_supported"),
    reason="the cross-check reads x86 CPUID through torch's private cpuinfo helpers",
)
def test_the_probe_agrees_with_cpuid_as_torch_reads_it() -> None:
    """The kernel's flags and the cpuinfo library's CPUID reading (inside torch) tell the same about this CPU."""
    from_cpuid = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == from_cpuid
    assert torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "AVX512")  # width only: cannot tell


# ------------------------------------------------------------------------------------------ --amp resolved


def test_amp_auto_on_cpu_trains_in_bfloat16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, native_bf16=True)
    assert amp_choice("auto", CPU) == (torch.bfloat16, "--amp auto: this CPU has native bfloat16", True)
    assert autocast_dtype("bf16", CPU) == torch.bfloat16 and amp_choice("on", CPU).native
    fake_cpu(monkeypatch, native_bf16=False)
    assert autocast_dtype("auto", CPU) is None
    # asked for explicitly, it is given, with the warning that it will be slower
    assert amp_choice("on", CPU)[::2] == (torch.bfloat16, False) and amp_choice("bf16", CPU)[::2] == (
        torch.bfloat16,
        False,
    )
    assert amp_choice("fp16", CPU)[::2] == (torch.float16, False)
    assert autocast_dtype("off", CPU) is None
    with pytest.raises(ValueError, match="--amp must be one of"):
        autocast_dtype("half", CPU)


def test_amp_auto_on_cuda_prefers_native_bfloat16_else_float16_with_a_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, native_bf16=True)
    assert autocast_dtype("auto", CUDA) == torch.bfloat16 and grad_scaler(torch.bfloat16, CUDA) is None
    assert autocast_dtype("bf16", CUDA) == torch.bfloat16
    assert autocast_dtype("fp16", CUDA) == autocast_dtype("on", CUDA) == torch.float16
    fake_gpu(monkeypatch, native_bf16=False)  # a GPU before Ampere (a T4, a V100)
    assert autocast_dtype("auto", CUDA) == torch.float16
    scaler = grad_scaler(torch.float16, CUDA)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() and scaler._device == "cuda"
    with pytest.raises(SystemExit, match="--amp bf16: this GPU has no native bfloat16"):
        autocast_dtype("bf16", CUDA)
    assert autocast_dtype("off", CUDA) is None and grad_scaler(None, CUDA) is None


@pytest.mark.parametrize("native_bf16, dtype", [(True, "bfloat16"), (False, "float16")], ids=["ampere", "turing"])
def test_a_cuda_run_resolves_amp_channels_last_and_pinned_persistent_loaders(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool, dtype: str
) -> None:
    """On a (mocked) GPU, the defaults resolve to what the run records in args.json and builds its parts with."""
    fake_gpu(monkeypatch, native_bf16)
    options = {"data": str(photo_folder), "out": str(tmp_path / "run"), "workers": 2, "batch_size": 16}
    config = TrainConfig.from_options(options)
    assert (config.device, config.amp, config.amp_dtype, config.channels_last) == ("cuda", "auto", dtype, True)
    saved = config.to_dict()
    assert (saved["amp_dtype"], saved["channels_last"]) == (dtype, True) and TrainConfig.from_dict(saved) == config
    assert TrainConfig.from_options({**options, "channels_last": False}).channels_last is False
    assert TrainConfig.from_options({**options, "arch": "vit_b_16", "img_size": 32}).channels_last is False
    assert TrainConfig.from_options({**options, "amp": "off"}).amp_dtype is None

    splits = splits_for(config.options())
    loaders = build_loaders(config, splits, Session(0, 1, CPU))
    for loader in (loaders.train, loaders.val):
        assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2
    assert isinstance(loaders.train.sampler, SeededSampler)
    model = build_network(config, len(splits.class_names), CPU, None)  # the weights stay here; no GPU to move to
    assert next(p for p in model.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    scaler = build_optimisation(config, model, steps_per_epoch=len(loaders.train)).scaler
    assert (scaler is not None and scaler.is_enabled()) == (dtype == "float16")


def test_a_cpu_run_keeps_contiguous_unpinned_tensors_and_logs_its_precision(
    photo_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No mock: on this CPU the default --amp auto follows its flags, and the run says so in its log."""
    out = tmp_path / "run"
    children = set(multiprocessing.active_children())
    with caplog.at_level(logging.INFO, logger="training.train"):
        args = ["--data", str(photo_folder), "--out", str(out), "--epochs", "1", "--batch-size", "32",
                "--quiet", "--workers", "1", "--seed", "3", "--device", "cpu"]  # fmt: skip
        result = train.main(recipes.parse_args(train.get_args_parser(), args))
    assert set(multiprocessing.active_children()) <= children, "the run's persistent workers outlived it"
    config = result["config"]
    expected = "bfloat16" if cpu_has_native_bf16() else None
    assert (config.device, config.amp_dtype, config.channels_last) == ("cpu", expected, False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision "))
    assert line.startswith(f"precision {expected or 'float32'} (--amp auto: this CPU ")
    assert "contiguous memory format" in line and "pinned" not in line
    loader = make_loader(ImageListDataset([], lambda img: img), config, train=False)
    assert not loader.pin_memory


# ------------------------------------------------------------------------------------------------- workers


def test_persistent_workers_replay_an_epoch_whatever_the_worker_count(photo_folder: Path, tmp_path: Path) -> None:
    """Workers live across epochs, yet epoch 2's augmented batches are the same whether epoch 1 ran before
    (the uninterrupted run) or not (a run resumed after epoch 1), and with one worker or two."""

    def epochs(workers: int, which: list[int]) -> list[list[torch.Tensor]]:
        options = {"data": str(photo_folder), "out": str(tmp_path / "run"), "workers": workers, "batch_size": 32,
                   "hflip": 0.5, "pad": 4, "seed": 5, "device": "cpu"}  # fmt: skip
        config = TrainConfig.from_options(options)
        loader = build_loaders(config, splits_for(config.options()), Session(0, 1, CPU)).train
        assert loader.persistent_workers and loader.num_workers == workers
        seen = []
        for epoch in which:
            seed_everything(config.seed * 1000 + epoch)  # as training.fit starts every epoch
            loader.sampler.set_epoch(epoch)
            seen.append([images for images, _ in loader])
        return seen

    first, second = epochs(2, [0, 1])
    resumed = epochs(2, [1])[0]
    one_worker = epochs(1, [1])[0]
    assert len(second) == len(resumed) == len(one_worker) > 1
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))  # epochs do differ
    for a, b, c in zip(second, resumed, one_worker, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_default_workers_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mock: os.sched_getaffinity stands for machines (and CPU sets) of other sizes."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("os.sched_getaffinity is Linux-only")
    for cpus, world, workers in [(16, 1, 8), (16, 2, 7), (4, 1, 3), (4, 2, 1), (2, 1, 1), (1, 1, 0)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert default_workers(world) == workers, (cpus, world)


def test_the_process_group_backend_is_nccl_on_gpus_and_gloo_on_cpus() -> None:
    assert process_group_backend(CUDA) == "nccl" and process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend(CPU) == "gloo"
