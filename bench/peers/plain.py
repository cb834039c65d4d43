"""The peers' handler: an exported model served the plain way, with Pillow, numpy and ONNX Runtime only.

What a developer would write in a LitServe or BentoML handler for this project's ``.onnx``, and what
bench/limit.py's "plain" pipeline measures: decode with Pillow's JPEG draft to no less than the resize
size, turn upright by the EXIF orientation, resize the short side to ``resize`` (bilinear), take the
centre ``crop``, and feed the model whatever its input takes (uint8 NCHW, or float normalised by the
metadata's mean and std for older exports). Class names, preprocessing and temperature come from the
file's metadata. Deliberately not the project's code (it imports nothing from the repository): the
peers run in their own virtual environments, and the comparison is with what they would run.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}  # fmt: skip


def prepare(data: bytes, prep: dict[str, Any]) -> np.ndarray:
    """Image bytes -> uint8 array (C, crop, crop)."""
    resize, crop = prep["resize"], prep["crop"]
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (resize, resize))  # JPEG only: the smallest DCT scale keeping both sides >= resize
    img = ImageOps.exif_transpose(img)
    img = img.convert("L" if prep.get("channels", 3) == 1 else "RGB")
    width, height = img.size  # torchvision's Resize and CenterCrop rules, as a port of its transforms has them
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    img = img.resize(size, _RESAMPLE[prep.get("interpolation", "bilinear")])
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    arr = np.asarray(img.crop((left, top, left + crop, top + crop)))
    return arr[np.newaxis] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class Model:
    """An exported ``.onnx`` under ONNX Runtime with ``threads`` intra-op threads."""

    def __init__(self, path: str, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.class_names: list[str] = json.loads(meta["class_names"])
        self.prep: dict[str, Any] = json.loads(meta["preprocessing"])
        self.temperature = float(json.loads(meta.get("temperature", "1.0")))
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.takes_uint8 = first.type == "tensor(uint8)"
        shape = (1, self.prep.get("channels", 3), 1, 1)
        self.mean = np.asarray(self.prep["mean"], dtype=np.float32).reshape(shape)
        self.std = np.asarray(self.prep["std"], dtype=np.float32).reshape(shape)

    def prepare(self, data: bytes) -> np.ndarray:
        return prepare(data, self.prep)

    def model_input(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> what the file's input takes."""
        if self.takes_uint8:
            return np.ascontiguousarray(batch)
        return (batch.astype(np.float32) / 255.0 - self.mean) / self.std

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (C, H, W) or (N, C, H, W) -> softmax probabilities (N, classes)."""
        if batch.ndim == 3:
            batch = batch[np.newaxis]
        logits = self.session.run(None, {self.input_name: self.model_input(batch)})[0] / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def answer(self, probs: np.ndarray, k: int = 3) -> dict[str, Any]:
        """One image's probabilities -> the service's answer shape: the top ``k`` labels and scores."""
        probs = probs.reshape(-1)
        top = np.argsort(probs)[::-1][:k]
        return {"predictions": [{"label": self.class_names[i], "index": int(i), "score": round(float(probs[i]), 6)}
                                for i in top]}  # fmt: skip
