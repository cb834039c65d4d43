"""The hostile-input corpus, generated: each case is a request and the status and error code it must get.

Shared by tests/test_hostile_corpus.py (every case against one real gunicorn) and bench/soak.py (the
same cases mixed with valid requests under load). Images are built with Pillow from the real test
photos or crafted byte by byte; nothing here needs a fixture file.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # the service's default, which the corpus server keeps
MAX_FILES = 16


@dataclass
class Case:
    """One request: ``kwargs`` for ``requests.request``; 200 cases name no ``code``."""

    name: str
    status: int
    code: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/predict"
    # extra check of a 200 answer's JSON, given the body
    check: Callable[[dict[str, Any]], None] | None = None
    # a cat (chelsea) must come out on top
    cat: bool = False
    # kwargs of a reference request whose predictions this one must equal ("labels": the same top-3 set)
    same_as: dict[str, Any] | None = None
    same: str = "exactly"

    def request_kwargs(self) -> dict[str, Any]:
        """The kwargs with lazy parts made: generators (streamed bodies) and costly payloads."""
        kwargs = dict(self.kwargs)
        if callable(kwargs.get("data")):
            kwargs["data"] = kwargs["data"]()
        files = kwargs.get("files")
        if isinstance(files, dict):
            kwargs["files"] = {k: (v[0], v[1]() if callable(v[1]) else v[1], *v[2:]) for k, v in files.items()}
        return kwargs


def _bytes(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def gif_bomb() -> bytes:
    """A 64x64 GIF whose logical screen and frame claim 65535x65535."""
    data = bytearray(_bytes(Image.new("P", (64, 64)), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)  # logical screen
    i = data.index(b",")  # image descriptor: ',' left top width height
    struct.pack_into("<HH", data, i + 5, 65535, 65535)
    return bytes(data)


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0 frame size of a baseline JPEG (a JPEG decompression bomb when large)."""
    data = bytearray(jpeg)
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def jpeg_bad_huffman(jpeg: bytes) -> bytes:
    """Break the first DHT segment: its 16 code-length counts claim more codes than the segment holds."""
    data = bytearray(jpeg)
    i = data.index(b"\xff\xc4")
    for j in range(i + 5, i + 5 + 16):
        data[j] = 0xFF
    return bytes(data)


def corrupt_idat(png: bytes) -> bytes:
    """Scramble the compressed pixels of the first IDAT chunk (a valid header, undecodable data)."""
    data = bytearray(png)
    start = data.index(b"IDAT") + 4 + 16
    data[start : start + 64] = bytes((b ^ 0x5A) for b in data[start : start + 64])
    return bytes(data)


@functools.cache
def pixels_80mp() -> bytes:
    """A real 10000x8000 (80 MP) greyscale PNG of a few hundred KB: far under the body limit."""
    return _bytes(Image.new("L", (10_000, 8_000), 128), "PNG", compress_level=9)


def animated(first: Image.Image, second: Image.Image, fmt: str) -> bytes:
    second = second.resize(first.size)
    return _bytes(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


def exif_rotated(upright: Image.Image, fmt: str, **save: Any) -> bytes:
    """The upright image's pixels turned 90 degrees, with EXIF Orientation 6 ("rotate 90 CW to view")."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return _bytes(stored, fmt, exif=exif, **save)


def polyglot_jpeg_zip(jpeg: bytes) -> bytes:
    """A JPEG with a ZIP archive appended: a valid JPEG to image readers, a valid ZIP to unzip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.sh", "#!/bin/sh\necho owned\n")
    return jpeg + buf.getvalue()


def multipart(filename: bytes, content: bytes, *, field_name: bytes = b"file") -> dict[str, Any]:
    """A hand-written multipart body, so file names can hold bytes `requests` would escape."""
    boundary = b"hostile-boundary-7d1f"
    body = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="' + field_name + b'"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n"
    )
    return {"data": body, "headers": {"Content-Type": "multipart/form-data; boundary=" + boundary.decode()}}


def upload(name: str, content: bytes, content_type: str = "application/octet-stream", **extra: Any) -> dict[str, Any]:
    return {"files": {"file": (name, content, content_type)}, **extra}


def _valid_predictions(body: dict[str, Any]) -> None:
    preds = body["predictions"]
    assert len(preds) == 3 and all(isinstance(p["label"], str) and 0 <= p["score"] <= 1 for p in preds), body


def build_cases(photos: dict[str, Path]) -> list[Case]:
    chelsea = Image.open(photos["chelsea"]).convert("RGB")
    coffee = Image.open(photos["coffee"]).convert("RGB")
    chelsea_png = photos["chelsea"].read_bytes()
    chelsea_jpg = _bytes(chelsea, "JPEG", quality=90)
    small = chelsea.resize((128, 96))

    def too_large_stream():
        for _ in range(MAX_CONTENT_LENGTH // 65536 + 16):  # ~11 MB, no Content-Length
            yield b"\xff" * 65536

    cases = [
        # --- not images, or not ours
        Case("zero_bytes", 400, "empty_file", upload("empty.jpg", b"")),
        Case("zero_bytes_raw_body", 400, "empty_file", {"data": b"", "headers": {"Content-Type": "image/png"}}),
        Case("text_file", 415, "not_an_image", upload("notes.txt", b"just some text\n" * 20, "text/plain")),
        Case(
            "html_as_jpg",
            415,
            "not_an_image",
            upload("cat.jpg", b"<!doctype html><html><script>alert(1)</script></html>", "image/jpeg"),
        ),
        Case(
            "svg_as_png",
            415,
            "not_an_image",
            upload(
                "cat.png",
                b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9" height="9"/></svg>',
                "image/png",
            ),
        ),
        Case(
            "pdf_as_jpg",
            415,
            "not_an_image",
            upload("cat.jpg", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "image/jpeg"),
        ),
        Case(
            "eps_as_jpg",
            415,
            "unsupported_format",  # Pillow's EPS reader would run Ghostscript on load
            upload("cat.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "image/jpeg"),
        ),
        Case("ppm", 415, "unsupported_format", upload("x.ppm", _bytes(small, "PPM"))),
        Case("ico", 415, "unsupported_format", upload("x.ico", _bytes(small, "ICO"))),
        Case("random_bytes", 415, "not_an_image", upload("noise.bin", os.urandom(4096))),
        # --- broken images of accepted formats
        Case("truncated_jpeg", 422, "corrupt_image", upload("cut.jpg", chelsea_jpg[: len(chelsea_jpg) * 6 // 10])),
        Case("truncated_png", 422, "corrupt_image", upload("cut.png", chelsea_png[: len(chelsea_png) // 2])),
        Case("jpeg_header_only", 422, "corrupt_image", upload("head.jpg", chelsea_jpg[:300])),
        Case("corrupt_huffman_table", 422, "corrupt_image", upload("huff.jpg", jpeg_bad_huffman(chelsea_jpg))),
        Case("png_corrupt_idat", 422, "corrupt_image", upload("idat.png", corrupt_idat(chelsea_png))),
        # --- decompression bombs and sizes
        Case("png_bomb", 413, "too_many_pixels", upload("bomb.png", png_bomb(100_000, 100_000))),
        Case("gif_bomb", 413, "too_many_pixels", upload("bomb.gif", gif_bomb())),
        Case(
            "jpeg_bomb",
            413,
            "too_many_pixels",
            upload("bomb.jpg", jpeg_with_size(_bytes(Image.new("RGB", (16, 16)), "JPEG"), 65_000, 65_000)),
        ),
        Case("png_80mp_under_byte_limit", 413, "too_many_pixels", upload("80mp.png", pixels_80mp)),
        Case(
            "one_by_one",
            200,
            None,
            upload("1x1.png", _bytes(Image.new("RGB", (1, 1), "white"), "PNG")),
            check=_valid_predictions,
        ),
        Case(
            "one_by_10000",
            200,
            None,
            upload("1x10000.png", _bytes(Image.new("RGB", (1, 10_000), "red"), "PNG")),
            check=_valid_predictions,
        ),
        Case(
            "10000_by_one",
            200,
            None,
            upload("10000x1.png", _bytes(Image.new("L", (10_000, 1), 9), "PNG")),
            check=_valid_predictions,
        ),
        # --- every mode and container
        Case(
            "png_16bit",
            200,
            None,
            upload("16.png", _bytes(chelsea.convert("L").convert("I;16"), "PNG")),
            check=_valid_predictions,
        ),
        Case(
            "cmyk_jpeg",
            200,
            None,
            upload("cmyk.jpg", _bytes(chelsea.convert("CMYK"), "JPEG")),
            check=_valid_predictions,
        ),
        Case(
            "palette_with_transparency",
            200,
            None,
            upload("p.png", _bytes(chelsea.convert("P"), "PNG", transparency=0)),
            check=_valid_predictions,
        ),
        Case("la", 200, None, upload("la.png", _bytes(chelsea.convert("LA"), "PNG")), check=_valid_predictions),
        Case("one_bit", 200, None, upload("1.png", _bytes(chelsea.convert("1"), "PNG")), check=_valid_predictions),
        Case("rgba", 200, None, upload("rgba.png", _bytes(chelsea.convert("RGBA"), "PNG")), cat=True),
        Case("bmp", 200, None, upload("x.bmp", _bytes(chelsea, "BMP")), cat=True),
        Case("animated_gif_first_frame", 200, None, upload("anim.gif", animated(chelsea, coffee, "GIF")), cat=True),
        Case("animated_webp_first_frame", 200, None, upload("anim.webp", animated(chelsea, coffee, "WEBP")), cat=True),
        Case(
            "multipage_tiff_first_page",
            200,
            None,
            upload("pages.tiff", _bytes(chelsea, "TIFF", save_all=True, append_images=[coffee, coffee.convert("L")])),
            cat=True,
        ),
        Case("polyglot_jpeg_zip", 200, None, upload("cat.jpg.zip", polyglot_jpeg_zip(chelsea_jpg)), cat=True),
        # --- bodies and requests
        Case(
            "body_over_limit_declared",
            413,
            "payload_too_large",
            upload("big.jpg", b"\xff" * (MAX_CONTENT_LENGTH + 1024)),
        ),
        Case(
            "body_over_limit_chunked",
            413,
            "payload_too_large",
            {"data": "stream", "headers": {"Content-Type": "image/jpeg"}},
        ),
        Case(
            "too_many_files",
            400,
            "too_many_files",
            {"files": [("file", (f"{i}.png", chelsea_png[:64])) for i in range(MAX_FILES + 1)]},
        ),
        Case("wrong_field_name", 400, "no_file", {"files": {"image": ("cat.png", chelsea_png)}}),
        Case("json_body", 415, "unsupported_media_type", {"json": {"file": "cat.png"}}),
        Case(
            "text_plain_body",
            415,
            "unsupported_media_type",
            {"data": chelsea_png, "headers": {"Content-Type": "text/plain"}},
        ),
        Case("form_urlencoded", 415, "unsupported_media_type", {"data": {"file": "cat.png"}}),
        Case(
            "multipart_without_boundary",
            400,
            "no_file",
            {"data": chelsea_png, "headers": {"Content-Type": "multipart/form-data"}},
        ),
        Case("no_body_no_type", 400, "no_file", {}),
        Case(
            "octet_stream_body",
            200,
            None,
            {"data": chelsea_png, "headers": {"Content-Type": "application/octet-stream"}},
            cat=True,
        ),
        Case("filename_dot_dot", 200, None, multipart(b"../../../../etc/passwd", chelsea_png), cat=True),
        Case(
            "filename_nul_unicode",
            200,
            None,
            multipart("ch\u00e9lsea\u202e\U0001f408".encode() + b"\x00.png", chelsea_png),
            cat=True,
        ),
        Case("filename_very_long", 200, None, multipart(b"a" * 5000 + b".png", chelsea_png), cat=True),
        Case(
            "several_files_one_bad",
            200,
            None,
            {"files": [("file", ("cat.png", chelsea_png)), ("file", ("../x.txt", b"text"))]},
            check=_check_mixed,
        ),
        # --- parameters
        Case("top_k_zero", 400, "bad_top_k", upload("c.png", chelsea_png, params={"top_k": "0"})),
        Case("top_k_negative", 400, "bad_top_k", upload("c.png", chelsea_png, params={"top_k": "-1"})),
        Case("top_k_1e9", 400, "bad_top_k", upload("c.png", chelsea_png, params={"top_k": "1e9"})),
        Case("top_k_huge_integer", 400, "bad_top_k", upload("c.png", chelsea_png, params={"top_k": "9" * 400})),
        Case("top_k_abc", 400, "bad_top_k", upload("c.png", chelsea_png, data={"top_k": "abc"})),
        Case("unknown_model", 404, "model_not_found", upload("c.png", chelsea_png, params={"model": "resnet9000"})),
        Case("model_dot_dot", 404, "model_not_found", upload("c.png", chelsea_png, params={"model": "../default"})),
        Case(
            "model_path",
            404,
            "model_not_found",
            upload("c.png", chelsea_png, data={"model": "../../models/default.pth"}),
        ),
        Case("get_predict", 405, "method_not_allowed", method="GET"),
        Case("unknown_path", 404, "not_found", method="GET", path="/../../etc/passwd"),
    ]
    for case in cases:
        if case.kwargs.get("data") == "stream":
            case.kwargs["data"] = too_large_stream
    # EXIF orientation: the rotated file's answer must equal the upright one's (PNG is lossless: exactly;
    # a JPEG of turned pixels compresses a little differently: the same top-3 classes)
    cases += [
        Case(
            "exif_rotated_png",
            200,
            None,
            upload("rot.png", exif_rotated(chelsea, "PNG")),
            cat=True,
            same_as=upload("up.png", _bytes(chelsea, "PNG")),
        ),
        Case(
            "exif_rotated_jpeg",
            200,
            None,
            upload("rot.jpg", exif_rotated(chelsea, "JPEG", quality=95)),
            cat=True,
            same_as=upload("up.jpg", _bytes(chelsea, "JPEG", quality=95)),
            same="labels",
        ),
    ]
    return cases


def _check_mixed(body: dict[str, Any]) -> None:
    good, bad = body["results"]
    assert good["filename"] == "cat.png" and good["predictions"][0]["label"], body
    assert bad["filename"] == "../x.txt" and bad["status"] == 415 and bad["error"]["code"] == "not_an_image", body
