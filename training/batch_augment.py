"""Augment whole batches of small images on the training device (``--batch-aug``), not one image at a time.

With few CPU cores, the per-image torchvision pipeline in a DataLoader worker competes with the
training threads (`python -m bench.train_input` compares the three pipelines on one machine). Small
images (the pad-crop regime) are decoded once, through the bundle's eval geometry, into one uint8
tensor; each batch then gets pad-crop, flips, normalisation and random erasing with per-image random
parameters from kornia, in a few milliseconds, on the CPU or the GPU that trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from model.preprocessing import Preprocessing
from model.transforms import TrainAugment, build_eval_geometry, build_normalize
from training.data import Sample, load_image

logger = logging.getLogger(__name__)


def batch_augment_problem(prep: Preprocessing, aug: TrainAugment) -> str | None:
    """Why ``--batch-aug`` cannot reproduce these augmentations, or None when it can."""
    crop = aug.resolved_crop(prep)
    if crop not in ("pad", "center"):
        return f"it needs the pad or center crop (small images), not {crop!r}"
    if aug.auto_augment != "none" or aug.color_jitter > 0 or aug.hue > 0 or aug.rotation > 0:
        return (
            "it does pad-crop, flips and random erasing only "
            "(no --auto-augment, --color-jitter, --hue or --rotation: train without --batch-aug for those)"
        )
    return None


class TensorImageDataset(Dataset):
    """Images decoded once through the eval geometry into one uint8 tensor (N, C, crop, crop)."""

    def __init__(self, samples: Sequence[Sample], prep: Preprocessing) -> None:
        geometry = build_eval_geometry(prep)
        self.images = torch.stack([v2.functional.pil_to_tensor(geometry(load_image(p))) for p, _ in samples])
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        logger.info("cached %d images as one %s uint8 tensor (%.1f MB)",
                    len(self), tuple(self.images.shape), self.images.numel() / 1e6)  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class BatchAugment(nn.Module):
    """uint8 batch -> augmented, normalised float batch: the same steps as the per-image train transform."""

    def __init__(self, prep: Preprocessing, aug: TrainAugment, channels_last: bool = False) -> None:
        super().__init__()
        # Imported here: kornia is a training dependency, and serving imports model/ but never this module.
        import kornia.augmentation as K  # noqa: N812 - kornia's own alias

        problem = batch_augment_problem(prep, aug)
        if problem:
            raise ValueError(f"--batch-aug: {problem}")
        size = (prep.crop, prep.crop)
        to_float, normalize = build_normalize(prep).transforms
        steps: list[nn.Module] = [to_float]
        if aug.resolved_crop(prep) == "pad" and aug.pad > 0:
            steps.append(K.RandomCrop(size, padding=aug.pad, padding_mode="reflect"))
        if aug.hflip > 0:
            steps.append(K.RandomHorizontalFlip(p=aug.hflip))
        if aug.vflip > 0:
            steps.append(K.RandomVerticalFlip(p=aug.vflip))
        steps.append(normalize)
        if aug.random_erasing > 0:
            steps.append(K.RandomErasing(p=aug.random_erasing))
        self.steps = nn.Sequential(*steps)
        self.channels_last = channels_last

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.steps(images)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out.contiguous()

    def as_batch_transform(self, inner: Any = None) -> Any:
        """A training batch transform (images, targets): augment, then ``inner`` (MixUp/CutMix) if any."""

        def transform(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
            images = self(images)
            return inner(images, targets) if inner is not None else (images, targets)

        return transform
