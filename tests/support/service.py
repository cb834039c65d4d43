"""The real Flask app for a test, and reading what it exposes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from app import create_app
from serving.launcher import GunicornServer


@contextmanager
def closing_app(config: dict[str, Any]) -> Iterator[Any]:
    """The real Flask app for ``config``, its models closed afterwards (as gunicorn's worker_exit does)."""
    app = create_app(config)
    try:
        yield app
    finally:
        app.extensions["imgclf.models"].close()


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            found[key[len(name) :]] = float(value)
    return found


def logs_of_failed_starts(servers: Mapping[str, GunicornServer]) -> dict[str, str]:
    """Start every server at once (their failures are what is waited for), check that each one failed
    with a non-zero exit, and return each one's log."""
    errors: dict[str, RuntimeError] = {}

    def start(name: str) -> None:
        try:
            servers[name].start(timeout=120)
        except RuntimeError as exc:
            errors[name] = exc

    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(start, servers))
    logs = {}
    for name, srv in servers.items():
        srv.stop()
        assert name in errors, f"{name}: the server started"
        assert srv.proc is not None and srv.proc.returncode not in (0, None), name
        logs[name] = srv.log()
    return logs
