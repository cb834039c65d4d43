"""Admission control: at most ``MAX_INFLIGHT`` requests of one worker decode and infer at once; past
that, an immediate ``503 busy`` with ``Retry-After``.

Why: gthread hands every connection to a fixed pool of request threads, in arrival order, with no
limit on how many wait. Without a bound, a burst fills every thread with decoding and inference, the
rest queue behind them, and ``/healthz`` and ``/readyz`` queue too: the liveness probe times out and
Kubernetes restarts a healthy pod, which makes the overload worse. With the gate, the expensive routes
hold at most ``MAX_INFLIGHT`` threads (by default the request threads minus two, at most six), answers to the rest
take a millisecond, and the threads left over keep answering probes and scrapes.

A short burst should not be turned away, though: request threads beyond the admitted ones and the
probes' form a waiting room, where a request waits up to ``ADMISSION_WAIT_MS`` for a slot (slots free
up every forward pass). Only with the room full, or after that wait, is it refused; the probes' threads
never wait, so a queue of refusals drains in milliseconds and the probes behind it answer.

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
    """A counting semaphore with a bounded waiting room: ``try_enter`` takes a free slot at once, or waits
    up to ``wait_s`` for one when fewer than ``waiting`` requests already wait; else it refuses at once.
    ``limit=None``: no limit (outside gunicorn: the Flask test client, a development server)."""

    def __init__(self, limit: int | None, *, waiting: int = 0, wait_s: float = 0.0) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"the admission limit must be at least 1, not {limit}")
        if waiting < 0 or wait_s < 0:
            raise ValueError("the waiting room and the wait cannot be negative")
        self.limit = limit
        self.waiting = waiting if wait_s > 0 else 0
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(limit) if limit is not None else None
        self._lock = threading.Lock()
        self._waiters = 0

    def try_enter(self) -> bool:
        if self._slots is None or self._slots.acquire(blocking=False):
            return True
        with self._lock:
            if self._waiters >= self.waiting:
                return False
            self._waiters += 1
        try:
            return self._slots.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self._waiters -= 1

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
