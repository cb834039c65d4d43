"""Decoding untrusted image bytes with Pillow, safely, quickly and at a bounded cost.

Every failure is an ``ImageDecodeError`` carrying a stable ``code`` the service maps to a status:
the bytes are read from memory (uploads never touch the disk and file names are never paths), only
the accepted formats' readers decode them (another format is only recognised, to name it in the
error), truncated files are rejected
(``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off), Pillow's decompression-bomb guard stays on and a
lower per-call pixel limit is checked from the header before any pixel is decoded.

The cost of a request is bounded before the expensive step: ``open_image`` reads the header only
(size, format, and for a JPEG the number of scans, each of which makes libjpeg walk the whole image),
so a caller can add up the pixels of several files before decoding any, and ``load_image`` decodes
frame 0 only: nothing walks the other pages of a TIFF (Pillow's page lookup is a linear search, so
``n_frames`` alone is quadratic in the pages) or the frames of a GIF. Large JPEGs are decoded at a
reduced scale with ``draft()`` when the model needs far fewer pixels; other formats are decoded whole,
and model.transforms converts them strip by strip on the way down to the model's size.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
# File names taken for images when a folder is listed (training data, calibration, parity photos).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The readers Pillow may run on the bytes (MPO files come from the JPEG reader, which is tried first).
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# libjpeg walks every block of the image once per scan (and keeps all coefficients in memory for a
# progressive file), so a few hundred bytes of repeated scans cost seconds. Encoders write far fewer:
# libjpeg's and mozjpeg's progressive scripts have at most about 10 scans (6 for greyscale), one per
# component for baseline. 100 leaves ten times that room; at the 40 MP limit it costs well under a
# second of CPU.
MAX_JPEG_SCANS = 100
# Segments (markers) walked while counting scans: a real JPEG has tens (APPn, DQT, DHT, SOF, SOS...);
# the cap keeps the count itself cheap on a file of nothing but empty segments.
MAX_JPEG_SEGMENTS = 4_000
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, EOFError, IndexError, struct.error)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; ``code`` is one of: empty_file, not_an_image,
    unsupported_format, corrupt_image, too_many_pixels, too_many_scans."""

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
    return load_image(open_image(data, max_pixels=max_pixels), draft_size=draft_size)


def open_image(data: bytes | BinaryIO | str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and check the header only: an accepted format, at most ``max_pixels``, and for a JPEG at
    most ``MAX_JPEG_SCANS`` scans. No pixel is decoded; ``load_image`` does that."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("empty_file", "the file is empty")
        if data[:2] == b"\xff\xd8":  # before Pillow's JPEG reader, which walks the header segments in Python
            _check_jpeg_scans(data)
        fp: BinaryIO | str | os.PathLike[str] = io.BytesIO(data)
    else:
        fp = data
    with warnings.catch_warnings():
        # Pillow warns above MAX_IMAGE_PIXELS and raises only above twice that: treat both as errors.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=OPEN_FORMATS)
        except UnidentifiedImageError:
            raise _not_accepted(fp) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_many_pixels", "the image has too many pixels") from None
        except _DECODE_ERRORS as exc:
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
    if img.format in ("JPEG", "MPO") and not isinstance(data, (bytes, bytearray, memoryview)):
        _check_jpeg_scans(_file_bytes(img))
    return img


def load_image(img: Image.Image, *, draft_size: int | None = None) -> Image.Image:
    """Decode an opened image's current frame (frame 0 after ``open_image``), upright.

    ``draft_size``: the smallest side the caller will resize to; a JPEG at least twice that is
    decoded at 1/2, 1/4 or 1/8 scale, never below it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            width, height = img.size
            if draft_size and img.format in ("JPEG", "MPO") and min(width, height) >= 2 * draft_size:
                img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (draft_size, draft_size))
            img.load()
            # in place: without it Pillow returns a full-size copy even when nothing needs turning
            ImageOps.exif_transpose(img, in_place=True)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_many_pixels", "the image has too many pixels") from None
        # TypeError/KeyError: Pillow's TIFF reader on a broken later page (found by fuzzing; was a 500)
        except _DECODE_ERRORS as exc:
            raise ImageDecodeError("corrupt_image", f"the image data is truncated or corrupt: {_short(exc)}") from None
    return img


# ---------------------------------------------------------------- JPEG scans

# The next marker after entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
# marker (part of the scan) or another 0xFF (fill).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def count_jpeg_scans(data: bytes | bytearray | memoryview, limit: int = MAX_JPEG_SCANS) -> tuple[int, int]:
    """(scans, segments) of the first image of a JPEG file, walked as libjpeg reads it, up to EOI.

    Segments are skipped by their length (so an EXIF thumbnail or ICC profile inside an APPn segment
    does not count) and each scan's entropy-coded data up to the next marker (0xFF bytes in it are
    stuffed, so that is exact); data after EOI (a second MPO picture, an appended video) is not read.
    Stops early once either count is past its limit.
    """
    scans = segments = 0
    i, end = 2, len(data)
    while i + 1 < end and scans <= limit and segments <= MAX_JPEG_SEGMENTS:
        if data[i] != 0xFF:  # stray bytes between segments: libjpeg skips them too
            found = _NEXT_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        segments += 1
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # no length field
            i += 2
            continue
        if i + 4 > end:
            break
        length = (data[i + 2] << 8) | data[i + 3]
        i += 2 + length
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    return scans, segments


def _check_jpeg_scans(data: bytes | bytearray | memoryview) -> None:
    scans, segments = count_jpeg_scans(data)
    if scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS:
        what = (
            f"more than {MAX_JPEG_SCANS} scans"
            if scans > MAX_JPEG_SCANS
            else f"more than {MAX_JPEG_SEGMENTS:,} segments"
        )
        raise ImageDecodeError(
            "too_many_scans", f"the JPEG has {what}; re-save it as an ordinary (baseline or progressive) JPEG"
        )


def _file_bytes(img: Image.Image) -> bytes:
    """The whole file an image was opened from (a path or a file object; bytes are used as they are)."""
    fp = img.fp
    position = fp.tell()
    try:
        fp.seek(0)
        return fp.read()
    finally:
        fp.seek(position)


def _not_accepted(fp: BinaryIO | str | os.PathLike[str]) -> ImageDecodeError:
    """Why no accepted reader took the bytes: another format (named by its magic bytes), or none."""
    try:
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "rb") as f:
                prefix = f.read(16)
        else:
            fp.seek(0)
            prefix = fp.read(16)
    except OSError:
        prefix = b""
    Image.init()
    for name, (_, accept) in list(Image.OPEN.items()):
        if name in ACCEPTED_FORMATS or accept is None or not accept(prefix):
            continue
        # a few magic bytes match by chance (PPM's are two): its header must parse too. Only the header:
        # the pixels of a format that is not accepted are never decoded.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Image.open(fp, formats=(name,)).close()
        except (UnidentifiedImageError, Image.DecompressionBombError, *_DECODE_ERRORS):
            continue
        return ImageDecodeError(
            "unsupported_format", f"{name} images are not accepted (JPEG, PNG, WebP, GIF, BMP, TIFF are)"
        )
    return ImageDecodeError("not_an_image", "the file is not an image Pillow can read")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
