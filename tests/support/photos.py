"""Real photos shipped inside installed packages (no downloads), and what a good model says about them."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat"}


def _package_dir(module: str) -> Path:
    return Path(importlib.import_module(module).__file__).parent


def photo_paths() -> dict[str, Path]:
    sk = _package_dir("skimage") / "data"
    sklearn_images = _package_dir("sklearn") / "datasets" / "images"
    return {
        "chelsea": sk / "chelsea.png",  # a cat
        "coffee": sk / "coffee.png",  # a cup of espresso
        "astronaut": sk / "astronaut.png",
        "china": sklearn_images / "china.jpg",
        "flower": sklearn_images / "flower.jpg",
    }


def top_label(body: Mapping[str, object]) -> str:
    return body["predictions"][0]["label"]  # type: ignore[index]
