"""Decoding untrusted image bytes with Pillow, safely and quickly.

Every failure is an ``ImageDecodeError`` carrying a stable ``code`` the service maps to a status:
the bytes are read from memory (uploads never touch the disk and file names are never paths),
truncated files are rejected (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off), Pillow's
decompression-bomb guard stays on and a lower per-call pixel limit is checked from the header before
any pixel is decoded. Large JPEGs are decoded at a reduced scale with ``draft()`` when the model
needs far fewer pixels.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
# File names taken for images when a folder is listed (training data, calibration, parity photos).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; ``code`` is one of: not_an_image, unsupported_format,
    corrupt_image, too_many_pixels."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image(
    data: bytes | BinaryIO | str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode bytes (or a file) into a loaded Pillow image, upright, first frame only.

    ``draft_size``: the smallest side the caller will resize to; JPEGs much larger than that are
    decoded at 1/2, 1/4 or 1/8 scale, never below it.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("empty_file", "the file is empty")
        fp: BinaryIO | str | os.PathLike[str] = io.BytesIO(data)
    else:
        fp = data
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises only above twice that: treat both as errors.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageDecodeError("not_an_image", "the file is not an image Pillow can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_many_pixels", "the image has too many pixels") from None
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, EOFError, IndexError, struct.error) as exc:
            raise ImageDecodeError("corrupt_image", f"the image header is invalid: {_short(exc)}") from None
        if img.format not in ACCEPTED_FORMATS:
            raise ImageDecodeError(
                "unsupported_format", f"{img.format} images are not accepted (JPEG, PNG, WebP, GIF, BMP, TIFF are)"
            )
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageDecodeError("corrupt_image", "the image has no pixels")
        if width * height > max_pixels:
            raise ImageDecodeError(
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
            )
        try:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if draft_size and img.format == "JPEG" and min(width, height) >= 2 * draft_size:
                img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_many_pixels", "the image has too many pixels") from None
        # TypeError/KeyError: Pillow's TIFF reader on a broken later page (found by fuzzing; was a 500)
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, EOFError, IndexError, struct.error) as exc:
            raise ImageDecodeError("corrupt_image", f"the image data is truncated or corrupt: {_short(exc)}") from None
    return img


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
