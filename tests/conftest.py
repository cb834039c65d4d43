"""Shared fixtures: real photos, the real default model, tiny real datasets and small bundles."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from model.bundle import load_bundle
from model.export import export_onnx
from tests.support import ROOT
from tests.support.bundles import tiny_bundle
from tests.support.network import forbid_network
from tests.support.photos import photo_paths

CUDA_SKIP_REASON = "needs a CUDA device (none here)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA device (CPU CI)."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=CUDA_SKIP_REASON))


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real classes (crops of the sample photos, training.photo_folder), 30 images each, 48 px: data
    that needs no Debian package (the GPU machine has none)."""
    from training.photo_folder import write_folder

    out = tmp_path_factory.mktemp("photo-folder")
    write_folder(out, per_class=30, size=48)
    return out


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real photos shipped inside installed packages (no downloads)."""
    found = photo_paths()
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
    # its ONNX export beside it, once per session (what `make default-model` does): the service's default
    # backend finds it through the symlinks the tests make, instead of exporting it in every test folder
    from model.export_metadata import SHA_KEY
    from model.files import file_sha256
    from serving.exports import exported_sha

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


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test fails on any use of the network, with torch's weight cache empty (tests.support.network)."""
    forbid_network(monkeypatch, tmp_path)


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
