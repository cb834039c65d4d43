"""Starting the real service (and the naive baseline) under gunicorn on 127.0.0.1.

The bench scripts use ``Server`` directly; the tests' ``GunicornServer`` (tests/helpers.py) builds on it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without service settings, plus ``extra``; the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PROMETHEUS_", "GUNICORN_"))}
    env.pop("WEB_CONCURRENCY", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


class Server:
    """One gunicorn process tree on a free 127.0.0.1 port; always stopped by ``stop`` (also on errors)."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s = 0.0

    @classmethod
    def service(cls, name: str, model_dir: Path, log_path: Path, env: Mapping[str, str] | None = None) -> Server:
        """``gunicorn --config gunicorn.conf.py "app:create_app()"``, as `make run` starts it."""
        server = cls(name, [], {}, log_path)
        server.args = ["--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{server.port}", "app:create_app()"]
        server.env = clean_env({"FLASK_MODEL_DIR": str(model_dir), **(env or {})})
        return server

    @classmethod
    def naive(cls, name: str, bundle: Path, log_path: Path) -> Server:
        """The seed-tutorial baseline: gunicorn's defaults (1 sync worker), nothing tuned."""
        server = cls(name, [], {}, log_path)
        server.args = ["-w", "1", "-b", f"127.0.0.1:{server.port}", "bench.baselines.naive_app:app"]
        server.env = clean_env({"NAIVE_BUNDLE": str(bundle)})
        return server

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, timeout: float = 180.0) -> Self:
        """Start and wait for /readyz; on any failure the process is stopped before raising."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
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
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - self.started_at
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.read().decode()

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
        if getattr(self, "_log", None) is not None and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
