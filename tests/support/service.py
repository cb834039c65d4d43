"""The real Flask app for a test, and reading what it exposes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app import create_app


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
