"""One training process among ``world``: rank, device, threads, determinism and seeding (torchrun sets RANK/WORLD_SIZE).

A single process is a world of one; only rank 0 writes files. Gloo on the CPU, NCCL on GPUs
(``process_group_backend``).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.torch_predictor import resolve_device
from training.config import TrainConfig
from training.engine import EpochResult

logger = logging.getLogger("training.train")


@dataclass(frozen=True)
class Session:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop runs: DistributedDataParallel across processes, the model itself alone."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def average(self, result: EpochResult) -> EpochResult:
        """Training loss and top-1 over every process's samples."""
        if self.world == 1:
            return result
        t = torch.tensor([result.loss * result.samples, result.top1 * result.samples, result.samples],
                         dtype=torch.float64, device=self.device)  # fmt: skip
        dist.all_reduce(t)
        result.loss = float(t[0] / t[2])
        result.top1 = float(t[1] / t[2])
        result.samples = int(t[2])
        return result

    def close(self) -> None:
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def start_session(config: TrainConfig) -> Session:
    """Join the process group (if any), then set threads, determinism and the seed the model is built with."""
    rank, world, device = 0, config.world_size, resolve_device(config.device)
    if world > 1:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        backend = process_group_backend(device)
        dist.init_process_group(backend)
        logger.info("process %d of %d on %s, process group backend %s", rank, world, device, backend)
    torch.set_num_threads(config.threads)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training batches keep one shape: let cuDNN pick its fastest kernels
    seed_everything(config.seed)
    return Session(rank, world, device)


def process_group_backend(device: torch.device) -> str:
    """NCCL between GPUs (collectives on the device itself); gloo between CPU processes (NCCL has no CPU path)."""
    return "nccl" if device.type == "cuda" else "gloo"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
