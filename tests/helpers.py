"""Reusable test tools for the service: a real gunicorn on 127.0.0.1, crafted images, metric parsing."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GunicornServer:
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
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PROMETHEUS_", "GUNICORN_"))}
        self.env.update(
            {
                "FLASK_MODEL_DIR": str(model_dir),
                "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port}",
                "WEB_CONCURRENCY": str(workers),
                "GUNICORN_THREADS": str(threads),
            }
        )
        self.env.update(env or {})
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, timeout: float = 90.0) -> GunicornServer:
        """Start and wait for /readyz; on any failure the process is stopped before raising."""
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        cmd = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", *self.args, "app:create_app()"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url("/readyz"), timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # bound, but no worker ready yet
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn not ready after {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), then the exit code; SIGKILL only if it hangs. Safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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
