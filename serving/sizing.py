"""How many worker processes and model threads a host gets by default, from the CPUs it may use.

On CPUs: one worker process per CPU, each running the model on one thread. A photo's decode and
preprocessing cost about as much CPU as the model, and a process spends part of every request holding
the GIL (HTTP, multipart, JSON), so processes side by side keep every core busy where threads of one
process queue behind each other (docs/performance.md measures both). Lean workers (ONNX Runtime, no
torch) make a process per core cheap. Past MAX_CPU_WORKERS processes, each gets more model threads
instead, so the copies of the models stay few on very large hosts.

On a GPU (torch or ONNX Runtime's CUDA provider): a few processes share the card (each has its own
CUDA context and copy of the model): enough to decode on the host's cores, not one per core.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CPU_WORKERS = 32
MAX_GPU_WORKERS = 4
# per GPU worker: host cores it decodes on
CPUS_PER_GPU_WORKER = 4


@dataclass(frozen=True)
class Sizing:
    workers: int
    model_threads: int


def cpu_sizing(cpus: int) -> Sizing:
    workers = max(1, min(cpus, MAX_CPU_WORKERS))
    return Sizing(workers, max(1, cpus // workers))


def gpu_sizing(cpus: int) -> Sizing:
    workers = max(1, min(MAX_GPU_WORKERS, cpus // CPUS_PER_GPU_WORKER))
    return Sizing(workers, max(1, cpus // workers))


def model_threads(cpus: int, workers: int) -> int:
    """Model threads per worker when the number of workers is given: the CPUs shared out."""
    return max(1, cpus // max(1, workers))
