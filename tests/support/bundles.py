"""Small real bundles: random weights, real format, for routing, loading and error tests."""

from __future__ import annotations

from pathlib import Path

import torch

from model.bundle import make_bundle, save_bundle
from model.preprocessing import Preprocessing
from model.registry import build_model


def tiny_bundle(path: Path, class_names: list[str], *, seed: int = 0, channels: int = 3, size: int = 32) -> Path:
    """A small simple_cnn bundle with random weights: enough for routing, loading and error tests."""
    torch.manual_seed(seed)
    model = build_model("simple_cnn", num_classes=len(class_names), in_channels=channels, width=4, stages=2)
    prep = Preprocessing(
        resize=size,
        crop=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        interpolation="bilinear",
        channels=channels,
    )
    bundle = make_bundle(
        arch="simple_cnn",
        arch_kwargs={"width": 4, "stages": 2},
        class_names=class_names,
        preprocessing=prep,
        state_dict=model.state_dict(),
        training={"metrics": {"note": "random weights for tests"}},
    )
    save_bundle(bundle, path)
    return path
