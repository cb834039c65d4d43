"""The inference service: ``create_app()`` builds one worker's Flask app (served by gunicorn.conf.py).

gunicorn --config gunicorn.conf.py "app:create_app()"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from serving.admission import EXTENSION as ADMISSION
from serving.admission import Admission
from serving.api import bp as api_blueprint
from serving.config import admission_limit, admission_waiting_room, load_settings, request_threads
from serving.errors import register_error_handler
from serving.explain import install as install_explanations
from serving.http import install_request_hooks
from serving.metrics import Metrics
from serving.pages import bp as pages_blueprint
from serving.registry import ModelRegistry, current_manifest

logger = logging.getLogger(__name__)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Settings (defaults, FLASK_* environment, test config), then models loaded and warm, then routes.

    A bad setting or a bundle that cannot be served raises here, so the worker does not start.
    """
    app = Flask(__name__)
    load_settings(app.config, test_config)

    metrics = Metrics()
    app.extensions["imgclf.metrics"] = metrics
    app.extensions[ADMISSION] = admission(app)
    app.extensions["imgclf.models"] = load_models(app, metrics)

    install_request_hooks(app)
    register_error_handler(app)
    app.register_blueprint(api_blueprint)
    install_explanations(app)
    app.register_blueprint(pages_blueprint)
    return app


def load_models(app: Flask, metrics: Metrics) -> ModelRegistry:
    cfg = app.config
    registry = ModelRegistry.load(
        current_manifest(cfg),
        num_threads=cfg["TORCH_THREADS"],
        precision=cfg["PRECISION"],
        batch_max_size=cfg["BATCH_MAX_SIZE"],
        batch_max_delay_ms=cfg["BATCH_MAX_DELAY_MS"],
        on_batch=metrics.observe_batch,
    )
    for served in registry.models.values():
        metrics.load_seconds.labels(served.name).set(served.load_seconds)
    return registry


def admission(app: Flask) -> Admission:
    threads = request_threads()
    limit = admission_limit(app.config, threads)
    waiting = admission_waiting_room(limit, threads)
    return Admission(limit, waiting=waiting, wait_s=app.config["ADMISSION_WAIT_MS"] / 1000)
