"""Start the service under gunicorn as a child process on 127.0.0.1, wait until it is ready, stop it.

The one launcher of tests/ (a real gunicorn behind the HTTP tests) and bench/ (the servers measured).
It starts gunicorn as `make run` does, ``--config gunicorn.conf.py "app:create_app()"``, with the
settings an operator would pass: FLASK_* variables, WEB_CONCURRENCY and GUNICORN_THREADS, and the bind
in GUNICORN_CMD_ARGS (which overrides the config file's 127.0.0.1:8000). Nothing in the service
imports it.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
SERVICE_APP = "app:create_app()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without service settings, plus ``extra``; the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "PROMETHEUS_", "GUNICORN_"))}
    for name in ("WEB_CONCURRENCY", "PORT", "IMGCLF_HOST"):  # where gunicorn.conf.py would bind
        env.pop(name, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def worker_pids(master_pid: int) -> set[int]:
    """PIDs of a gunicorn master's worker processes (its children), from /proc."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    return {int(p) for p in children.read_text().split()} if children.exists() else set()


class GunicornServer:
    """One gunicorn process tree on a free 127.0.0.1 port; always stopped by ``stop`` (also on errors).

        ``workers`` and ``threads`` left as None are gunicorn.conf.py's choice. ``app``, ``config`` and
        ``args`` start something else under gunicorn (bench's naive baseline); ``env`` comes last and wins,
    except that the bind is always added to its GUNICORN_CMD_ARGS. ``port_from_env``: no bind anywhere,
    only ``PORT`` (as Cloud Run starts a container), which gunicorn.conf.py binds on 127.0.0.1.
    """

    def __init__(
        self,
        model_dir: Path | None,
        log_path: Path,
        *,
        workers: int | None = None,
        threads: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        app: str = SERVICE_APP,
        config: str | None = "gunicorn.conf.py",
        name: str = "service",
        port_from_env: bool = False,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.args = [*(["--config", config] if config else []), *args, app]
        extra = dict(env or {})
        # the caller's own gunicorn options stay, with our bind after them; or only PORT, no bind at all
        own_args = extra.pop("GUNICORN_CMD_ARGS", "")
        if port_from_env:
            settings = {"PORT": str(self.port), **({"GUNICORN_CMD_ARGS": own_args} if own_args else {})}
        else:
            settings = {"GUNICORN_CMD_ARGS": f"{own_args} --bind 127.0.0.1:{self.port}".strip()}
        if model_dir is not None:
            settings["FLASK_MODEL_DIR"] = str(model_dir)
        if workers is not None:
            settings["WEB_CONCURRENCY"] = str(workers)
        if threads is not None:
            settings["GUNICORN_THREADS"] = str(threads)
        self.env = clean_env({**settings, **extra})
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s = 0.0

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, timeout: float = 180.0) -> Self:
        """Start and wait for /readyz; on any failure the process is stopped before raising."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter running gunicorn
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
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:  # noqa: S310 - our http URL
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - self.started_at
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:  # noqa: S310 - our http URL
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
