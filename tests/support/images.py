"""Images crafted for the service's error paths: encoded in memory or built byte by byte."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def image_bytes(img: Image.Image, fmt: str, **save_args: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff_with_broken_second_page() -> bytes:
    """A two-page TIFF whose second page lacks its width tag (Pillow raised TypeError on it)."""
    pages = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
    data = bytearray(image_bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for i in range(struct.unpack_from("<H", data, second)[0]):
        entry = second + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 256:  # ImageWidth
            struct.pack_into("<H", data, entry, 0xFF00)
    return bytes(data)
