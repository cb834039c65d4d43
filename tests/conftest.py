"""Shared fixtures: real photos, the real default model, tiny real datasets and small bundles."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from model.bundle import load_bundle, make_bundle, save_bundle
from model.export import export_onnx
from model.preprocessing import Preprocessing
from model.registry import build_model

ROOT = Path(__file__).resolve().parent.parent


def _package_dir(module: str) -> Path:
    import importlib

    return Path(importlib.import_module(module).__file__).parent


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real photos shipped inside installed packages (no downloads)."""
    sk = _package_dir("skimage") / "data"
    sklearn_images = _package_dir("sklearn") / "datasets" / "images"
    found = {
        "chelsea": sk / "chelsea.png",  # a cat
        "coffee": sk / "coffee.png",  # a cup of espresso
        "astronaut": sk / "astronaut.png",
        "china": sklearn_images / "china.jpg",
        "flower": sklearn_images / "flower.jpg",
    }
    for name, path in found.items():
        assert path.is_file(), f"test photo {name} missing at {path}"
    return found


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real default model (EfficientNet-Lite0, ImageNet), built once per session."""
    existing = ROOT / "models" / "default.pth"
    path = tmp_path_factory.mktemp("models") / "default.pth"
    if existing.is_file():
        shutil.copy(existing, path)
    else:
        from model.default import ensure_default_model

        ensure_default_model(path)
    # its ONNX export beside it, once per session (what `make models` does): the service's default
    # backend finds it through the symlinks the tests make, instead of exporting it in every test folder
    from model.onnx_files import SHA_KEY, exported_sha, file_sha256

    sha, ready = file_sha256(path), existing.with_suffix(".onnx")
    if exported_sha(ready) == sha:
        shutil.copy(ready, path.with_suffix(".onnx"))
    else:
        bundle, model = load_bundle(path)
        export_onnx(bundle, model, path.with_suffix(".onnx"), extra_metadata={SHA_KEY: sha})
    return path


@pytest.fixture(scope="session")
def fashion_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Fashion-MNIST image folder: 10 classes x 20 train and 20 test images."""
    from training.prepare_fashion_mnist import get_args_parser, main

    out = tmp_path_factory.mktemp("fashion")
    main(get_args_parser().parse_args(["--out", str(out), "--limit-per-class", "20"]))
    return out


@pytest.fixture(scope="session")
def two_class_images(fashion_subset: Path) -> dict[str, list[Path]]:
    """Two real classes (Trouser, Bag) of Fashion-MNIST PNGs, 40 each, for layout tests."""
    picked = {}
    for name in ("Trouser", "Bag"):
        files = sorted((fashion_subset / "train" / name).glob("*.png")) + sorted(
            (fashion_subset / "test" / name).glob("*.png")
        )
        picked[name] = files[:40]
    return picked


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


@pytest.fixture
def make_tiny_bundle():
    return tiny_bundle


@pytest.fixture(scope="session")
def make_model_folder(tmp_path_factory: pytest.TempPathFactory, default_bundle: Path) -> Callable[[str], Path]:
    """A fresh model folder for the service holding the default model (a symlink: no 20 MB copy)."""

    def make(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        (folder / "default.pth").symlink_to(default_bundle)
        return folder

    return make


@contextmanager
def closing_app(config: dict[str, Any]) -> Iterator[Any]:
    """The real Flask app for ``config``, its models closed afterwards (as gunicorn's worker_exit does)."""
    from app import create_app

    app = create_app(config)
    try:
        yield app
    finally:
        app.extensions["imgclf.models"].close()
