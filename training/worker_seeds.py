"""Per-sample seeds, so that persistent DataLoader workers augment as the epoch says.

Workers that live across epochs (``persistent_workers``: no process start per epoch) are seeded once,
when they start; their random augmentations would then depend on every epoch before, and a run resumed
from last.pth would not replay what the uninterrupted run did. Instead the sampler draws, from its own
generator seeded with (run seed, epoch), the epoch's order and one seed per sample, and the worker seeds
torch and ``random`` with it before transforming that sample: the same (epoch, sample) gets the same
augmentation whichever worker takes it, however many there are, and whatever ran before.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

SEED_BOUND = 2**62


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for (run seed, epoch) that shares no stream with ``torch.manual_seed(seed * 1000 + epoch)``."""
    digest = hashlib.sha256(f"imgclf-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_BOUND


class SeededSampler(Sampler):
    """``sampler``'s indices, each with a seed; ``generator`` (which ``sampler`` shuffles with, if it does)
    is seeded per epoch by ``set_epoch``, which training.fit calls before every epoch."""

    def __init__(self, sampler: Sampler, generator: torch.Generator, seed: int) -> None:
        self.sampler = sampler
        self.generator = generator
        self.seed = seed
        self.set_epoch(0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        seeds = torch.randint(SEED_BOUND, (len(indices),), generator=self.generator).tolist()
        return iter(zip(indices, seeds, strict=True))

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler shuffles with (its seed, epoch)
            self.sampler.set_epoch(epoch)


class SeededDataset(Dataset):
    """``dataset[index]`` with torch's and ``random``'s generators seeded from the sampler's seed first."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        return self.dataset[index]
