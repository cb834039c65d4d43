"""One epoch of training and one pass of evaluation; training.fit runs them epoch after epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from model.registry import AUX_LOSS_WEIGHT

logger = logging.getLogger(__name__)


@dataclass
class EpochResult:
    loss: float
    top1: float
    top5: float | None = None
    samples: int = 0
    logits: torch.Tensor | None = None  # (N, classes) on the CPU, when evaluate(keep_logits=True)
    targets: torch.Tensor | None = None


def _topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == targets.unsqueeze(1)).any(dim=1).sum())


def training_loss(
    outputs: torch.Tensor | tuple[torch.Tensor | None, ...], targets: Any, criterion: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, main logits) of a training forward pass: the one place the loss is taken.

    GoogLeNet and Inception v3 return a namedtuple in train mode, the main logits first, then the
    auxiliary classifiers' (None for one that is off): each auxiliary loss is the same ``criterion``
    (so with MixUp/CutMix targets and with distillation too) weighted by AUX_LOSS_WEIGHT, 0.3 as in the
    GoogLeNet paper, and added to the main one. Evaluation needs none of this: in eval mode they
    return the main logits alone.
    """
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, targets), outputs
    logits, *aux = outputs
    loss = criterion(logits, targets)
    for aux_logits in aux:
        if aux_logits is not None:
            loss = loss + AUX_LOSS_WEIGHT * criterion(aux_logits, targets)
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    device: torch.device,
    *,
    step_scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    clip_grad: float = 0.0,
    channels_last: bool = False,
    progress: bool = True,
    description: str = "train",
    freeze_norm: bool = False,
    keep_norm_stats: bool = False,
) -> EpochResult:
    """Train for one pass over ``loader``; accuracy counts hard labels (before MixUp/CutMix).

    ``freeze_norm``: norm layers whose parameters are frozen keep their running statistics (feature
    extraction must not drift the backbone through BatchNorm either). ``keep_norm_stats``: every
    BatchNorm layer does, and normalises with them in training too, trainable or not (--keep-norm-stats:
    once a pretrained backbone is unfrozen, small batches' own statistics would otherwise replace the
    ones the head was trained on, and its accuracy collapses; Keras's fine-tuning advice).
    ``amp_dtype``: the autocast type (float16 on CUDA, with ``scaler``; bfloat16 needs no scaler); None
    trains in full precision.
    """
    model.train()
    if freeze_norm or keep_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                keep_norm_stats or not any(p.requires_grad for p in module.parameters())
            ):
                module.eval()
    total_loss = 0.0
    correct = 0
    seen = 0
    use_scaler = scaler is not None
    bar = tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard_targets = targets
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, logits = training_loss(model(images), targets, criterion)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate or enable --clip-grad")
        optimizer.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = images.shape[0]
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == hard_targets).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    bar.close()
    return EpochResult(loss=total_loss / max(seen, 1), top1=correct / max(seen, 1), samples=seen)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    num_classes: int,
    channels_last: bool = False,
    progress: bool = False,
    description: str = "eval",
    keep_logits: bool = False,
) -> tuple[EpochResult, torch.Tensor]:
    """Loss, top-1, top-5 and the confusion matrix (rows: true class, columns: predicted).

    ``keep_logits`` also returns every logit and target, for calibration (ECE, temperature fitting).
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss = 0.0
    top1 = 0
    top5 = 0
    seen = 0
    all_logits: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    for images, targets in tqdm(loader, desc=description, disable=not progress, leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        logits = model(images).float()
        total_loss += float(criterion(logits, targets))
        top1 += _topk_correct(logits, targets, 1)
        top5 += _topk_correct(logits, targets, 5)
        seen += images.shape[0]
        preds = logits.argmax(1).cpu()
        confusion.index_put_((targets.cpu(), preds), torch.ones_like(preds), accumulate=True)
        if keep_logits:
            all_logits.append(logits.cpu())
            all_targets.append(targets.cpu())
    seen = max(seen, 1)
    result = EpochResult(loss=total_loss / seen, top1=top1 / seen, top5=top5 / seen, samples=seen)
    if keep_logits:
        result.logits = torch.cat(all_logits) if all_logits else torch.empty(0, num_classes)
        result.targets = torch.cat(all_targets) if all_targets else torch.empty(0, dtype=torch.long)
    return result, confusion


def per_class_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix."""
    c = confusion.double()
    tp = c.diag()
    predicted = c.sum(0)
    actual = c.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {
        name: {
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(actual[i]),
        }
        for i, name in enumerate(class_names)
    }
