"""BentoML serving an exported ``.onnx`` with the plain handler (plain.py); run by bench/peers/run.py.

    PEER_ONNX=... [PEER_WORKERS=2 PEER_THREADS=1 PEER_BATCH=4] bentoml serve bentoml_service:Classifier --port N

``PEER_WORKERS`` worker processes, each with an ONNX Runtime session of ``PEER_THREADS`` threads and
BentoML's adaptive batching up to ``PEER_BATCH`` requests (``PEER_BATCH_MS``: its latency limit, left
at BentoML's default when unset); the form field "file" carries the photo, as the service's /predict
takes it.
"""

import os
import sys
from pathlib import Path

import bentoml
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain import Model  # noqa: E402 - beside this file, which bentoml imports from its own venv

BATCHING = {"max_batch_size": int(os.environ.get("PEER_BATCH", "4"))}
if os.environ.get("PEER_BATCH_MS"):
    BATCHING["max_latency_ms"] = int(os.environ["PEER_BATCH_MS"])


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "2")), traffic={"timeout": 120})
class Classifier:
    def __init__(self) -> None:
        self.model = Model(os.environ["PEER_ONNX"], threads=int(os.environ.get("PEER_THREADS", "1")))

    @bentoml.api(batchable=True, **BATCHING)
    def predict(self, file: list[Path]) -> list[dict]:
        batch = np.stack([self.model.prepare(p.read_bytes()) for p in file])
        return [self.model.answer(p) for p in self.model.probabilities(batch)]
