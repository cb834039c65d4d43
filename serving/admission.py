"""Admission control: at most ``MAX_INFLIGHT`` requests of one worker decode and infer at once; past
that, an immediate ``503 busy`` with ``Retry-After``.

Why: gthread hands every connection to a fixed pool of request threads, in arrival order, with no
limit on how many wait. Without a bound, a burst fills every thread with decoding and inference, the
rest queue behind them, and ``/healthz`` and ``/readyz`` queue too: the liveness probe times out and
Kubernetes restarts a healthy pod, which makes the overload worse. With the gate, the expensive routes
hold at most ``MAX_INFLIGHT`` threads (by default the request threads minus two), answers to the rest
take a millisecond, and the threads left over keep answering probes and scrapes.

The slot is taken before the body is read, so a refused upload costs neither its bytes in memory nor
its decoding; serving/worker.py then closes the connection, since its body was left unread. It is
given back as soon as the answer is built.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, request

from serving.errors import ApiError
from serving.metrics import OTHER

RETRY_AFTER_S = 1  # what refused clients are told to wait: about one forward pass of a full batch, rounded up
EXTENSION = "imgclf.admission"

View = TypeVar("View", bound=Callable[..., Any])


class Admission:
    """A non-blocking counting semaphore: ``try_enter`` never waits for a slot. ``limit=None``: no limit
    (outside gunicorn: the Flask test client, a development server)."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"the admission limit must be at least 1, not {limit}")
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit) if limit is not None else None

    def try_enter(self) -> bool:
        return self._slots is None or self._slots.acquire(blocking=False)

    def leave(self) -> None:
        if self._slots is not None:
            self._slots.release()


def admitted(view: View) -> View:
    """Route decorator: the view runs only with a free slot; otherwise ``503 busy`` (counted in /metrics)."""

    @wraps(view)
    def gate(*args: Any, **kwargs: Any) -> Any:
        admission: Admission = current_app.extensions[EXTENSION]
        metrics = current_app.extensions["imgclf.metrics"]
        endpoint = request.url_rule.rule if request.url_rule is not None else OTHER  # a fixed set of labels
        if not admission.try_enter():
            metrics.rejected.labels(endpoint).inc()
            raise ApiError(
                "busy",
                f"the server is at its limit of {admission.limit} requests in progress; retry in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        in_progress = metrics.in_progress.labels(endpoint)
        in_progress.inc()
        try:
            return view(*args, **kwargs)
        finally:
            in_progress.dec()
            admission.leave()

    return gate  # type: ignore[return-value]
