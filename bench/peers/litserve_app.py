"""LitServe serving an exported ``.onnx`` with the plain handler (plain.py); run by bench/peers/run.py.

    PEER_ONNX=... PEER_PORT=... [PEER_WORKERS=2 PEER_THREADS=1 PEER_BATCH=8 PEER_BATCH_MS=5] python litserve_app.py

``PEER_WORKERS`` inference processes (LitServe's workers_per_device on the CPU), each with an ONNX
Runtime session of ``PEER_THREADS`` threads, batching up to ``PEER_BATCH`` requests that arrive within
``PEER_BATCH_MS``; the form field "file" carries the photo, as the service's /predict takes it.
"""

import os
import sys

import litserve as ls
import numpy as np
from fastapi import Request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain import Model  # noqa: E402 - beside this file, which runs as a script from its own venv


class ClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model(os.environ["PEER_ONNX"], threads=int(os.environ.get("PEER_THREADS", "1")))

    def decode_request(self, request: Request) -> np.ndarray:
        # typed as a Request, LitServe passes the parsed form (python-multipart); "file" is an UploadFile
        return self.model.prepare(request["file"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.probabilities(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probs: np.ndarray) -> dict:
        return self.model.answer(probs)


if __name__ == "__main__":
    api = ClassifierAPI(
        max_batch_size=int(os.environ.get("PEER_BATCH", "8")),
        batch_timeout=float(os.environ.get("PEER_BATCH_MS", "5")) / 1e3,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=int(os.environ.get("PEER_WORKERS", "2")))
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), generate_client_file=False)
