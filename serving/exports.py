"""Serving a bundle through its ONNX export: where the service finds it, how it knows it is current,
and exporting it on start when it is not.

An export carries the SHA-256 of the bundle file it was made from (metadata ``bundle_sha256``), so a
bundle replaced by retraining is never served through a stale ``.onnx``. The export of ``models/x.pth``
is ``models/x.onnx`` (or ``<onnx_dir>/x.onnx`` when a separate folder is configured, e.g. because the
model folder is read-only); for a symlinked bundle, the ``.onnx`` beside the link's target counts too.
A missing or stale export is written at start-up (``python -m model.export`` does it ahead of time),
under a file lock so that several workers export once; a read-only model folder falls back to a
private folder of this user's (``<tmp>/imgclf-onnx-<uid>``, mode 0700, checked before every use).

The hash only says which bundle an export claims to come from. Before an export is served, what it
would serve (class names, preprocessing, architecture, temperature, input and output shapes) is
compared with the bundle itself, on the very session that will serve it: an export that differs is
refused, wherever it was found, so a file crafted to carry the right hash cannot answer with other
class names.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.bundle import Bundle, load_bundle, read_bundle
from model.export import export_onnx
from model.export_metadata import SHA_KEY, metadata_from_bundle, parse_metadata, takes_pixels
from model.files import file_lock, file_sha256
from model.onnx_runner import OnnxPredictor, read_onnx_metadata

logger = logging.getLogger(__name__)

PRIVATE_FOLDER_PREFIX = "imgclf-onnx-"


class ExportRefused(RuntimeError):
    """An ONNX export, or a folder for exports, that the service will not use; the message names it and says why."""


def onnx_candidates(bundle_path: str | os.PathLike[str], onnx_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where an export of ``bundle_path`` may be, in order; the first is where a new export is written."""
    path = Path(bundle_path)
    if onnx_dir:
        return [Path(onnx_dir) / f"{path.stem}.onnx"]
    found = [path.with_suffix(".onnx")]
    target = path.resolve().with_suffix(".onnx")
    if target != found[0].resolve():
        found.append(target)
    return found


def exported_sha(path: Path) -> str | None:
    """The bundle hash an export was made from; None when the file is missing, unreadable or has none."""
    if not path.is_file():
        return None
    try:
        metadata = read_onnx_metadata(path)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain Exception subclasses (InvalidProtobuf...)
        logger.warning("cannot read %s (%s): it will be exported again", path, str(exc).splitlines()[0][:200])
        return None
    if not takes_pixels(metadata):
        logger.warning("%s was made by an older model.export (normalised float input): it will be exported again", path)
        return None
    return metadata.get(SHA_KEY)


def private_export_folder() -> Path:
    """This user's own folder for exports when the model folder is read-only: ``<tmp>/imgclf-onnx-<uid>``.

    Created here with mode 0700. An existing one is used only if it is a real folder (not a link),
    owned by this user and closed to group and others: in a shared ``/tmp`` another local user could
    have made it first, to plant an export there or swap one in later.
    """
    folder = Path(tempfile.gettempdir()) / f"{PRIVATE_FOLDER_PREFIX}{os.getuid()}"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    check_private_folder(folder)
    return folder


def check_private_folder(folder: Path) -> None:
    """ExportRefused unless ``folder`` (a link is not followed) is this user's folder, closed to group and others."""
    info = os.lstat(folder)
    uid = os.getuid()
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != uid:
        problem = f"belongs to uid {info.st_uid}, not to this service's uid {uid}"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}, open to group or others (expected 0700)"
    else:
        return
    raise ExportRefused(
        f"the private ONNX export folder {folder} {problem}: refusing to use it. Remove it (the service "
        f"creates it, mode 0700) or set FLASK_ONNX_DIR to a folder only this service can write"
    )


def is_own_regular_file(path: Path) -> bool:
    """A regular file (a link is not followed) owned by this user: the only kind reused from the private folder."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()


def export_for_serving(bundle_path: str | os.PathLike[str], out: Path, sha: str, *, private: bool = False) -> Path:
    """Export ``bundle_path`` to ``out`` (atomically) unless another process did while we waited.

    ``private``: ``out`` is in the private folder, where only a file this user wrote counts as an
    export; anything else there (a link, another user's file) is exported over.
    """
    try:
        with file_lock(out.parent / f".{out.name}.lock"):
            return _export_locked(bundle_path, out, sha, private)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write the ONNX export {out} ({exc.strerror}): export it ahead of time "
            f"(python -m model.export --bundle {bundle_path}) or set FLASK_ONNX_DIR to a writable folder"
        ) from None


def _export_locked(bundle_path: str | os.PathLike[str], out: Path, sha: str, private: bool) -> Path:
    if private and os.path.lexists(out) and not is_own_regular_file(out):
        logger.warning("%s is not a file this service wrote (a link, or another user's): exporting over it", out)
    elif exported_sha(out) == sha:
        return out
    logger.warning("exporting %s to %s (missing or stale); export ahead of time to start faster", bundle_path, out)
    bundle, model = load_bundle(bundle_path)
    return export_onnx(bundle, model, out, extra_metadata={SHA_KEY: sha})


def check_export_fits(predictor: OnnxPredictor, bundle: Bundle, bundle_path: Path) -> None:
    """ExportRefused unless the export serves what the bundle says: same facts, shapes that fit them.

    The facts are compared after the same JSON round trip on both sides (``metadata_from_bundle`` ->
    ``parse_metadata``), so only real differences count; the shapes are the serving session's own.
    """
    got = predictor.info
    want = parse_metadata(metadata_from_bundle(bundle), source=str(bundle_path))
    problems = []
    if got.class_names != want.class_names:
        problems.append(_names_difference(got.class_names, want.class_names))
    if got.preprocessing != want.preprocessing:
        problems.append(f"preprocessing {got.preprocessing.to_dict()} instead of {want.preprocessing.to_dict()}")
    if (got.arch, got.arch_kwargs) != (want.arch, want.arch_kwargs):
        problems.append(f"architecture {got.arch} {got.arch_kwargs} instead of {want.arch} {want.arch_kwargs}")
    if got.temperature != want.temperature:
        problems.append(f"temperature {got.temperature} instead of {want.temperature}")
    prep = want.preprocessing
    inputs, outputs = predictor.session.get_inputs(), predictor.session.get_outputs()
    if len(inputs) != 1 or list(inputs[0].shape[1:]) != [prep.channels, prep.crop, prep.crop]:
        shapes = [i.shape for i in inputs]
        problems.append(f"inputs of shape {shapes} instead of one [batch, {prep.channels}, {prep.crop}, {prep.crop}]")
    if not outputs or len(outputs[0].shape) != 2 or outputs[0].shape[1] != len(want.class_names):
        width = outputs[0].shape if outputs else "none"
        problems.append(f"output shape {width} instead of [batch, {len(want.class_names)}] (one score per class)")
    if problems:
        raise ExportRefused(
            f"{predictor.path} claims to be the export of {bundle_path} ({SHA_KEY} matches) but has "
            + "; ".join(problems)
            + f": refusing to serve it. Delete it (the service exports the bundle again at start) or export "
            f"it again: python -m model.export --bundle {bundle_path} --out {predictor.path}"
        )


def _names_difference(got: Sequence[str], want: Sequence[str]) -> str:
    """The first place two class-name lists differ, short enough for a log line even with 1000 classes."""
    if len(got) != len(want):
        return f"{len(got)} class names instead of {len(want)}"
    index = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"other class names (class {index} is {got[index]!r} instead of {want[index]!r})"


def onnx_predictor_for_bundle(
    bundle_path: str | os.PathLike[str], *, onnx_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> OnnxPredictor:
    """Serve a bundle through its ONNX export, exporting it first if missing or stale.

    The bundle is still read: it is validated, and its training record is what ``describe`` reports.
    ``kwargs`` go to ``OnnxPredictor``.
    """
    started = time.perf_counter()
    bundle_path = Path(bundle_path)
    bundle = read_bundle(bundle_path)
    sha = file_sha256(bundle_path)
    kwargs.setdefault("name", bundle_path.stem)
    kwargs["training"] = bundle.training
    warmup = kwargs.pop("warmup", True)
    candidates = onnx_candidates(bundle_path, onnx_dir)
    found = next((path for path in candidates if exported_sha(path) == sha), None)
    if found is None:
        try:
            found = export_for_serving(bundle_path, candidates[0], sha)
        except OSError as exc:  # a read-only model folder (a container's mount): export to a private folder
            if onnx_dir:
                raise
            fallback = private_export_folder() / candidates[0].name
            logger.warning("cannot write %s (%s); exporting to %s instead", candidates[0], exc, fallback)
            found = export_for_serving(bundle_path, fallback, sha, private=True)
    predictor = OnnxPredictor(found, warmup=False, **kwargs)
    check_export_fits(predictor, bundle, bundle_path)  # before its first inference
    if warmup:
        predictor.warmup_seconds = predictor.warm_up()
    predictor.load_seconds = time.perf_counter() - started  # with the warm-up, like TorchPredictor.from_file
    return predictor
