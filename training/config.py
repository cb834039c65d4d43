"""The configuration a run trains with: every option of training.train with nothing left to decide.

``TrainConfig`` is built once, from the parsed flags (``from_args``) or from a mapping of the same names
(``from_options``: tune and compare build theirs in code), and never changes afterwards. What the flags
leave open is settled here, in one place: the architecture and weights ``--init-from`` brings, the
pretrained default, the preprocessing (from the weights, the data, the bundle or the resumed run), the
learning rate and weight decay, workers and threads, the crop mode, the memory format and the autocast
type (training.precision). The run folder's args.json is ``to_dict()``; bundles record ``options()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from model.bundle import plain, read_bundle
from model.predictor import available_cpus
from model.preprocessing import Preprocessing
from model.registry import AUXILIARY, IMAGENET_MEAN, IMAGENET_STD, check_input_size, pretrained_preprocessing
from model.torch_predictor import resolve_device
from model.transforms import TrainAugment
from training import flags
from training.checkpoint import read_resume
from training.data import Splits, find_splits, image_statistics
from training.precision import autocast_dtype

logger = logging.getLogger(__name__)

# architectures whose compute is attention, not convolutions: channels_last does nothing for them
TRANSFORMER_PREFIXES = ("vit_", "swin_")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training option, resolved; the trailing fields are facts the options and the data imply."""

    # data
    data: str
    val_split: float
    test_split: float
    per_class: int | None
    img_size: int
    resize: int
    channels: int
    workers: int
    cache: bool
    batch_aug: bool
    balance: bool
    class_weights: str
    # model
    arch: str
    arch_kwargs: dict[str, Any]
    pretrained: str
    weights_file: str | None
    freeze_backbone: bool
    unfreeze_at: int | None
    backbone_lr_scale: float
    keep_norm_stats: bool
    init_from: str | None
    keep_zeros: bool
    distill_from: str | None
    distill_alpha: float
    distill_temperature: float
    # optimisation
    epochs: int
    batch_size: int
    opt: str
    lr: float
    momentum: float
    nesterov: bool
    wd: float
    sched: str
    warmup_epochs: float
    step_size: int
    gamma: float
    label_smoothing: float
    mixup_alpha: float
    cutmix_alpha: float
    ema_decay: float
    clip_grad: float
    amp: str
    patience: int
    # augmentation
    crop: str
    min_scale: float
    pad: int
    hflip: float
    auto_augment: str
    color_jitter: float
    random_erasing: float
    rotation: float
    vflip: float
    hue: float
    # run
    config: str | None
    out: str
    resume: str | None
    seed: int
    deterministic: bool
    device: str
    threads: int
    channels_last: bool
    stop_after: int | None
    quiet: bool
    # implied
    world_size: int
    amp_dtype: str | None
    preprocessing: Preprocessing
    data_layout: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, splits: Splits | None = None) -> TrainConfig:
        return cls.from_options(vars(args), splits)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], splits: Splits | None = None) -> TrainConfig:
        """Resolve ``options`` (flag names; missing ones take the flags' defaults) on ``splits`` (found if None)."""
        o = {**flags.defaults(), **options}
        try:
            flags.check_options(o, "training options")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        for required in ("data", "out"):
            if not o[required]:
                raise SystemExit(f"training options: {required} is required")
        check_fine_tuning(o)
        o.update(model_source(o))
        splits = splits or splits_for(o)
        prep = resolve_preprocessing(o, splits)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(**{
            **o,
            **input_options(o, prep),
            "lr": o["lr"] or default_lr(o, world),
            "wd": o["wd"] if o["wd"] is not None else {"sgd": 5e-4, "adamw": 0.05}[o["opt"]],
            **machine_options(o, world),
            "preprocessing": prep,
            "data_layout": splits.layout,
        })  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """A config saved by ``to_dict`` (args.json), as it was."""
        # args.json written before an option existed holds its default (the behaviour the run had)
        known = {**flags.defaults(), **d}
        values = {f.name: known[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**values, "preprocessing": Preprocessing.from_dict(values["preprocessing"])})

    def to_dict(self) -> dict[str, Any]:
        return plain({**dataclasses.asdict(self), "preprocessing": self.preprocessing.to_dict()})

    def options(self) -> dict[str, Any]:
        """The flags' values as this run resolved them (bundles keep these as their training record)."""
        names = flags.defaults()
        return {name: value for name, value in self.to_dict().items() if name in names}

    def backbone_frozen(self, epoch: int) -> bool:
        """Whether the backbone trains in ``epoch`` (0-based): frozen before --unfreeze-at, or throughout
        with --freeze-backbone alone."""
        if self.unfreeze_at is not None:
            return epoch + 1 < self.unfreeze_at
        return self.freeze_backbone

    @property
    def splits_backbone(self) -> bool:
        """The optimizer keeps the backbone's parameters in groups of their own (their own lr, frozen at first)."""
        return self.unfreeze_at is not None or self.backbone_lr_scale != 1.0

    @property
    def autocast(self) -> torch.dtype | None:
        return getattr(torch, self.amp_dtype) if self.amp_dtype else None

    @property
    def augment(self) -> TrainAugment:
        return TrainAugment(
            crop=self.crop,
            min_scale=self.min_scale,
            pad=self.pad,
            hflip=self.hflip,
            auto_augment=self.auto_augment,
            color_jitter=self.color_jitter,
            random_erasing=self.random_erasing,
            rotation=self.rotation,
            vflip=self.vflip,
            hue=self.hue,
        )


def splits_for(options: Mapping[str, Any]) -> Splits:
    """The train/val/test samples ``options`` (flag names, defaults for the missing ones) describe."""
    o = {**flags.defaults(), **options}
    if o["per_class"] is not None and o["per_class"] < 1:
        raise SystemExit(f"--per-class {o['per_class']}: must be 1 or more (images of each class to train on)")
    return find_splits(
        o["data"], val_split=o["val_split"], test_split=o["test_split"], seed=o["seed"], per_class=o["per_class"]
    )


def check_fine_tuning(o: Mapping[str, Any]) -> None:
    """--unfreeze-at needs a frozen phase and a trained one within the run; the lr scale must be a scale."""
    if o["unfreeze_at"] is not None and not 2 <= o["unfreeze_at"] <= o["epochs"]:
        raise SystemExit(
            f"--unfreeze-at {o['unfreeze_at']}: must be an epoch from 2 to --epochs ({o['epochs']}), so that"
            " the head trains alone first and the whole network after"
        )
    if o["backbone_lr_scale"] <= 0:
        raise SystemExit(f"--backbone-lr-scale {o['backbone_lr_scale']}: must be above 0 (1: the head's lr)")


def model_source(o: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture, its arguments and the starting weights; ``--init-from`` takes them from a bundle."""
    kwargs = json.loads(o["arch_kwargs"]) if isinstance(o["arch_kwargs"], str) else dict(o["arch_kwargs"])
    if not isinstance(kwargs, dict):
        raise SystemExit("--arch-kwargs must be a JSON object")
    if o["weights_file"] and o["pretrained"] == "imagenet":
        raise SystemExit("--weights-file replaces the ImageNet weights: drop --pretrained imagenet (or give none)")
    # a weights file is the starting point: nothing else is fetched (offline for every architecture)
    implied = "none" if o["arch"] == "simple_cnn" or o["weights_file"] else "imagenet"
    pretrained = o["pretrained"] or implied
    source = {"arch": o["arch"], "arch_kwargs": kwargs, "pretrained": pretrained, "weights_file": o["weights_file"]}
    if not o["init_from"]:
        return source
    if o["weights_file"]:
        raise SystemExit("--init-from cannot be combined with --weights-file")
    bundle = read_bundle(o["init_from"])
    if o["arch"] != bundle.arch:
        logger.info("--init-from %s: architecture %s", o["init_from"], bundle.arch)
    kwargs = {k: v for k, v in bundle.arch_kwargs.items() if k != "in_channels"}
    # resuming, the weights come from last.pth
    weights = None if o["resume"] else o["init_from"]
    return {"arch": bundle.arch, "arch_kwargs": kwargs, "pretrained": "none", "weights_file": weights}


def resolve_preprocessing(o: Mapping[str, Any], splits: Splits) -> Preprocessing:
    """The eval preprocessing stored in the bundle: the resumed run's, the ``--init-from`` bundle's, or new."""
    if o["resume"]:
        state = read_resume(o["resume"])
        if state["class_names"] != splits.class_names:
            raise SystemExit(f"{o['resume']}: its classes differ from those found in {o['data']}")
        return Preprocessing.from_dict(state["preprocessing"])
    if o["init_from"]:
        return read_bundle(o["init_from"]).preprocessing
    return new_preprocessing(o, splits)


def new_preprocessing(o: Mapping[str, Any], splits: Splits) -> Preprocessing:
    """From the flags, the pretrained weights' own preprocessing, and the training images' statistics."""
    pretrained = o["pretrained"] != "none" or bool(o["weights_file"])
    native = pretrained_preprocessing(o["arch"])
    stats = image_statistics(splits.train, channels=o["channels"], seed=o["seed"])
    if native is not None and (pretrained or o["arch"] != "simple_cnn"):
        crop = o["img_size"] or native.crop
        channels = 3
        mean, std = native.mean, native.std
        interpolation = native.interpolation
        if not pretrained:
            mean, std = _colour_stats(stats)
    else:
        crop = o["img_size"] or min(stats["median_short_side"], 224)
        channels = o["channels"] or (1 if stats["grey"] else 3)
        mean, std = (stats["mean"], stats["std"]) if channels == len(stats["mean"]) else _colour_stats(stats)
        if channels == 1 and len(mean) == 3:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        interpolation = "bilinear"
    resize = o["resize"] or (crop if crop < 64 else int(round(crop / 0.875)))
    return Preprocessing(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation, channels=channels)


def input_options(o: Mapping[str, Any], prep: Preprocessing) -> dict[str, Any]:
    """The flags about the network's input, as the preprocessing settled them."""
    return {
        "arch_kwargs": _with_auxiliary(o, _with_image_size(o["arch"], o["arch_kwargs"], prep.crop), prep),
        "img_size": prep.crop,
        "resize": prep.resize,
        "channels": prep.channels,
        "crop": TrainAugment(crop=o["crop"]).resolved_crop(prep),
    }


def machine_options(o: Mapping[str, Any], world: int) -> dict[str, Any]:
    """Device, processes, threads, workers, memory format and autocast type on this machine."""
    device = resolve_device(o["device"]).type
    if o["batch_aug"]:
        workers = 0  # indexing a tensor needs no worker; evaluating cached images needs none either
    else:
        workers = o["workers"] if o["workers"] is not None else default_workers(world)
    return {
        "device": device,
        "world_size": world,
        "threads": o["threads"] or max(1, available_cpus() // world),
        "workers": workers,
        "channels_last": o["channels_last"] if o["channels_last"] is not None else default_channels_last(o, device),
        "amp_dtype": _dtype_name(autocast_dtype(o["amp"], torch.device(device))),
    }


def _colour_stats(stats: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    mean, std = stats["mean"], stats["std"]
    return (mean * 3, std * 3) if len(mean) == 1 else (mean, std)


def _with_image_size(arch: str, kwargs: dict[str, Any], crop: int) -> dict[str, Any]:
    """ViTs and EfficientNet-Lite are built for one input size: the crop's."""
    if (arch.startswith("vit_") and crop != 224) or arch.startswith("efficientnet_lite"):
        return {**kwargs, "image_size": kwargs.get("image_size", crop)}
    return kwargs


def _with_auxiliary(o: Mapping[str, Any], kwargs: dict[str, Any], prep: Preprocessing) -> dict[str, Any]:
    """GoogLeNet and Inception v3: ``transform_input`` and ``aux_logits`` settled here and recorded in the
    run's arguments, so every model built from them (resumed, evaluated, served) is the same network.

    ``transform_input`` (registry._build_auxiliary says why) is on when the run starts from ImageNet
    weights or a weights file, whose preprocessing is then torchvision's, normalised with ImageNet's
    mean and std: the only normalisation the flag's rescaling is right for, so any other is refused with
    it. The auxiliary classifiers train wherever the input is large enough for them (Inception v3's
    needs 299 px; below, it is left out, and said so); ``--arch-kwargs`` can set either.
    """
    arch = o["arch"]
    if arch not in AUXILIARY:
        return kwargs
    fits_aux = prep.crop >= AUXILIARY[arch].min_aux_size
    if not fits_aux and "aux_logits" not in kwargs:
        logger.info("%s trains without its auxiliary classifier: it needs %d px inputs, the crop is %d",
                    arch, AUXILIARY[arch].min_aux_size, prep.crop)  # fmt: skip
    loaded = o["pretrained"] != "none" or bool(o["weights_file"])
    kwargs = {"transform_input": loaded, "aux_logits": fits_aux, **kwargs}
    try:
        check_input_size(arch, prep.crop, aux_logits=kwargs["aux_logits"])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    normalisation = (*prep.mean, *prep.std)
    imagenet = len(normalisation) == 6 and all(map(math.isclose, normalisation, (*IMAGENET_MEAN, *IMAGENET_STD)))
    if kwargs["transform_input"] and not imagenet:
        raise SystemExit(
            f"{arch}: transform_input rescales inputs normalised with ImageNet's mean and std, but this run's "
            f"preprocessing normalises with mean {list(prep.mean)} and std {list(prep.std)}: drop transform_input"
        )
    return kwargs


def default_lr(o: Mapping[str, Any], world: int) -> float:
    scratch = o["pretrained"] == "none" and not o["weights_file"]
    base = {"sgd": 0.1 if scratch else 0.01, "adamw": 2e-3 if scratch else 5e-4}[o["opt"]]
    return base * o["batch_size"] * world / 128


def default_workers(world: int) -> int:
    return max(0, min(8, available_cpus() // world - 1))


def default_channels_last(o: Mapping[str, Any], device: str) -> bool:
    """On CUDA, convolutions in channels_last run on the tensor cores without transposes (NVIDIA's
    recommendation for mixed precision); transformers gain nothing. On CPU, measure first (bench.train_step)."""
    return device == "cuda" and not o["arch"].startswith(TRANSFORMER_PREFIXES)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None
