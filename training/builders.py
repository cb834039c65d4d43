"""Factories that turn a ``TrainConfig`` into the parts of a run: model, data, optimisation, loss, batch transforms.

Each builder reads the config and nothing else the caller would have to keep in step; training.train's
``run_training`` calls them in order (the torchvision references' and timm's shape).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, WeightedRandomSampler
from torchvision.transforms import v2

from model.registry import build_model, head_names
from model.transforms import build_eval_transform, build_train_transform
from training.batch_augment import BatchAugment, TensorImageDataset
from training.checkpoint import CheckpointWriter
from training.config import TrainConfig
from training.data import ImageListDataset, Splits, balanced_weights, class_loss_weights
from training.distill import BatchTransform, DistillationLoss, Teacher
from training.distributed import Session
from training.precision import grad_scaler
from training.sparsity import apply_masks, zero_masks
from training.worker_seeds import SeededDataset, SeededSampler

logger = logging.getLogger("training.train")


# ------------------------------------------------------------------------------------------------- model


def build_network(config: TrainConfig, num_classes: int, device: torch.device, resume: dict | None) -> nn.Module:
    """The network on ``device``: from the configured weights, or from last.pth's when resuming."""
    model = build_model(
        config.arch,
        num_classes=num_classes,
        pretrained=config.pretrained if resume is None else "none",
        weights_file=config.weights_file if resume is None else None,
        in_channels=config.preprocessing.channels,
        **config.arch_kwargs,
    )
    set_backbone_trainable(model, not config.backbone_frozen(0))
    if resume is not None:  # the bundle's weights, and the auxiliary classifiers' kept beside them
        model.load_state_dict({**resume["state_dict"], **resume["resume"].get("aux_heads", {})})
    model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze every parameter but the heads' (registry.head_names: the head and the auxiliary
    classifiers, which are not the backbone either)."""
    heads = tuple(f"{head}." for head in head_names(model))
    for name, p in model.named_parameters():
        p.requires_grad = trainable or name.startswith(heads)


# -------------------------------------------------------------------------------------------------- data


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    batch_augment: BatchAugment | None  # --batch-aug: the train loader yields uint8 batches this augments

    def close(self) -> None:
        """Stop the persistent workers now. Left to the interpreter's exit (a finished run's loaders can
        outlive it in reference cycles), each worker waits out DataLoader's 5 s join timeout before it is
        killed: 80 s for 16 workers on a GPU machine. DataLoader has no public close; this is what
        Lightning does."""
        for loader in (self.train, self.val):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None


def build_loaders(config: TrainConfig, splits: Splits, session: Session) -> Loaders:
    """Training images augmented per image in workers, or cached as one tensor for --batch-aug; validation."""
    prep = config.preprocessing
    batch_augment = None
    if config.batch_aug:
        try:
            batch_augment = BatchAugment(prep, config.augment, channels_last=config.channels_last).to(session.device)
        except ValueError as exc:  # flags it cannot reproduce; the message starts with --batch-aug
            raise SystemExit(str(exc)) from None
        train_set: Dataset = TensorImageDataset(splits.train, prep)
    else:
        try:
            transform = build_train_transform(prep, config.augment)
        except ValueError as exc:  # an augmentation this input cannot take (--hue on grey images, say)
            raise SystemExit(f"augmentation: {exc}") from None
        train_set = ImageListDataset(splits.train, transform, cache=config.cache)
    val_set = ImageListDataset(
        splits.val or splits.train, build_eval_transform(prep), cache=config.cache or config.batch_aug
    )
    weights = balanced_weights(splits.train, len(splits.class_names)) if config.balance else None
    return Loaders(
        train=make_loader(train_set, config, train=True, session=session, sampler_weights=weights),
        val=make_loader(val_set, config, train=False),
        batch_augment=batch_augment,
    )


def make_loader(
    dataset: Dataset,
    config: TrainConfig,
    *,
    train: bool,
    session: Session | None = None,
    sampler_weights: torch.Tensor | None = None,
) -> DataLoader:
    """Shuffled (or class-balanced, or split across processes) for training; in order for validation.

    Workers stay alive from epoch to epoch (no process start per epoch); the training samples then carry
    their own seeds (training.worker_seeds). On CUDA, batches come in page-locked memory, so that the
    loop's ``non_blocking`` copies to the GPU overlap the computation.
    """
    sampler: Sampler | None = None
    generator = torch.Generator() if train and config.workers > 0 else None  # None: the global generator
    if train and session is not None and session.world > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=session.world, rank=session.rank, shuffle=True, seed=config.seed
        )
    elif train and sampler_weights is not None:
        sampler = WeightedRandomSampler(
            sampler_weights, num_samples=len(dataset), replacement=True, generator=generator
        )
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    if generator is not None:
        rank = session.rank if session is not None else 0
        dataset, sampler = SeededDataset(dataset), SeededSampler(sampler, generator, config.seed, rank)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        drop_last=train and len(dataset) > config.batch_size,
        pin_memory=config.device == "cuda",
    )


# ------------------------------------------------------------------------------------------ optimisation


@dataclass
class Optimisation:
    """Everything that steps with the weights, and what --resume restores of it."""

    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    per_step: bool  # the scheduler steps after every batch (else after every epoch)
    scaler: torch.amp.GradScaler | None
    ema: torch.optim.swa_utils.AveragedModel | None

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        for name in ("scheduler", "scaler", "ema"):
            part = getattr(self, name)
            if part is not None and state.get(name):
                part.load_state_dict(state[name])

    def eval_model(self, model: nn.Module) -> nn.Module:
        """What is validated and saved as best.pth: the EMA of the weights when there is one."""
        return self.ema.module if self.ema is not None else model


def build_optimisation(config: TrainConfig, model: nn.Module, steps_per_epoch: int) -> Optimisation:
    optimizer = build_optimizer(config, model)
    if config.keep_zeros:
        masks = zero_masks(model)
        optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))
        logger.info("--keep-zeros: %d weight tensors keep their zeros", len(masks))
    scheduler, per_step = build_scheduler(config, optimizer, steps_per_epoch)
    scaler = grad_scaler(config.autocast, torch.device(config.device))
    ema = None
    if config.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
        )
    return Optimisation(optimizer, scheduler, per_step, scaler, ema)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; weight decay on weights, not on biases and norms.

    With --unfreeze-at or --backbone-lr-scale, the head's groups come first (history's lr is theirs) and the
    backbone's follow at lr x scale. The backbone is in the optimizer from the start even while frozen: its
    parameters have no gradient then, which SGD and AdamW skip, and the groups stay the same across the
    unfreeze epoch and --resume. The schedulers scale every group's lr by the same factor.
    """
    if config.splits_backbone:
        heads = tuple(f"{head}." for head in head_names(model))
        parts = [(n.startswith(heads), p) for n, p in model.named_parameters()]
        groups = [
            *_decay_groups([p for is_head, p in parts if is_head], config.wd, config.lr),
            *_decay_groups([p for is_head, p in parts if not is_head], config.wd, config.lr * config.backbone_lr_scale),
        ]
    else:
        groups = _decay_groups([p for p in model.parameters() if p.requires_grad], config.wd, config.lr)
    if config.opt == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)


def _decay_groups(params: list[nn.Parameter], wd: float, lr: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd, "lr": lr}, {"params": no_decay, "weight_decay": 0.0, "lr": lr}]


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[Any, bool]:
    """(scheduler, steps per batch?): cosine with linear warm-up per batch; step and plateau per epoch."""
    if config.sched == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = int(config.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if config.sched == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma), False
    if config.sched == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", factor=config.gamma, patience=2), False
    return None, False


# ------------------------------------------------------------------------------- loss and batch transforms


def build_teacher(config: TrainConfig, class_names: list[str], device: torch.device) -> Teacher | None:
    if not config.distill_from:
        return None
    return Teacher.from_file(config.distill_from, class_names, config.preprocessing, device,
                             amp_dtype=config.autocast, channels_last=config.channels_last)  # fmt: skip


def build_criterion(config: TrainConfig, teacher: Teacher | None, splits: Splits) -> nn.Module:
    """Cross-entropy with label smoothing, class-weighted from the training split's counts with
    --class-weights auto; with a teacher, mixed with its soft labels. Built on the CPU: ``.to(device)`` it."""
    weight = None
    if config.class_weights == "auto":
        weight = class_loss_weights(splits.train, len(splits.class_names))
        shown = {name: round(float(w), 3) for name, w in zip(splits.class_names, weight, strict=True)}
        logger.info("class weights of the loss: %s", shown)
        if config.balance:
            logger.warning("--class-weights auto with --balance corrects the imbalance twice; use one of them")
    criterion: nn.Module = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    if teacher is None:
        return criterion
    return DistillationLoss(criterion, alpha=config.distill_alpha, temperature=config.distill_temperature)


def build_batch_transform(
    config: TrainConfig, num_classes: int, batch_augment: BatchAugment | None, teacher: Teacher | None
) -> BatchTransform | None:
    """What happens to a whole batch before the forward pass: --batch-aug, then MixUp/CutMix, then the teacher."""
    mixers: list[Callable[..., Any]] = []
    if config.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    transform = v2.RandomChoice(mixers) if mixers else None
    if batch_augment is not None:
        transform = batch_augment.as_batch_transform(transform)
    if teacher is not None:
        transform = teacher.wrap(transform)
    return transform


# ----------------------------------------------------------------------------------------------- records


def build_checkpoint_writer(config: TrainConfig, splits: Splits) -> CheckpointWriter:
    return CheckpointWriter(
        Path(config.out),
        arch=config.arch,
        arch_kwargs=config.arch_kwargs,
        class_names=splits.class_names,
        preprocessing=config.preprocessing,
        record={"data": {"path": str(config.data), **splits.describe()}, "args": config.options()},
    )
