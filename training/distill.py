"""Knowledge distillation inside training.train's own loop: a teacher bundle's soft labels plus the true ones.

The loop calls ``batch_transform(images, targets)`` before the forward pass and ``criterion(logits,
targets)`` after it. ``Teacher.wrap`` turns the batch transform into one that also runs the teacher (in
eval mode, no gradients) on exactly the images the student sees (after MixUp/CutMix too) and hands
``(targets, teacher_logits)`` on; ``DistillationLoss`` mixes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

(Hinton et al., 2015; T^2 keeps the soft term's gradients on the scale of the hard one's).

Input: the student's batch is already normalised with the student's preprocessing. When the teacher's
preprocessing differs, the batch is converted on the fly: un-normalised, converted between grey and
colour (ITU-R 601 luma, or grey repeated), resized to the teacher's crop, normalised with the teacher's
mean/std. The teacher thus sees the same augmented view, in its own input format.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual alias

from model.bundle import Bundle, load_bundle
from model.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
LUMA = (0.299, 0.587, 0.114)


def adapt_batch(x: torch.Tensor, source: Preprocessing, target: Preprocessing) -> torch.Tensor:
    """A batch normalised for ``source`` preprocessing, re-expressed for ``target`` preprocessing."""
    if _same_input(source, target):
        return x
    mean = torch.tensor(source.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(source.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = x * std + mean
    if source.channels == 1 and target.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif source.channels == 3 and target.channels == 1:
        luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(1, keepdim=True)
    if x.shape[-1] != target.crop or x.shape[-2] != target.crop:
        mode = "bicubic" if target.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(target.crop, target.crop), mode=mode, align_corners=False, antialias=True)
    mean = torch.tensor(target.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(target.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class Teacher:
    """A frozen bundle model that labels the student's batches."""

    def __init__(
        self,
        bundle: Bundle,
        model: nn.Module,
        student_prep: Preprocessing,
        device: torch.device,
        *,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.bundle = bundle
        self.model = model.to(device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype  # the student's autocast type: the teacher costs as little as it does
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.student_prep = student_prep
        self.teacher_prep = bundle.preprocessing

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        class_names: list[str],
        student_prep: Preprocessing,
        device: torch.device,
        **options: Any,
    ) -> Teacher:
        bundle, model = load_bundle(path)
        if list(bundle.class_names) != list(class_names):
            raise SystemExit(f"{path}: the teacher's classes {list(bundle.class_names)} differ from the data's")
        logger.info(
            "distilling from %s (%s, preprocessing %s)",
            path,
            bundle.arch,
            "the student's" if _same_input(bundle.preprocessing, student_prep) else "converted on the fly",
        )
        return cls(bundle, model, student_prep, device, **options)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # the caller's model.train() never reaches the teacher, but be sure
        with torch.autocast(images.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)):
            return self.model(adapt_batch(images, self.student_prep, self.teacher_prep)).float()

    def wrap(self, inner: BatchTransform | None) -> BatchTransform:
        """A batch transform: ``inner`` (MixUp/CutMix or nothing), then the teacher's logits alongside."""

        def transform(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
            if inner is not None:
                images, targets = inner(images, targets)
            return images, (targets, self.logits(images))

        return transform


def _same_input(a: Preprocessing, b: Preprocessing) -> bool:
    return (a.channels, a.crop, a.mean, a.std) == (b.channels, b.crop, b.mean, b.std)


class DistillationLoss(nn.Module):
    """Soft (teacher, at temperature T, scaled by T^2) and hard (``hard``, the usual criterion) terms."""

    def __init__(self, hard: nn.Module, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError("distillation alpha must be in [0, 1]")
        if temperature <= 0:
            raise ValueError("distillation temperature must be positive")
        self.hard = hard
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, teacher_logits = targets
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits.float() / t, dim=1),
            F.log_softmax(teacher_logits.float() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.alpha * t * t * soft + (1 - self.alpha) * self.hard(logits, labels)
