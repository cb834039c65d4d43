"""The eval preprocessing in Pillow and numpy, without torch: the one definition of what a model sees.

    decoded image (``model.images``; a large JPEG already drafted to the smallest DCT scale that still
    covers the resize) -> the model's mode ('L' or 'RGB': transparency on white, 16-bit and float
    greys scaled) -> the long side cut to 16x the short one -> the centre crop's box resized straight
    to crop x crop -> uint8 array (C, crop, crop)

Resizing only the crop's box gives the pixels of "resize the short side to ``resize``, then take the
centre ``crop``" (torchvision's ``Resize`` + ``CenterCrop``) without making the rows and columns the
crop throws away; the normalisation ``(x / 255 - mean) / std`` is the model's own first step
(``model.normalization``), inside the exported graph. The service, the predict CLI, training's
evaluation and the export's parity check all go through ``prepare``; a serving worker needs nothing
but Pillow and numpy for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from model.preprocessing import Preprocessing

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


# Above this downscale factor Pillow first shrinks by an integer factor with ``Image.reduce`` (a box
# filter over whole blocks) and resamples the rest: far fewer filter taps, and Pillow's documentation
# calls a gap of 3 indistinguishable from a full resample.
REDUCING_GAP = 3.0


def centre_crop_box(size: tuple[int, int], prep: Preprocessing) -> tuple[float, float, float, float]:
    """The source box that "resize the short side to ``prep.resize``, centre-crop ``prep.crop``" keeps.

    The crop's offsets are torchvision's ``CenterCrop`` ones (rounded, in resized pixels), scaled back
    to the source, so resizing this box to crop x crop samples the same points as resizing the whole
    image and cropping it.
    """
    width, height = size
    out_width, out_height = resized_size(size, prep.resize)
    left = int(round((out_width - prep.crop) / 2.0))
    top = int(round((out_height - prep.crop) / 2.0))
    sx, sy = width / out_width, height / out_height
    return (left * sx, top * sy, (left + prep.crop) * sx, (top + prep.crop) * sy)


def eval_geometry(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """A decoded image -> the model's mode and size (crop x crop), as a Pillow image."""
    resample = _RESAMPLE[prep.interpolation]
    if _worth_converting_in_strips(img, prep.channels):
        # a large image whose conversion or cut would copy it whole: converted strip by strip on its
        # way down to the resized size, then cropped (the resized image is small)
        small = to_model_size(img, prep.channels, prep.resize, prep.interpolation)
        left = int(round((small.width - prep.crop) / 2.0))
        top = int(round((small.height - prep.crop) / 2.0))
        return small.crop((left, top, left + prep.crop, top + prep.crop))
    img = to_model_mode(img, prep.channels)
    cut = aspect_ratio_box(img.size)
    if cut is not None:
        img = img.crop(cut)
    return img.resize((prep.crop, prep.crop), resample, box=centre_crop_box(img.size, prep), reducing_gap=REDUCING_GAP)


def to_array(img: Image.Image) -> np.ndarray:
    """A Pillow image in 'L' or 'RGB' -> uint8 array (C, H, W) (a view of one copy of its bytes)."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def prepare(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded image -> uint8 array (C, crop, crop): what the model's input takes, before normalising."""
    return to_array(eval_geometry(img, prep))


def prepare_batch(images: Sequence[Image.Image], prep: Preprocessing) -> np.ndarray:
    """Decoded images -> one contiguous uint8 batch (N, C, crop, crop)."""
    if not images:
        raise ValueError("no images")
    return np.stack([prepare(img, prep) for img in images])
