"""torchvision transforms built from a bundle's ``Preprocessing``, for training's float batches.

The eval geometry is ``model.pixels.eval_geometry`` (the one definition the service uses too); the eval
transform adds torchvision's uint8 -> float scaling and normalisation, the same arithmetic as the
model's own ``NormalizedInput``. Training augmentations come from flags (``TrainAugment``) but start
from the same mode conversion and end in the same dtype and normalisation, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from model.pixels import ToModelMode, eval_geometry
from model.preprocessing import Preprocessing

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment", "autoaugment")
CROP_MODES = ("auto", "random-resized", "pad", "center")


def _interpolation(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(name)


def _to_normalized_float(prep: Preprocessing) -> list[Callable[..., Any]]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(prep.mean), std=list(prep.std))]


def _normalize_tail(prep: Preprocessing) -> list[Callable[..., Any]]:
    return [v2.PILToTensor(), *_to_normalized_float(prep)]


class EvalGeometry:
    """``model.pixels.eval_geometry`` as a transform: PIL image -> the model's mode and size (crop x crop)."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep

    def __call__(self, img: Image.Image) -> Image.Image:
        return eval_geometry(img, self.prep)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.prep.resize}, crop={self.prep.crop})"


def build_eval_geometry(prep: Preprocessing) -> v2.Compose:
    """PIL image -> PIL image of the model's mode and size (crop x crop): the eval transform's first half."""
    return v2.Compose([EvalGeometry(prep)])


def build_eval_transform(prep: Preprocessing) -> v2.Compose:
    """PIL image -> normalised float tensor (C, crop, crop), exactly as the bundle says."""
    return v2.Compose([*build_eval_geometry(prep).transforms, *_normalize_tail(prep)])


def build_normalize(prep: Preprocessing) -> v2.Compose:
    """uint8 tensor (..., C, H, W) -> normalised float tensor: the eval transform's last steps, for batches."""
    return v2.Compose(_to_normalized_float(prep))


@dataclass
class TrainAugment:
    """Training augmentation settings (the flags of training.train)."""

    crop: str = "auto"
    min_scale: float = 0.25
    pad: int = 2
    hflip: float = 0.5
    auto_augment: str = "none"
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    rotation: float = 0.0  # degrees: a random angle in [-rotation, rotation]
    vflip: float = 0.0
    hue: float = 0.0  # colour images only: a hue shift in [-hue, hue] of the colour circle (at most 0.5)

    def resolved_crop(self, prep: Preprocessing) -> str:
        if self.crop != "auto":
            return self.crop
        return "pad" if prep.crop < 64 else "random-resized"


def build_train_transform(prep: Preprocessing, aug: TrainAugment) -> v2.Compose:
    if aug.crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}")
    if aug.auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"auto_augment must be one of {AUTO_AUGMENTS}")
    if aug.hue > 0 and prep.channels != 3:
        raise ValueError(f"--hue needs colour input (3 channels); this model takes {prep.channels}")
    interp = _interpolation(prep.interpolation)
    steps: list[Callable[..., Any]] = [ToModelMode(prep.channels)]
    crop = aug.resolved_crop(prep)
    if crop == "random-resized":
        steps.append(v2.RandomResizedCrop(prep.crop, scale=(aug.min_scale, 1.0), interpolation=interp, antialias=True))
    else:
        steps += [v2.Resize(prep.resize, interpolation=interp, antialias=True), v2.CenterCrop(prep.crop)]
        if crop == "pad" and aug.pad > 0:
            steps.append(v2.RandomCrop(prep.crop, padding=aug.pad, padding_mode="reflect"))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotation > 0:  # after the crop: it turns a crop-sized image, not the whole photo (corners fill black)
        steps.append(v2.RandomRotation(aug.rotation, interpolation=interp))
    if aug.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    elif aug.auto_augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=interp))
    elif aug.auto_augment == "autoaugment":
        steps.append(v2.AutoAugment(interpolation=interp))
    if aug.color_jitter > 0 or aug.hue > 0:
        j, colour = aug.color_jitter, prep.channels == 3
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if colour else 0, hue=aug.hue))
    steps += _normalize_tail(prep)
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing))
    return v2.Compose(steps)
