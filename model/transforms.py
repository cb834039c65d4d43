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


# Modes whose 8-bit conversion needs the value range of the whole image.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# The long side of an image is cut to this many times its short side before the resize (LimitAspectRatio).
MAX_ASPECT_RATIO = 16
# Pixels converted at a time when a large image is converted on its way down to the model's size: the
# temporaries of one strip (a crop, its float or composited copy) stay a few MiB whatever the image size.
STRIP_PIXELS = 1 << 18
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class ToModelMode:
    """Convert any Pillow mode to what the model takes: 'L' for 1 channel, 'RGB' for 3.

    Transparency is composited on white (a transparent background should not read as black), CMYK is
    converted, 16-bit and float greys are scaled to 8 bits, 1-bit images become 0/255.

    With ``resize`` (the eval geometry gives it), an image whose conversion or aspect-ratio cut would
    make a full-size copy (a 40 MP RGBA or 16-bit PNG: hundreds of MB) is converted strip by strip
    on its way down to the model's size instead (``to_model_size``): the same pixels, bit for bit, as
    this conversion followed by ``LimitAspectRatio`` and the resize, which then have nothing left to do.
    """

    def __init__(self, channels: int, resize: int | None = None, interpolation: str = "bilinear") -> None:
        if channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}")
        self.channels = channels
        self.resize = resize
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.resize is not None and _worth_converting_in_strips(img, self.channels):
            return to_model_size(img, self.channels, self.resize, self.interpolation)
        return to_model_mode(img, self.channels)

    def __repr__(self) -> str:
        size = "" if self.resize is None else f", resize={self.resize}, interpolation={self.interpolation!r}"
        return f"{type(self).__name__}(channels={self.channels}{size})"


def to_model_mode(img: Image.Image, channels: int, *, value_range: tuple[float, float] | None = None) -> Image.Image:
    """``value_range``: the (min, max) of the whole image when ``img`` is a strip of a 16-bit or float one."""
    target = "L" if channels == 1 else "RGB"
    if img.mode in HIGH_BIT_DEPTH_MODES:
        img = _high_bit_depth_to_l(img, value_range)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        img = composite_on_white(img)
    if img.mode != target:
        img = img.convert(target)
    return img


def _high_bit_depth_to_l(img: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """16-bit, 32-bit integer or float grey -> 8-bit 'L', in float32 and in place.

    Integers above 255 are taken as 16-bit (divided by 257); floats are stretched from their minimum to
    their maximum (those of the whole image: ``value_range``, when ``img`` is a strip of it).
    """
    arr = np.asarray(img, dtype=np.float32)
    if not arr.flags.writeable:  # a float image's array shares Pillow's bytes
        arr = arr.copy()
    lo, hi = value_range if value_range is not None else (float(arr.min()), float(arr.max()))
    if img.mode == "F":
        if hi > lo and np.isfinite(hi - lo):
            arr -= lo
            arr *= 255.0 / (hi - lo)
        else:
            arr[...] = 0
    elif hi > 255:
        arr /= 257.0
    np.nan_to_num(arr, copy=False)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def composite_on_white(img: Image.Image) -> Image.Image:
    """A transparent image over white: 'RGB' (or 'L' for grey with alpha).

    Pasting through the alpha band gives the same pixels as ``Image.alpha_composite`` over opaque
    white, with one new image and the alpha band instead of three full-size RGBA copies.
    """
    if img.mode not in ("RGBA", "LA"):
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    base = "RGB" if img.mode == "RGBA" else "L"
    out = Image.new(base, img.size, (255, 255, 255) if base == "RGB" else 255)
    out.paste(img if base == "RGB" else img.getchannel("L"), mask=img.getchannel("A"))
    return out


def aspect_ratio_box(size: tuple[int, int], max_ratio: int = MAX_ASPECT_RATIO) -> tuple[int, int, int, int] | None:
    """The centre box whose long side is at most ``max_ratio`` times the short side; None if the image fits."""
    width, height = size
    short, long = min(width, height), max(width, height)
    if long <= max_ratio * short:
        return None
    keep = max_ratio * short
    start = (long - keep) // 2
    return (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)


def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) after ``v2.Resize(resize)``: the short side becomes ``resize`` (torchvision's rule)."""
    width, height = size
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _worth_converting_in_strips(img: Image.Image, channels: int) -> bool:
    """A large image that the conversion or the aspect-ratio cut would copy whole."""
    if img.width * img.height <= STRIP_PIXELS:
        return False
    return img.mode != ("L" if channels == 1 else "RGB") or aspect_ratio_box(img.size) is not None


def to_model_size(img: Image.Image, channels: int, resize: int, interpolation: str = "bilinear") -> Image.Image:
    """``Resize(resize)(LimitAspectRatio()(to_model_mode(img)))``, bit for bit, without a full-size copy.

    Pillow resizes in two passes, the horizontal one first, and keeps 8 bits between them. Here each
    strip of rows is converted and resized horizontally on its own (each row's result depends on that
    row only), the strips make one image of the final width and full height, and the vertical pass runs
    on that: the same passes on the same values. Only one strip is ever converted at a time.
    """
    left, top, right, bottom = aspect_ratio_box(img.size) or (0, 0, *img.size)
    width, height = right - left, bottom - top
    out_width, out_height = resized_size((width, height), resize)
    resample = _RESAMPLE[interpolation]
    value_range = _value_range(img) if img.mode in HIGH_BIT_DEPTH_MODES else None
    narrow = Image.new("L" if channels == 1 else "RGB", (out_width, height))
    rows = max(1, STRIP_PIXELS // width)
    for y in range(top, bottom, rows):
        strip = to_model_mode(img.crop((left, y, right, min(y + rows, bottom))), channels, value_range=value_range)
        narrow.paste(strip.resize((out_width, strip.height), resample), (0, y - top))
    return narrow.resize((out_width, out_height), resample)


def _value_range(img: Image.Image) -> tuple[float, float]:
    """(min, max) of a 16-bit or float image, without a full-size copy."""
    if img.mode in ("I;16", "I", "F"):
        lo, hi = img.getextrema()
        return float(lo), float(hi)
    rows = max(1, STRIP_PIXELS // img.width)  # I;16B and friends: Pillow has no extrema for them
    parts = [np.asarray(img.crop((0, y, img.width, min(y + rows, img.height)))) for y in range(0, img.height, rows)]
    return float(min(p.min() for p in parts)), float(max(p.max() for p in parts))


class LimitAspectRatio:
    """Cut the long side of extreme images to ``max_ratio`` times the short side, around the centre.

    The eval transform resizes the short side to ``resize`` and keeps the centre: on a 1x10000 image that
    first made a 256x2,560,000 picture (2.6 GB and 12 s for one request) to keep 224x224 of it. The
    centre crop only ever uses the central short side's worth of the long side, so cutting to 16x the
    short side keeps those pixels, and the resize filter's support around them; ordinary photos (up to
    16:1) are not touched.
    """

    def __init__(self, max_ratio: int = MAX_ASPECT_RATIO) -> None:
        if max_ratio < 1:
            raise ValueError("max_ratio must be at least 1")
        self.max_ratio = max_ratio

    def __call__(self, img: Image.Image) -> Image.Image:
        box = aspect_ratio_box(img.size, self.max_ratio)
        return img if box is None else img.crop(box)

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
            ToModelMode(prep.channels, resize=prep.resize, interpolation=prep.interpolation),
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
