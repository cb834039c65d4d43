"""The checkpoint bundle: plain-types round trip, atomic writes, and every loading error named clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.bundle import (
    FORMAT_VERSION,
    BundleError,
    atomic_torch_save,
    load_bundle,
    make_bundle,
    read_bundle,
    save_bundle,
)
from model.preprocessing import Preprocessing
from model.registry import build_model
from tests.support.bundles import tiny_bundle

CLASSES = ["ant", "bee", "wasp"]


def test_round_trip_under_weights_only(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path / "m.pth", CLASSES)
    raw = torch.load(path, weights_only=True)  # plain types only: no custom classes needed
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["class_names"] == CLASSES
    assert raw["preprocessing"]["crop"] == 32
    assert raw["arch"] == {"name": "simple_cnn", "kwargs": {"width": 4, "stages": 2}}
    bundle, model = load_bundle(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw["state_dict"][key])


def _rewrite(path: Path, **changes) -> Path:
    obj = torch.load(path, weights_only=True)
    obj.update(changes)
    torch.save(obj, path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle file"):
        read_bundle(tmp_path / "nope.pth")


def test_plain_state_dict_is_not_a_bundle(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(BundleError, match=r"weights\.pth: not a model bundle"):
        read_bundle(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path / "m.pth", CLASSES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        read_bundle(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(BundleError, match="notes.pth"):
        read_bundle(path)


def test_unknown_format_version(tmp_path: Path) -> None:
    path = _rewrite(tiny_bundle(tmp_path / "m.pth", CLASSES), format_version=99)
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        read_bundle(path)


def test_unknown_architecture(tmp_path: Path) -> None:
    path = _rewrite(tiny_bundle(tmp_path / "m.pth", CLASSES), arch={"name": "resnet9000", "kwargs": {}})
    with pytest.raises(BundleError, match="unknown architecture 'resnet9000'"):
        read_bundle(path)


def test_class_count_not_matching_head(tmp_path: Path) -> None:
    path = _rewrite(tiny_bundle(tmp_path / "m.pth", CLASSES), class_names=["a", "b", "c", "d", "e"])
    with pytest.raises(BundleError, match="class count mismatch: 5 class names but the head 'head' has 3 outputs"):
        load_bundle(path)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path / "m.pth", CLASSES)
    obj = torch.load(path, weights_only=True)
    obj["arch"]["kwargs"]["width"] = 8  # the architecture now expects wider layers
    torch.save(obj, path)
    with pytest.raises(BundleError, match="weights do not fit architecture 'simple_cnn'.*wrong shape"):
        load_bundle(path)
    obj["arch"]["kwargs"]["width"] = 4
    del obj["state_dict"]["features.0.weight"]
    torch.save(obj, path)
    with pytest.raises(BundleError, match="missing 1"):
        load_bundle(path)


def test_invalid_preprocessing(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path / "m.pth", CLASSES)
    obj = torch.load(path, weights_only=True)
    obj["preprocessing"]["interpolation"] = "magic"
    torch.save(obj, path)
    with pytest.raises(BundleError, match="invalid preprocessing: 'interpolation'"):
        read_bundle(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EXPLOIT_MARKER"],))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    torch.save({"format": "imgclf-bundle", "payload": _Exploit()}, path)
    with pytest.raises(BundleError, match="refused: it holds pickled Python objects"):
        read_bundle(path)
    assert not marker.exists(), "loading ran the pickled code"


def test_save_refuses_invalid_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        bad = make_bundle(
            arch="simple_cnn", arch_kwargs={}, class_names=[], preprocessing={}, state_dict={}, training={}
        )
        save_bundle(bad, tmp_path / "bad.pth")
    assert not (tmp_path / "bad.pth").exists()


def test_interrupted_save_leaves_previous_bundle_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_bundle(tmp_path / "best.pth", CLASSES, seed=1)
    before = path.read_bytes()

    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # half-written data in the temporary file...
        raise KeyboardInterrupt  # ...then the process is interrupted before the rename

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        tiny_bundle(path, CLASSES, seed=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"], "temporary file left behind"
    load_bundle(path)


def test_stale_temporary_file_from_a_killed_writer_is_harmless(tmp_path: Path) -> None:
    path = tiny_bundle(tmp_path / "best.pth", CLASSES)
    (tmp_path / ".best.pth.abc123.tmp").write_bytes(b"\x00" * 1000)  # what kill -9 mid-write leaves
    bundle, _ = load_bundle(path)
    assert list(bundle.class_names) == CLASSES
    atomic_torch_save({"x": torch.ones(1)}, tmp_path / "other.pth")
    assert torch.load(tmp_path / "other.pth", weights_only=True)["x"].item() == 1.0


def test_a_bundle_written_as_a_plain_dict_in_todays_format_loads(tmp_path: Path) -> None:
    """The file format is a contract: a dict built by hand (as older code wrote it) still loads."""
    torch.manual_seed(0)
    model = build_model("simple_cnn", num_classes=3, in_channels=1, width=4, stages=2)
    old = {
        "format": "imgclf-bundle",
        "format_version": 1,
        "arch": {"name": "simple_cnn", "kwargs": {"width": 4, "stages": 2}},
        "class_names": ["ant", "bee", "wasp"],
        "preprocessing": {
            "resize": 32,
            "crop": 28,
            "mean": [0.3],
            "std": [0.35],
            "interpolation": "bicubic",
            "channels": 1,
        },  # fmt: skip
        "temperature": 1.5,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {"date": "2024-01-01T00:00:00+00:00", "metrics": {"val_top1": 0.5}},
    }
    path = tmp_path / "old.pth"
    torch.save(old, path)
    bundle, rebuilt = load_bundle(path)
    assert bundle.arch == "simple_cnn" and bundle.arch_kwargs == {"width": 4, "stages": 2}
    assert bundle.class_names == ("ant", "bee", "wasp")
    assert bundle.preprocessing == Preprocessing(resize=32, crop=28, mean=(0.3,), std=(0.35,), interpolation="bicubic",
                                                 channels=1)  # fmt: skip
    assert bundle.temperature == 1.5 and bundle.training == old["training"]
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    # and writing it back gives the same file format, key for key
    save_bundle(bundle, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert list(again) == list(old)
    assert {k: v for k, v in again.items() if k != "state_dict"} == {k: v for k, v in old.items() if k != "state_dict"}
    assert all(torch.equal(again["state_dict"][k], v) for k, v in old["state_dict"].items())


def test_preprocessing_validates_and_round_trips() -> None:
    prep = Preprocessing.from_dict({"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert prep.mean == (0.5, 0.5, 0.5) and prep.interpolation == "bilinear" and prep.channels == 3
    assert prep.to_dict() == {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "interpolation": "bilinear", "channels": 3}  # fmt: skip
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
        Preprocessing.from_dict({**prep.to_dict(), "size": 3})
    with pytest.raises(ValueError, match="'crop' must not exceed 'resize'"):
        Preprocessing(resize=28, crop=32, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ValueError, match="'mean' must be a list of 1 numbers"):
        Preprocessing(resize=28, crop=28, mean=[0.5] * 3, std=[0.25], channels=1)
    with pytest.raises(ValueError, match="'resize' must be a positive integer"):
        Preprocessing.from_dict({"crop": 28, "mean": [0.5], "std": [0.25], "channels": 1})
