"""Prometheus metrics with prometheus-client, correct under several gunicorn workers.

Under gunicorn, gunicorn.conf.py sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports
prometheus-client: every worker then writes its samples to files there and ``/metrics`` adds up the
files of all workers (``MultiProcessCollector``), whichever worker answers the scrape. Without it (the
Flask test client, a plain ``flask run``) the app's own registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Label values a client chooses must come from fixed sets: each new value is a new series in every
# worker's files under PROMETHEUS_MULTIPROC_DIR (a small in-memory volume in the Deployment), so
# made-up methods (``QZ0001 / HTTP/1.1``) would grow them without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
OTHER = "other"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """The service's metrics, registered in a registry of their own so each app gets a fresh set."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imgclf_http_requests", "HTTP requests answered", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "imgclf_http_request_duration_seconds",
            "Time from request start to response, by endpoint and status",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imgclf_inference_batch_size",
            "Images per forward pass (more than 1 when dynamic batching grouped requests)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "imgclf_inference_duration_seconds",
            "Time of one forward pass",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("imgclf_images", "Images classified", ["model"], registry=r)
        self.rejected = Counter(
            "imgclf_rejected_requests",
            "Requests refused at once with 503 busy: the worker already had MAX_INFLIGHT in progress",
            ["endpoint"],
            registry=r,
        )
        self.in_progress = Gauge(
            "imgclf_requests_in_progress",
            "Requests admitted to decoding and inference right now (summed over live workers)",
            ["endpoint"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.explanation = Histogram(
            "imgclf_explanation_duration_seconds",
            "Time of one Grad-CAM explanation (POST /explain: forward and backward pass, torch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_seconds = Gauge(
            "imgclf_model_load_seconds",
            "Time to load and warm up a model (the slowest worker)",
            ["model"],
            multiprocess_mode="max",
            registry=r,
        )

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """``endpoint``: a route's rule of the app (a fixed set) or ``OTHER``; unknown methods count as ``OTHER``."""
        labels = (endpoint, method if method in HTTP_METHODS else OTHER, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference.labels(model).observe(seconds)
        self.images.labels(model).inc(size)

    def observe_explanation(self, model: str, seconds: float) -> None:
        self.explanation.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        path = multiprocess_dir()
        if path:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)
            return generate_latest(registry)
        return generate_latest(self.registry)
