"""The real service with every forward pass made slower, for tests that need requests to stay in flight.

    GunicornServer(folder, log, app=SLOW_APP, env={"IMGCLF_TEST_INFER_DELAY_S": "2"})

The models, batchers, routes and settings are the real ones (``app.create_app``); only each batcher's
``infer`` first sleeps ``IMGCLF_TEST_INFER_DELAY_S`` seconds (as a larger model or a slower machine
would take), and logs a line when a pass starts so that a test can wait for it instead of guessing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from flask import Flask

from app import create_app as create_service_app

SLOW_APP = "tests.support.slow_app:create_app()"
FORWARD_PASS_STARTED = "slow forward pass started"

logger = logging.getLogger(__name__)


def create_app() -> Flask:
    app = create_service_app()
    delay = float(os.environ.get("IMGCLF_TEST_INFER_DELAY_S", "1"))
    for served in app.extensions["imgclf.models"].models.values():
        served.batcher.infer = slowed(served.batcher.infer, delay)
    return app


def slowed(infer: Callable[[torch.Tensor], torch.Tensor], delay: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def slow_infer(batch: torch.Tensor) -> torch.Tensor:
        logger.warning("%s: %d images, %.1fs", FORWARD_PASS_STARTED, batch.shape[0], delay)
        time.sleep(delay)
        return infer(batch)

    return slow_infer
