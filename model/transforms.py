"""Transforms built from a bundle's ``Preprocessing``: the eval transform is made here and nowhere else.

Training augmentations come from flags (``TrainAugment``) but end in the same channel conversion,
dtype and normalisation as the eval transform, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from model.preprocessing import Preprocessing

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment", "autoaugment")
CROP_MODES = ("auto", "random-resized", "pad", "center")


class ToModelMode:
    """Convert any Pillow mode to what the model takes: 'L' for 1 channel, 'RGB' for 3.

    Transparency is composited on white (a transparent background should not read as black), CMYK is
    converted, 16-bit and float greys are scaled to 8 bits, 1-bit images become 0/255.
    """

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        self.channels = channels

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_model_mode(img, self.channels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    target = "L" if channels == 1 else "RGB"
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != target:
        img = img.convert(target)
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        arr = arr / 257.0 if arr.max() > 255 else arr
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


class LimitAspectRatio:
    """Cut the long side of extreme images to ``max_ratio`` times the short side, around the centre.

    The eval transform resizes the short side to ``resize`` and keeps the centre: on a 1x10000 image that
    first made a 256x2,560,000 picture (2.6 GB and 12 s for one request) to keep 224x224 of it. The
    centre crop only ever uses the central short side's worth of the long side, so cutting to 16x the
    short side keeps those pixels, and the resize filter's support around them; ordinary photos (up to
    16:1) are not touched.
    """

    def __init__(self, max_ratio: int = 16) -> None:
        if max_ratio < 1:
            raise ValueError("max_ratio must be at least 1")
        self.max_ratio = max_ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        short, long = min(width, height), max(width, height)
        if long <= self.max_ratio * short:
            return img
        keep = self.max_ratio * short
        start = (long - keep) // 2
        box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
        return img.crop(box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio})"


def _interpolation(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(name)


def _to_normalized_float(prep: Preprocessing) -> list[Callable[..., Any]]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(prep.mean), std=list(prep.std))]


def _normalize_tail(prep: Preprocessing) -> list[Callable[..., Any]]:
    return [v2.PILToTensor(), *_to_normalized_float(prep)]


def build_eval_geometry(prep: Preprocessing) -> v2.Compose:
    """PIL image -> PIL image of the model's mode and size (crop x crop): the eval transform's first half."""
    return v2.Compose(
        [
            ToModelMode(prep.channels),
            LimitAspectRatio(),
            v2.Resize(prep.resize, interpolation=_interpolation(prep.interpolation), antialias=True),
            v2.CenterCrop(prep.crop),
        ]
    )


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

    def resolved_crop(self, prep: Preprocessing) -> str:
        if self.crop != "auto":
            return self.crop
        return "pad" if prep.crop < 64 else "random-resized"


def build_train_transform(prep: Preprocessing, aug: TrainAugment) -> v2.Compose:
    if aug.crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}")
    if aug.auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"auto_augment must be one of {AUTO_AUGMENTS}")
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
    if aug.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=interp))
    elif aug.auto_augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=interp))
    elif aug.auto_augment == "autoaugment":
        steps.append(v2.AutoAugment(interpolation=interp))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if prep.channels == 3 else 0))
    steps += _normalize_tail(prep)
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing))
    return v2.Compose(steps)
