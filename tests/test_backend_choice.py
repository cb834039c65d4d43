"""Which backend and device a host serves on, and how many workers and threads it gets by default.

The rule is a pure function of two probes (does torch see a GPU, has onnxruntime its CUDA provider), so
it is tested here for hosts this machine is not; ``probe_backend`` is tested by replacing only those two
probes (there is no GPU here: the mocks stand for one).
"""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest
import torch

from model.cpus import available_cpus, cgroup_cpu_quota
from serving.backend_choice import BackendUnavailable, choose_backend
from serving.manifest import ModelLoadError
from serving.prepare import probe_backend
from serving.sizing import cpu_sizing, gpu_sizing, model_threads


@pytest.mark.parametrize(
    ("backend", "device", "torch_cuda", "ort_cuda", "expected"),
    [
        ("auto", "auto", False, False, ("onnx", "cpu")),  # a laptop, a CPU container
        ("auto", "auto", True, False, ("torch", "cuda")),  # a GPU host with the CPU onnxruntime
        ("auto", "auto", True, True, ("onnx", "cuda")),  # a GPU host with onnxruntime-gpu
        ("auto", "cuda", True, False, ("torch", "cuda")),
        ("auto", "cpu", True, True, ("onnx", "cpu")),  # DEVICE=cpu wins over the GPU
        ("onnx", "auto", True, False, ("onnx", "cpu")),  # asked for onnx: its CPU provider
        ("onnx", "auto", False, True, ("onnx", "cuda")),
        ("torch", "auto", False, False, ("torch", "cpu")),
        ("torch", "auto", True, True, ("torch", "cuda")),
        ("torch", "cpu", True, True, ("torch", "cpu")),
    ],
)
def test_the_backend_follows_the_host(backend, device, torch_cuda, ort_cuda, expected) -> None:
    choice = choose_backend(backend, device, torch_cuda=torch_cuda, ort_cuda=ort_cuda)
    assert (choice.backend, choice.device) == expected
    assert choice.reason


@pytest.mark.parametrize(
    ("backend", "ort_cuda", "message"),
    [
        ("auto", False, "device 'cuda' was asked for but this host shows no CUDA device"),
        ("torch", True, "torch sees no CUDA device"),
        ("onnx", False, "no CUDAExecutionProvider"),
    ],
)
def test_cuda_asked_for_on_a_host_without_it_stops_the_start(backend, ort_cuda, message) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        choose_backend(backend, "cuda", torch_cuda=False, ort_cuda=ort_cuda)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("tensorrt", "auto", torch_cuda=False, ort_cuda=False)


def test_probe_backend_asks_torch_and_onnxruntime(monkeypatch) -> None:
    # no GPU on this machine: these two replacements stand for a GPU host's answers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert probe_backend("auto", "auto").device == "cuda" and probe_backend("auto", "auto").backend == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (probe_backend("auto", "auto").backend, probe_backend("auto", "auto").device) == ("onnx", "cpu")
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        probe_backend("auto", "cuda")


@pytest.mark.parametrize(
    ("cpus", "workers", "threads"), [(1, 1, 1), (2, 2, 1), (4, 4, 1), (16, 16, 1), (32, 32, 1), (64, 32, 2)]
)
def test_one_worker_per_cpu_up_to_thirty_two(cpus: int, workers: int, threads: int) -> None:
    sizing = cpu_sizing(cpus)
    assert (sizing.workers, sizing.model_threads) == (workers, threads)
    assert sizing.workers * sizing.model_threads <= cpus


@pytest.mark.parametrize(("cpus", "workers"), [(2, 1), (8, 2), (16, 4), (64, 4)])
def test_a_gpu_host_gets_a_few_workers(cpus: int, workers: int) -> None:
    assert gpu_sizing(cpus).workers == workers


def test_given_workers_share_the_cpus() -> None:
    assert model_threads(8, 2) == 4 and model_threads(2, 4) == 1


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # docker run --cpus 2 (cgroup v2)
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_containers_cpu_quota_is_read(tmp_path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    expected = len(os.sched_getaffinity(0)) if quota is None else min(len(os.sched_getaffinity(0)), max(1, int(quota)))
    assert available_cpus(tmp_path) == expected


def test_this_process_counts_its_own_cpus() -> None:
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
