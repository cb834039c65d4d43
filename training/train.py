"""Train a classifier on a folder of labelled images and write checkpoint bundles.

    python -m training.train --data DIR --arch simple_cnn --out runs/x
    python -m training.train --data DIR --arch efficientnet_lite0 --out runs/y --epochs 5   # transfer learning
    torchrun --nproc_per_node 2 -m training.train --data DIR --arch simple_cnn --out runs/z
    python -m training.train --data DIR --out runs/s --distill-from runs/big/best.pth      # distillation
    python -m training.train --data DIR --out runs/ft --init-from pruned.pth --keep-zeros  # fine-tune a bundle

RUN_DIR gets best.pth and last.pth (bundles; last.pth also holds what --resume needs), history.json,
args.json (the resolved arguments), curves.png, TensorBoard events in tb/, and an evaluation report of
the best model on the test split (or the validation split when there is none) in eval/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler
from torchvision.transforms import v2

from model.bundle import (
    Bundle,
    atomic_torch_save,
    library_versions,
    load_bundle,
    make_bundle,
    now_iso,
    plain,
    read_bundle,
    save_bundle,
)
from model.predictor import available_cpus, resolve_device
from model.preprocessing import Preprocessing
from model.registry import PRETRAINED_CHOICES, build_model, find_head, list_architectures, pretrained_preprocessing
from model.transforms import AUTO_AUGMENTS, CROP_MODES, TrainAugment, build_eval_transform, build_train_transform
from training.batch_augment import BatchAugment, TensorImageDataset
from training.data import ImageListDataset, Splits, balanced_weights, find_splits, image_statistics
from training.distill import DistillationLoss, Teacher
from training.engine import evaluate, train_one_epoch
from training.evaluate import write_report
from training.plots import plot_curves
from training.sparsity import apply_masks, zero_masks

logger = logging.getLogger("training.train")

RESUME_KEYS = ("optimizer", "scheduler", "scaler", "ema", "epoch", "best", "history", "stale_epochs")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train an image classifier and write bundles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="image folder (ImageFolder, train/val/test splits, or Kaggle flat)")
    g.add_argument("--val-split", type=float, default=0.1, help="fraction held out for validation when no val/ folder")
    g.add_argument("--test-split", type=float, default=0.1, help="fraction held out for testing when no test/ folder")
    g.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="crop size (default: the pretrained weights' size; "
        "from scratch: the images' median short side, at most 224)",
    )
    g.add_argument(
        "--resize",
        type=int,
        default=None,
        help="eval resize of the short side (default: crop/0.875, or the crop itself below 64 px)",
    )
    g.add_argument(
        "--channels",
        type=int,
        default=0,
        choices=(0, 1, 3),
        help="1 grey, 3 colour, 0 auto (grey data with a from-scratch model gets 1)",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="DataLoader worker processes (default: CPUs - 1, at most 8)"
    )
    g.add_argument("--cache", action="store_true", help="decode every image once and keep it in memory")
    g.add_argument(
        "--batch-aug",
        action="store_true",
        help="small images: decode once into one uint8 tensor and augment whole batches on the training device"
        " (kornia: pad-crop, flip, random erasing) instead of each image in DataLoader workers; faster on few cores",
    )
    g.add_argument("--balance", action="store_true", help="sample classes equally often (WeightedRandomSampler)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="simple_cnn", help=f"architecture, one of: {', '.join(list_architectures())}")
    g.add_argument("--arch-kwargs", default="{}", help="JSON of extra constructor arguments, e.g. '{\"width\": 48}'")
    g.add_argument(
        "--pretrained",
        default=None,
        choices=PRETRAINED_CHOICES,
        help="start from ImageNet weights (default: imagenet, except none for simple_cnn)",
    )
    g.add_argument("--weights-file", default=None, help="start from a local state_dict/bundle file instead")
    g.add_argument("--freeze-backbone", action="store_true", help="train the new head only (feature extraction)")
    g.add_argument(
        "--init-from",
        default=None,
        help="start from a bundle: its architecture, arguments, preprocessing and weights (e.g. a pruned bundle)",
    )
    g.add_argument(
        "--keep-zeros",
        action="store_true",
        help="weights that are exactly zero at the start stay zero (fine-tuning a pruned model keeps its sparsity)",
    )

    g = p.add_argument_group("distillation")
    g.add_argument("--distill-from", default=None, help="teacher bundle whose soft labels the student learns from")
    g.add_argument(
        "--distill-alpha", type=float, default=0.5, help="weight of the teacher's soft labels (1 - alpha: true labels)"
    )
    g.add_argument("--distill-temperature", type=float, default=4.0, help="softmax temperature of the soft labels")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs")
    g.add_argument("--batch-size", type=int, default=128, help="batch size per process")
    g.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: SGD 0.1 from scratch, "
        "0.01 pretrained; AdamW 2e-3 / 5e-4; scaled by batch size / 128)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    g.add_argument(
        "--wd",
        type=float,
        default=None,
        help="weight decay, not applied to biases and norms (default: SGD 5e-4, AdamW 0.05)",
    )
    g.add_argument("--sched", default="cosine", choices=("cosine", "step", "plateau", "none"), help="LR schedule")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (cosine)")
    g.add_argument("--step-size", type=int, default=10, help="epochs between LR drops (step)")
    g.add_argument("--gamma", type=float, default=0.1, help="LR factor at each drop (step, plateau)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp alpha (0: off)")
    g.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights per step, e.g. 0.999 (0: off)")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "on", "off"),
        help="mixed precision: float16 on CUDA; 'on' also trains in bfloat16 on CPU, about 1.7-2.2x faster on"
        " CPUs with AVX-512 BF16 or AMX (auto: CUDA only)",
    )
    g.add_argument("--patience", type=int, default=0, help="early stopping after N epochs without improvement (0: off)")

    g = p.add_argument_group("augmentation")
    g.add_argument(
        "--crop",
        default="auto",
        choices=CROP_MODES,
        help="auto: random-resized for photos, pad (random crop of a padded image) below 64 px",
    )
    g.add_argument("--min-scale", type=float, default=0.25, help="smallest area fraction of random-resized crops")
    g.add_argument("--pad", type=int, default=2, help="padding of the pad crop")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--auto-augment", default="none", choices=AUTO_AUGMENTS, help="policy")
    g.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter")
    g.add_argument("--random-erasing", type=float, default=0.0, help="RandomErasing probability")

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run folder for bundles, logs and figures")
    g.add_argument("--resume", default=None, help="continue from RUN_DIR/last.pth")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    g.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: usable CPUs / processes)"
    )
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N epochs of this invocation, as if interrupted (time-sliced jobs; the resume test)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ----------------------------------------------------------------------------------------------------------
# set-up helpers


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE, otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_arg)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_preprocessing(args: argparse.Namespace, splits: Splits) -> Preprocessing:
    """The eval preprocessing stored in the bundle, resolved once from flags, weights and data."""
    pretrained = args.pretrained != "none" or bool(args.weights_file)
    native = pretrained_preprocessing(args.arch)
    stats = image_statistics(splits.train, channels=args.channels, seed=args.seed)
    if native is not None and (pretrained or args.arch != "simple_cnn"):
        crop = args.img_size or native.crop
        channels = 3
        mean, std = native.mean, native.std
        interpolation = native.interpolation
        if not pretrained:
            mean, std = _colour_stats(stats)
    else:
        crop = args.img_size or min(stats["median_short_side"], 224)
        channels = args.channels or (1 if stats["grey"] else 3)
        mean, std = (stats["mean"], stats["std"]) if channels == len(stats["mean"]) else _colour_stats(stats)
        if channels == 1 and len(mean) == 3:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        interpolation = "bilinear"
    resize = args.resize or (crop if crop < 64 else int(round(crop / 0.875)))
    return Preprocessing(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation, channels=channels)


def _colour_stats(stats: dict[str, Any]) -> tuple[list[float], list[float]]:
    mean, std = stats["mean"], stats["std"]
    return (mean * 3, std * 3) if len(mean) == 1 else (mean, std)


def default_lr(args: argparse.Namespace, world: int) -> float:
    scratch = args.pretrained == "none" and not args.weights_file
    base = {"sgd": 0.1 if scratch else 0.01, "adamw": 2e-3 if scratch else 5e-4}[args.opt]
    return base * args.batch_size * world / 128


def param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def build_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any, bool]:
    """(scheduler, steps per batch?)."""
    if args.sched == "cosine":
        total = max(1, args.epochs * steps_per_epoch)
        warmup = int(args.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if args.sched == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.step_size, args.gamma), False
    if args.sched == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", factor=args.gamma, patience=2), False
    return None, False


def freeze_backbone(model: nn.Module) -> None:
    head = find_head(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head + ".")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """float16 on CUDA unless off; bfloat16 on CPU only when asked, since only some CPUs run it natively."""
    if amp == "off" or (device.type != "cuda" and amp == "auto"):
        return None
    if device.type == "cuda":
        return torch.float16
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        logger.warning("--amp on: this CPU has no native bfloat16, so training will be slower, not faster")
    return torch.bfloat16


def resolve_workers(args: argparse.Namespace, world: int) -> int:
    if args.workers is not None:
        return args.workers
    return max(0, min(8, available_cpus() // world - 1))


def make_loader(
    dataset: Dataset,
    args: argparse.Namespace,
    *,
    train: bool,
    world: int,
    rank: int,
    sampler_weights: torch.Tensor | None = None,
    workers: int = 0,
) -> DataLoader:
    sampler = None
    if train and world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    elif train and sampler_weights is not None:
        sampler = WeightedRandomSampler(sampler_weights, num_samples=len(dataset), replacement=True)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=False,
        drop_last=train and len(dataset) > args.batch_size,
        pin_memory=torch.cuda.is_available(),
    )


# ----------------------------------------------------------------------------------------------------------


def apply_init_from(args: argparse.Namespace) -> Bundle | None:
    """--init-from: the bundle decides architecture and preprocessing; its weights load via --weights-file."""
    if not args.init_from:
        return None
    if args.weights_file:
        raise SystemExit("--init-from cannot be combined with --weights-file")
    bundle = read_bundle(args.init_from)
    kwargs = {k: v for k, v in bundle.arch_kwargs.items() if k != "in_channels"}
    if args.arch != bundle.arch:
        logger.info("--init-from %s: architecture %s", args.init_from, bundle.arch)
    args.arch = bundle.arch
    args.arch_kwargs = json.dumps(kwargs)
    args.pretrained = "none"
    if args.resume:  # the weights and the preprocessing come from last.pth
        return None
    args.weights_file = args.init_from
    return bundle


def main(args: argparse.Namespace, epoch_callback: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train; ``epoch_callback(entry)`` (optional) sees each epoch's history entry and may return True
    to stop there, without the final evaluation (training.tune prunes trials this way)."""
    init_bundle = apply_init_from(args)
    rank, world, device = setup_distributed(args.device)
    is_main = rank == 0
    out = Path(args.out)
    threads = args.threads or max(1, available_cpus() // world)
    torch.set_num_threads(threads)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if args.pretrained is None:
        args.pretrained = "none" if args.arch == "simple_cnn" else "imagenet"
    seed_everything(args.seed)
    arch_kwargs = json.loads(args.arch_kwargs)
    if not isinstance(arch_kwargs, dict):
        raise SystemExit("--arch-kwargs must be a JSON object")

    resume_state: dict[str, Any] | None = None
    if args.resume:
        resume_state = torch.load(args.resume, map_location="cpu", weights_only=True)
        if "resume" not in resume_state:
            raise SystemExit(f"{args.resume}: not a last.pth written by training.train (no resume state)")

    splits = find_splits(args.data, val_split=args.val_split, test_split=args.test_split, seed=args.seed)
    class_names = splits.class_names
    if resume_state is not None:
        prep = Preprocessing.from_dict(resume_state["preprocessing"])
        if resume_state["class_names"] != class_names:
            raise SystemExit(f"{args.resume}: its classes differ from those found in {args.data}")
    elif init_bundle is not None:
        prep = init_bundle.preprocessing
    else:
        prep = resolve_preprocessing(args, splits)
    if args.arch.startswith("vit_") and prep.crop != 224:
        arch_kwargs.setdefault("image_size", prep.crop)
    if args.arch.startswith("efficientnet_lite"):
        arch_kwargs.setdefault("image_size", prep.crop)

    model = build_model(
        args.arch,
        num_classes=len(class_names),
        pretrained=args.pretrained if resume_state is None else "none",
        weights_file=args.weights_file if resume_state is None else None,
        in_channels=prep.channels,
        **arch_kwargs,
    )
    if args.freeze_backbone:
        freeze_backbone(model)
    if resume_state is not None:
        model.load_state_dict(resume_state["state_dict"])
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    aug = TrainAugment(
        crop=args.crop,
        min_scale=args.min_scale,
        pad=args.pad,
        hflip=args.hflip,
        auto_augment=args.auto_augment,
        color_jitter=args.color_jitter,
        random_erasing=args.random_erasing,
    )
    workers = resolve_workers(args, world)
    batch_augment = None
    if args.batch_aug:
        try:
            batch_augment = BatchAugment(prep, aug, channels_last=args.channels_last).to(device)
        except ValueError as exc:  # flags it cannot reproduce; the message starts with --batch-aug
            raise SystemExit(str(exc)) from None
        train_set: Dataset = TensorImageDataset(splits.train, prep)
        workers = 0  # indexing a tensor needs no worker; evaluation of cached images needs none either
    else:
        train_set = ImageListDataset(splits.train, build_train_transform(prep, aug), cache=args.cache)
    eval_transform = build_eval_transform(prep)
    val_set = ImageListDataset(splits.val or splits.train, eval_transform, cache=args.cache or args.batch_aug)
    weights = balanced_weights(splits.train, len(class_names)) if args.balance else None
    train_loader = make_loader(
        train_set, args, train=True, world=world, rank=rank, sampler_weights=weights, workers=workers
    )
    val_loader = make_loader(val_set, args, train=False, world=1, rank=0, workers=workers)

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    lr = args.lr or default_lr(args, world)
    wd = args.wd if args.wd is not None else {"sgd": 5e-4, "adamw": 0.05}[args.opt]
    if args.opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            param_groups(model, wd), lr=lr, momentum=args.momentum, nesterov=args.nesterov
        )
    else:
        optimizer = torch.optim.AdamW(param_groups(model, wd), lr=lr)
    if args.keep_zeros:
        masks = zero_masks(model)
        optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))
        logger.info("--keep-zeros: %d weight tensors keep their zeros", len(masks))
    scheduler, per_step = build_scheduler(args, optimizer, len(train_loader))
    amp_dtype = autocast_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = None
    if args.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay), use_buffers=True
        )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batch_transform = None
    mixers = []
    if args.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=args.mixup_alpha, num_classes=len(class_names)))
    if args.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix_alpha, num_classes=len(class_names)))
    if mixers:
        batch_transform = v2.RandomChoice(mixers)
    if batch_augment is not None:
        batch_transform = batch_augment.as_batch_transform(batch_transform)
    if args.distill_from:
        teacher = Teacher.from_file(
            args.distill_from, class_names, prep, device, amp_dtype=amp_dtype, channels_last=args.channels_last
        )
        batch_transform = teacher.wrap(batch_transform)
        criterion = DistillationLoss(criterion, alpha=args.distill_alpha, temperature=args.distill_temperature)

    start_epoch, best, history, stale = 0, -1.0, [], 0
    if resume_state is not None:
        r = resume_state["resume"]
        optimizer.load_state_dict(r["optimizer"])
        if scheduler is not None and r.get("scheduler"):
            scheduler.load_state_dict(r["scheduler"])
        if scaler is not None and r.get("scaler"):
            scaler.load_state_dict(r["scaler"])
        if ema is not None and r.get("ema"):
            ema.load_state_dict(r["ema"])
        start_epoch, best, history, stale = r["epoch"], r["best"], r["history"], r["stale_epochs"]
        logger.info("resumed from %s at epoch %d", args.resume, start_epoch)

    record = {
        "data": {"path": str(args.data), **splits.describe()},
        "args": plain(vars(args)),
        "versions": library_versions(),
    }
    writer = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {
            **plain(vars(args)),
            "lr": lr,
            "wd": wd,
            "workers": workers,
            "threads": threads,
            "world_size": world,
            "preprocessing": prep.to_dict(),
            "arch_kwargs": arch_kwargs,
            "data_layout": splits.layout,
        }
        (out / "args.json").write_text(json.dumps(resolved, indent=2))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        logger.info(
            "training %s on %s: %s, lr %.4g, %d epochs, device %s, %d threads, %s",
            args.arch,
            args.data,
            splits.describe(),
            lr,
            args.epochs,
            device,
            threads,
            "batches augmented on the device" if batch_augment is not None else f"{workers} workers",
        )

    progress = is_main and not args.quiet and sys.stderr.isatty()
    eval_model = ema.module if ema is not None else model
    stop = False
    stopped_by_callback = False
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        # Every epoch's randomness derives from (seed, epoch): a resumed run replays it exactly.
        seed_everything(args.seed * 1000 + epoch)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        train = train_one_epoch(
            ddp_model,
            train_loader,
            optimizer,
            criterion,
            device,
            step_scheduler=scheduler if per_step else None,
            scaler=scaler,
            amp_dtype=amp_dtype,
            ema=ema,
            batch_transform=batch_transform,
            clip_grad=args.clip_grad,
            channels_last=args.channels_last,
            progress=progress,
            description=f"epoch {epoch + 1}/{args.epochs}",
            freeze_norm=args.freeze_backbone,
        )
        if world > 1:
            train = _average_result(train, device)
        val, _ = evaluate(
            eval_model,
            val_loader,
            device,
            num_classes=len(class_names),
            channels_last=args.channels_last,
            progress=progress,
            description="validate",
        )
        if scheduler is not None and not per_step:
            scheduler.step(val.top1) if args.sched == "plateau" else scheduler.step()
        seconds = time.perf_counter() - started
        entry = {
            "epoch": epoch + 1,
            "train_loss": round(train.loss, 6),
            "train_acc": round(train.top1, 6),
            "val_loss": round(val.loss, 6),
            "val_acc": round(val.top1, 6),
            "val_top5": round(val.top5 or 0.0, 6),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 2),
        }
        history.append(entry)
        improved = val.top1 > best
        if improved:
            best, stale = val.top1, 0
        else:
            stale += 1
        epochs_run += 1
        if args.patience and stale >= args.patience:
            stop = True
        if args.stop_after and epochs_run >= args.stop_after:
            stop = True
        if is_main:
            logger.info(
                "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f top5 %.4f  lr %.3g  %.1fs",
                epoch + 1,
                args.epochs,
                train.loss,
                train.top1,
                val.loss,
                val.top1,
                val.top5 or 0,
                entry["lr"],
                seconds,
            )
            for key, value in entry.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
            bundle = make_bundle(
                arch=args.arch,
                arch_kwargs=arch_kwargs,
                class_names=class_names,
                preprocessing=prep,
                state_dict=eval_model.state_dict(),
                training={
                    **record,
                    "date": now_iso(),
                    "epoch": epoch + 1,
                    "metrics": {"val_top1": val.top1, "val_top5": val.top5, "val_loss": val.loss},
                    "history": history,
                },
            )
            if improved:
                atomic_torch_save(bundle.to_dict(), out / "best.pth")
            last = bundle.to_dict()
            last["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            last["resume"] = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "stale_epochs": stale,
                "rng": {"torch": torch.get_rng_state()},
            }
            atomic_torch_save(last, out / "last.pth")
            (out / "history.json").write_text(json.dumps(history, indent=2))
            plot_curves(history, out / "curves.png")
        if epoch_callback is not None and epoch_callback(entry):
            stop = stopped_by_callback = True
        if stop:
            break
    result: dict[str, Any] = {"history": history, "best_val_top1": best, "stopped_by_callback": stopped_by_callback}
    if is_main:
        writer.close()
        finished = not args.stop_after or len(history) >= args.epochs or (args.patience and stale >= args.patience)
        finished = finished and not stopped_by_callback
        if finished and (out / "best.pth").exists():
            result["eval"] = final_evaluation(out, splits, device, workers, args)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def final_evaluation(
    out: Path, splits: Splits, device: torch.device, workers: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Evaluate best.pth on the test split (val when there is none) and store the figures in it."""
    bundle, model = load_bundle(out / "best.pth")
    split = "test" if splits.test else "val"
    samples = splits.test or splits.val or splits.train
    metrics = write_report(
        model.to(device),
        bundle,
        samples,
        out / "eval",
        device=device,
        batch_size=args.batch_size,
        workers=workers,
        split=split,
    )
    scores = {**bundle.training["metrics"], f"{split}_top1": metrics["top1"], f"{split}_top5": metrics["top5"]}
    save_bundle(dataclasses.replace(bundle, training={**bundle.training, "metrics": scores}), out / "best.pth")
    logger.info(
        "best model on the %s split (%d images): top-1 %.4f, top-5 %.4f; report in %s",
        split,
        metrics["samples"],
        metrics["top1"],
        metrics["top5"],
        out / "eval",
    )
    return metrics


def _average_result(result: Any, device: torch.device) -> Any:
    t = torch.tensor(
        [result.loss * result.samples, result.top1 * result.samples, result.samples], dtype=torch.float64, device=device
    )
    dist.all_reduce(t)
    result.loss = float(t[0] / t[2])
    result.top1 = float(t[1] / t[2])
    result.samples = int(t[2])
    return result


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    main(get_args_parser().parse_args())
