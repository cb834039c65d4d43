"""Dynamic batching inside one worker: concurrent requests share one forward pass.

Request threads decode and preprocess their own images, then ``submit`` the uint8 array and wait. One
batching thread per model takes the oldest waiting tensor, adds whatever else is waiting until the
batch holds ``max_size`` images or the oldest has waited ``max_delay`` (TorchServe's batch_size and
max_batch_delay, Triton's max_queue_delay), runs one ``infer`` and hands each request its own rows.
The delay counts from the oldest request's arrival, so a request that already queued behind a running
batch is never held again, and a lone request waits at most ``max_delay``.

With ``max_size == 1`` batching is off: each request runs ``infer`` itself, one at a time under a lock,
so concurrent requests never oversubscribe torch's threads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

logger = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no more work."""


class _Job:
    __slots__ = ("batch", "future", "arrived")

    def __init__(self, batch: np.ndarray) -> None:
        self.batch = batch
        self.future: Future[np.ndarray] = Future()
        self.arrived = time.monotonic()


_STOP = object()


class Batcher:
    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        max_size: int = 8,
        max_delay_ms: float = 2.0,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.infer = infer
        self.max_size = max_size
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self.name = name
        self.on_batch = on_batch
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    @property
    def alive(self) -> bool:
        """Can take work: not closed and, when batching, its thread runs in this very process."""
        if self._closed:
            return False
        return not self.enabled or self._thread is None or (self._thread.is_alive() and self._pid == os.getpid())

    def start(self) -> None:
        if self.enabled:
            with self._lock:
                self._start_locked()

    def _start_locked(self) -> None:
        # A thread does not survive fork (gunicorn --preload): start one again in the new process.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._queue = queue.Queue()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
            self._thread.start()

    def submit(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch`` (N, C, H, W), computed alone or together with other requests."""
        if self._closed:
            raise BatcherClosed(f"model {self.name!r} is shutting down")
        if not self.enabled:
            with self._lock:
                return self._run_batch(batch)
        with self._lock:
            self._start_locked()
            job = _Job(batch)
            self._queue.put(job)
        return job.future.result(timeout=self.timeout_s)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; requests already queued are still answered."""
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(_STOP)
            thread.join(timeout)

    def _run_batch(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        probs = self.infer(batch)
        if self.on_batch is not None:
            self.on_batch(int(batch.shape[0]), time.perf_counter() - started)
        return probs

    def _run(self) -> None:
        carried: _Job | None = None
        stopping = False
        while not stopping:
            first = carried if carried is not None else self._queue.get()
            carried = None
            if first is _STOP:
                break
            assert isinstance(first, _Job)
            jobs, rows = [first], int(first.batch.shape[0])
            deadline = first.arrived + self.max_delay
            while rows < self.max_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                assert isinstance(nxt, _Job)
                if rows + nxt.batch.shape[0] > self.max_size:
                    carried = nxt  # does not fit: it opens the next batch
                    break
                jobs.append(nxt)
                rows += int(nxt.batch.shape[0])
            self._answer(jobs)
        # answer what is still queued so no request waits for a timeout
        while True:
            try:
                item = carried if carried is not None else self._queue.get_nowait()
            except queue.Empty:
                break
            carried = None
            if isinstance(item, _Job):
                self._answer([item])

    def _answer(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            batch = live[0].batch if len(live) == 1 else np.concatenate([j.batch for j in live])
            probs = self._run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, which reports it
            logger.exception("inference failed for a batch of %d on %s", len(live), self.name)
            for job in live:
                job.future.set_exception(exc)
            return
        start = 0
        for job in live:
            n = int(job.batch.shape[0])
            job.future.set_result(probs[start : start + n])
            start += n
