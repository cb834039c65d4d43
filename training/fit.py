"""The epoch loop: train, validate, step the schedule, write checkpoints and records, stop when told.

Every epoch's randomness derives from (seed, epoch), so a run resumed from last.pth replays exactly
what the uninterrupted run would have done.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from training.builders import Loaders, Optimisation, set_backbone_trainable
from training.checkpoint import CheckpointWriter, Progress
from training.config import TrainConfig
from training.distill import BatchTransform
from training.distributed import Session, seed_everything
from training.engine import EpochResult, evaluate, train_one_epoch
from training.records import RunLog

logger = logging.getLogger("training.train")

EpochCallback = Callable[[dict[str, Any]], bool]


@dataclass
class TrainingParts:
    """What the builders made for one run."""

    model: nn.Module  # the network itself (saved, averaged by the EMA)
    loop_model: nn.Module  # what the loop runs: the network, or its DistributedDataParallel wrapper
    loaders: Loaders
    optimisation: Optimisation
    criterion: nn.Module
    batch_transform: BatchTransform | None
    num_classes: int


@dataclass
class FitResult:
    progress: Progress
    stopped_by_callback: bool

    def finished(self, config: TrainConfig) -> bool:
        """Ran to its end (all epochs, or early stopping), not cut short by --stop-after or the callback."""
        p = self.progress
        done = not config.stop_after or len(p.history) >= config.epochs
        done = done or bool(config.patience and p.stale_epochs >= config.patience)
        return done and not self.stopped_by_callback


def fit(
    config: TrainConfig,
    session: Session,
    parts: TrainingParts,
    progress: Progress,
    checkpoints: CheckpointWriter,
    run_log: RunLog,
    epoch_callback: EpochCallback | None = None,
) -> FitResult:
    """Epochs from ``progress.epoch`` to ``config.epochs``; ``epoch_callback(entry)`` returning True stops there."""
    eval_model = parts.optimisation.eval_model(parts.model)
    stopped_by_callback = False
    for epochs_run, epoch in enumerate(range(progress.epoch, config.epochs), start=1):
        seed_everything(config.seed * 1000 + epoch)
        set_backbone_phase(config, session, parts, epoch)
        entry, train, val = run_epoch(config, session, parts, eval_model, epoch)
        improved = progress.add(entry, val.top1)
        stop = bool(config.patience and progress.stale_epochs >= config.patience)
        stop = stop or bool(config.stop_after and epochs_run >= config.stop_after)
        if session.is_main:
            run_log.epoch(entry, train, val)
            metrics = {"val_top1": val.top1, "val_top5": val.top5, "val_loss": val.loss}
            checkpoints.write(progress, metrics, improved=improved, eval_model=eval_model, model=parts.model,
                              optimisation=parts.optimisation)  # fmt: skip
            run_log.history(progress.history)
        if epoch_callback is not None and epoch_callback(entry):
            stop = stopped_by_callback = True
        if stop:
            break
    return FitResult(progress, stopped_by_callback)


def set_backbone_phase(config: TrainConfig, session: Session, parts: TrainingParts, epoch: int) -> None:
    """--unfreeze-at: the backbone trains from that epoch on (also when a resumed run starts after it).

    DistributedDataParallel reduces the gradients of the parameters that required one when it was built:
    the network is wrapped again when that set changes."""
    trainable = not config.backbone_frozen(epoch)
    if all(p.requires_grad for p in parts.model.parameters()) == trainable:
        return
    set_backbone_trainable(parts.model, trainable)
    parts.loop_model = session.wrap(parts.model)
    if trainable and session.is_main:
        logger.info("epoch %d: the backbone trains from now on", epoch + 1)


def run_epoch(
    config: TrainConfig, session: Session, parts: TrainingParts, eval_model: nn.Module, epoch: int
) -> tuple[dict[str, Any], EpochResult, EpochResult]:
    """One epoch of training and validation; its history entry."""
    loader, optimisation = parts.loaders.train, parts.optimisation
    if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler, bare or in a SeededSampler
        loader.sampler.set_epoch(epoch)
    progress_bars = session.is_main and not config.quiet and sys.stderr.isatty()
    started = time.perf_counter()
    train = train_one_epoch(
        parts.loop_model,
        loader,
        optimisation.optimizer,
        parts.criterion,
        session.device,
        step_scheduler=optimisation.scheduler if optimisation.per_step else None,
        scaler=optimisation.scaler,
        amp_dtype=config.autocast,
        ema=optimisation.ema,
        batch_transform=parts.batch_transform,
        clip_grad=config.clip_grad,
        channels_last=config.channels_last,
        progress=progress_bars,
        description=f"epoch {epoch + 1}/{config.epochs}",
        freeze_norm=config.backbone_frozen(epoch),
        keep_norm_stats=config.keep_norm_stats,
    )
    train = session.average(train)
    val, _ = evaluate(eval_model, parts.loaders.val, session.device, num_classes=parts.num_classes,
                      channels_last=config.channels_last, progress=progress_bars, description="validate")  # fmt: skip
    scheduler = optimisation.scheduler
    if scheduler is not None and not optimisation.per_step:
        scheduler.step(val.top1) if config.sched == "plateau" else scheduler.step()
    entry = {
        "epoch": epoch + 1,
        "train_loss": round(train.loss, 6),
        "train_acc": round(train.top1, 6),
        "val_loss": round(val.loss, 6),
        "val_acc": round(val.top1, 6),
        "val_top5": round(val.top5 or 0.0, 6),
        "lr": optimisation.optimizer.param_groups[0]["lr"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    return entry, train, val
