"""serving/exports.py: the private fallback folder, no reuse of files the service did not write, and no
export served whose class names, preprocessing, architecture or shapes differ from its bundle.

Real files and real ONNX exports of tiny bundles. Another local user is simulated with what they could
really leave behind: a link or a folder open to everyone at the fallback path, a link at the lock
file's path, an export that carries the bundle's hash but other facts, and (as root, with ``os.chown``)
a folder or file owned by another uid.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from app import create_app
from model.bundle import load_bundle, read_bundle
from model.export import export_onnx, write_onnx
from model.export_metadata import SHA_KEY, metadata_from_bundle
from model.files import file_sha256
from model.onnx_runner import read_onnx_metadata
from serving import exports
from serving.exports import ExportRefused, onnx_predictor_for_bundle, private_export_folder
from serving.registry import ModelLoadError
from tests.support.bundles import tiny_bundle
from tests.support.service import closing_app

CLASSES = ["ash", "birch", "cedar"]
OTHER_CLASSES = ["wolf", "bear", "lynx"]
OTHER_UID = 12345
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root (os.chown)")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundle served in these tests and real exports: its own, and those of three other tiny bundles."""
    folder = tmp_path_factory.mktemp("exports-src")
    found = {"bundle": tiny_bundle(folder / "mine.pth", CLASSES)}
    others = {
        "own": found["bundle"],
        "other_names": tiny_bundle(folder / "other-names.pth", OTHER_CLASSES, seed=1),
        "four_classes": tiny_bundle(folder / "four.pth", [*CLASSES, "dogwood"], seed=2),
        "small_input": tiny_bundle(folder / "small.pth", CLASSES, seed=3, size=28),
    }
    for key, path in others.items():
        bundle, model = load_bundle(path)
        found[key] = export_onnx(bundle, model, path.with_suffix(".onnx"), extra_metadata={SHA_KEY: "unused"})
    return found


@pytest.fixture()
def models(tmp_path: Path, made: dict[str, Path]) -> Path:
    """A model folder holding a copy of the bundle (same bytes, so the same hash)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(made["bundle"], folder / "mine.pth")
    return folder


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the service falls back to, private to this test; returns the fallback's path."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp / f"imgclf-onnx-{os.getuid()}"


@pytest.fixture()
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Make a model folder read-only: mode 0555, and, for root (which ignores mode bits), the file
    system's refusal simulated where the service first writes there, its lock file."""
    made: list[Path] = []
    real_lock = exports.file_lock

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(folder)
        if os.geteuid() == 0:

            def refusing_lock(lock_path):
                if Path(lock_path).parent == folder:
                    raise OSError(errno.EROFS, "Read-only file system", str(lock_path))
                return real_lock(lock_path)

            monkeypatch.setattr(exports, "file_lock", refusing_lock)

    yield make
    for folder in made:
        folder.chmod(0o755)


def craft(source: Path, out: Path, bundle_path: Path, **metadata: str) -> Path:
    """A real export of ``source`` that claims, by its hash, to be the export of ``bundle_path``."""
    props = {**read_onnx_metadata(source), SHA_KEY: file_sha256(bundle_path), **metadata}
    return write_onnx(onnx.load(str(source)), out, props)


def own_metadata(bundle_path: Path, **changes: object) -> dict[str, str]:
    """The bundle's own export metadata, with some facts changed."""
    bundle = read_bundle(bundle_path)
    return {**metadata_from_bundle(bundle), **{k: json.dumps(v, sort_keys=True) for k, v in changes.items()}}


# ---------------------------------------------------------------- the private folder


def test_read_only_model_folder_exports_to_a_private_folder(models, private_tmp, read_only) -> None:
    bundle = models / "mine.pth"
    read_only(models)
    predictor = onnx_predictor_for_bundle(bundle, num_threads=1)
    assert predictor.path == private_tmp / "mine.onnx"
    assert read_onnx_metadata(predictor.path)[SHA_KEY] == file_sha256(bundle)
    assert not (bundle.parent / "mine.onnx").exists()
    info = os.lstat(private_tmp)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    lock = os.lstat(private_tmp / ".mine.onnx.lock")
    assert stat.S_ISREG(lock.st_mode) and stat.S_IMODE(lock.st_mode) & 0o077 == 0
    assert predictor.class_names == CLASSES

    written = os.stat(predictor.path)
    again = onnx_predictor_for_bundle(bundle, num_threads=1)  # its own export is reused, not made again
    assert again.path == predictor.path
    assert (os.stat(again.path).st_ino, os.stat(again.path).st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_read_only_model_folder_is_served_through_the_private_folder(models, private_tmp, read_only, photos) -> None:
    read_only(models)
    config = {"MODEL_DIR": str(models), "DEFAULT_MODEL": "mine", "BACKEND": "onnx"}
    with closing_app(config) as app:
        client = app.test_client()
        r = client.post("/predict?top_k=3", data=photos["coffee"].read_bytes(), content_type="image/png")
        assert r.status_code == 200, r.get_json()
        assert sorted(p["label"] for p in r.get_json()["predictions"]) == sorted(CLASSES)
        assert client.get("/models").get_json()["models"][0]["backend"] == "onnx"
    assert (private_tmp / "mine.onnx").is_file() and not (models / "mine.onnx").exists()


def test_symlink_at_the_private_folder_path_is_refused(models, private_tmp, read_only, tmp_path, made) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    craft(made["other_names"], theirs / "mine.onnx", models / "mine.pth")
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    private_tmp.symlink_to(theirs)
    read_only(models)
    with pytest.raises(
        ExportRefused, match=rf"folder {re.escape(str(private_tmp))} is a symbolic link: refusing to use it"
    ):
        onnx_predictor_for_bundle(models / "mine.pth", num_threads=1)
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before  # nothing written through the link


def test_private_folder_open_to_others_is_refused_at_start(models, private_tmp, read_only) -> None:
    private_tmp.mkdir()
    private_tmp.chmod(0o777)
    read_only(models)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(private_tmp))} has mode 0777, open to group or others"):
        create_app({"MODEL_DIR": str(models), "DEFAULT_MODEL": "mine", "BACKEND": "onnx"})
    assert list(private_tmp.iterdir()) == []


def test_a_file_at_the_private_folder_path_is_refused(private_tmp) -> None:
    private_tmp.write_bytes(b"")
    with pytest.raises(ExportRefused, match="is not a folder"):
        private_export_folder()


@needs_root
def test_private_folder_of_another_user_is_refused(models, private_tmp, read_only) -> None:
    private_tmp.mkdir(mode=0o700)
    os.chown(private_tmp, OTHER_UID, OTHER_UID)
    read_only(models)
    with pytest.raises(
        ExportRefused, match=rf"{re.escape(str(private_tmp))} belongs to uid {OTHER_UID}, not to this service's uid 0"
    ):
        onnx_predictor_for_bundle(models / "mine.pth", num_threads=1)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("target_exists", [False, True], ids=["missing-target", "existing-target"])
def test_lock_file_symlink_is_not_followed(models, private_tmp, read_only, tmp_path, target_exists) -> None:
    victim = tmp_path / "victim"
    if target_exists:
        victim.write_bytes(b"someone's data")
    private_export_folder()
    (private_tmp / ".mine.onnx.lock").symlink_to(victim)
    read_only(models)
    with pytest.raises(
        ModelLoadError, match=r"symbolic link: refusing to follow it for a lock file: '.*/\.mine\.onnx\.lock'"
    ):
        create_app({"MODEL_DIR": str(models), "DEFAULT_MODEL": "mine", "BACKEND": "onnx"})
    if target_exists:
        assert victim.read_bytes() == b"someone's data"
    else:
        assert not victim.exists()
    assert not (private_tmp / "mine.onnx").exists()


def test_symlinked_export_in_the_private_folder_is_exported_over(models, private_tmp, read_only, tmp_path, made):
    # even a link to a file that is, byte for byte, a correct export: the service did not write it
    theirs = craft(made["own"], tmp_path / "theirs.onnx", models / "mine.pth")
    before = theirs.read_bytes()
    private_export_folder()
    (private_tmp / "mine.onnx").symlink_to(theirs)
    read_only(models)
    predictor = onnx_predictor_for_bundle(models / "mine.pth", num_threads=1)
    assert predictor.path == private_tmp / "mine.onnx"
    assert exports.is_own_regular_file(predictor.path)
    assert read_onnx_metadata(predictor.path)[SHA_KEY] == file_sha256(models / "mine.pth")
    assert theirs.read_bytes() == before


@needs_root
def test_another_users_export_in_the_private_folder_is_exported_over(models, private_tmp, read_only, made) -> None:
    private_export_folder()
    planted = craft(made["own"], private_tmp / "mine.onnx", models / "mine.pth")
    os.chown(planted, OTHER_UID, OTHER_UID)
    read_only(models)
    predictor = onnx_predictor_for_bundle(models / "mine.pth", num_threads=1)
    assert predictor.path == planted and os.lstat(planted).st_uid == os.getuid()
    assert read_onnx_metadata(planted)[SHA_KEY] == file_sha256(models / "mine.pth")


# ---------------------------------------------------------------- exports that differ from their bundle

# what differs -> what the refusal says
REFUSALS = {
    "class names": r"other class names \(class 0 is 'wolf' instead of 'ash'\)",
    "class count": r"4 class names instead of 3.*output shape \['batch', 4\] instead of \[batch, 3\]",
    "output width": r"has output shape \['batch', 4\] instead of \[batch, 3\] \(one score per class\)",
    "preprocessing": r"has preprocessing .*'mean': \[0\.4, 0\.4, 0\.4\].* instead of .*'mean': \[0\.5, 0\.5, 0\.5\]",
    "input size": r"has inputs of shape \[\['batch', 3, 28, 28\]\] instead of one \[batch, 3, 32, 32\]",
    "architecture": r"has architecture simple_cnn \{'stages': 2, 'width': 8\} instead of simple_cnn \{.*'width': 4\}",
    "temperature": r"has temperature 2\.5 instead of 1\.0",
}


def crafted_source(what: str, made: dict[str, Path], bundle: Path) -> tuple[Path, dict[str, str]]:
    """Which real export to start from, and which metadata to put on it besides the bundle's hash."""
    prep = read_bundle(bundle).preprocessing.to_dict()
    if what == "class names":  # another bundle's export, as it is
        return made["other_names"], {}
    if what == "class count":
        return made["four_classes"], {}
    if what == "output width":  # the bundle's own facts on a graph with a fourth output
        return made["four_classes"], own_metadata(bundle)
    if what == "preprocessing":
        return made["own"], own_metadata(bundle, preprocessing={**prep, "mean": [0.4] * 3})
    if what == "input size":  # the bundle's own facts on a graph made for 28x28 inputs
        return made["small_input"], own_metadata(bundle)
    if what == "architecture":
        return made["own"], own_metadata(bundle, arch={"name": "simple_cnn", "kwargs": {"width": 8, "stages": 2}})
    assert what == "temperature"
    return made["own"], own_metadata(bundle, temperature=2.5)


@pytest.mark.parametrize("what", list(REFUSALS))
def test_export_that_differs_from_its_bundle_is_refused(models, made, what: str) -> None:
    bundle = models / "mine.pth"
    source, metadata = crafted_source(what, made, bundle)
    crafted = craft(source, models / "mine.onnx", bundle, **metadata)
    before = crafted.read_bytes()
    claims = f"{re.escape(str(crafted))} claims to be the export of {re.escape(str(bundle))} "
    with pytest.raises(ExportRefused, match=rf"{claims}\({SHA_KEY} matches\) but .*{REFUSALS[what]}"):
        onnx_predictor_for_bundle(bundle, num_threads=1)
    assert crafted.read_bytes() == before  # refused, neither served nor silently replaced


@pytest.mark.parametrize("where", ["beside the bundle", "FLASK_ONNX_DIR", "private folder"])
def test_export_with_other_class_names_is_refused_wherever_it_is(
    models, made, private_tmp, read_only, tmp_path, where: str
) -> None:
    config = {"MODEL_DIR": str(models), "DEFAULT_MODEL": "mine", "BACKEND": "onnx"}
    if where == "beside the bundle":
        out = models / "mine.onnx"
    elif where == "FLASK_ONNX_DIR":
        config["ONNX_DIR"] = str(tmp_path / "onnx")
        out = tmp_path / "onnx" / "mine.onnx"
    else:
        out = private_export_folder() / "mine.onnx"
        read_only(models)
    craft(made["other_names"], out, models / "mine.pth")
    with pytest.raises(
        ModelLoadError, match=rf"{re.escape(str(out))} claims to be the export of .*mine\.pth.*other class names"
    ):
        create_app(config)


def test_export_that_matches_its_bundle_is_served(models, made) -> None:
    exported = craft(made["own"], models / "mine.onnx", models / "mine.pth")
    predictor = onnx_predictor_for_bundle(models / "mine.pth", num_threads=1)
    assert predictor.path == exported and predictor.class_names == CLASSES and predictor.warmup_seconds > 0
