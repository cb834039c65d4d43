"""Reusable test tools for the service: a real gunicorn on 127.0.0.1, crafted images, metric parsing."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from PIL import Image

from bench.servers import Server, clean_env


class GunicornServer(Server):
    """``gunicorn --config gunicorn.conf.py "app:create_app()"`` as `make run` starts it, on a free port.

    Settings go through the environment (FLASK_*), as an operator would pass them; the bind goes
    through GUNICORN_CMD_ARGS to check that it overrides the config file's 127.0.0.1:8000.
    """

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        workers: int = 1,
        threads: int = 8,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__("gunicorn", [], {}, log_path)
        self.args = ["--config", "gunicorn.conf.py", *args, "app:create_app()"]
        self.env = clean_env(
            {
                "FLASK_MODEL_DIR": str(model_dir),
                "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port}",
                "WEB_CONCURRENCY": str(workers),
                "GUNICORN_THREADS": str(threads),
                **(env or {}),
            }
        )

    def start(self, timeout: float = 90.0) -> Self:
        return super().start(timeout)


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


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            found[key[len(name) :]] = float(value)
    return found


def top_label(body: Mapping[str, object]) -> str:
    return body["predictions"][0]["label"]  # type: ignore[index]


CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat"}


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


def worker_pids(master_pid: int) -> set[int]:
    """PIDs of a gunicorn master's worker processes (its children), from /proc."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")
