"""Serving a bundle through its ONNX export: where the service finds it, how it knows it is current,
and exporting it on start when it is not.

An export carries the SHA-256 of the bundle file it was made from (metadata ``bundle_sha256``), so a
bundle replaced by retraining is never served through a stale ``.onnx``. The export of ``models/x.pth``
is ``models/x.onnx`` (or ``<onnx_dir>/x.onnx`` when a separate folder is configured, e.g. because the
model folder is read-only); for a symlinked bundle, the ``.onnx`` beside the link's target counts too.
A missing or stale export is written at start-up (``python -m model.export`` does it ahead of time),
under a file lock so that several workers export once; a read-only model folder falls back to a
temporary folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from model.bundle import load_bundle, read_bundle
from model.export import export_onnx
from model.export_metadata import SHA_KEY
from model.files import file_lock, file_sha256
from model.onnx_runner import OnnxPredictor, read_onnx_metadata

logger = logging.getLogger(__name__)


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
        return read_onnx_metadata(path).get(SHA_KEY)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises plain Exception subclasses (InvalidProtobuf...)
        logger.warning("cannot read %s (%s): it will be exported again", path, str(exc).splitlines()[0][:200])
        return None


def export_for_serving(bundle_path: str | os.PathLike[str], out: Path, sha: str) -> Path:
    """Export ``bundle_path`` to ``out`` (atomically) unless another process did while we waited."""
    try:
        with file_lock(out.parent / f".{out.name}.lock"):
            return _export_locked(bundle_path, out, sha)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write the ONNX export {out} ({exc.strerror}): export it ahead of time "
            f"(python -m model.export --bundle {bundle_path}) or set FLASK_ONNX_DIR to a writable folder"
        ) from None


def _export_locked(bundle_path: str | os.PathLike[str], out: Path, sha: str) -> Path:
    if exported_sha(out) == sha:
        return out
    logger.warning("exporting %s to %s (missing or stale); export ahead of time to start faster", bundle_path, out)
    bundle, model = load_bundle(bundle_path)
    return export_onnx(bundle, model, out, extra_metadata={SHA_KEY: sha})


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
    candidates = onnx_candidates(bundle_path, onnx_dir)
    found = next((path for path in candidates if exported_sha(path) == sha), None)
    if found is None:
        try:
            found = export_for_serving(bundle_path, candidates[0], sha)
        except OSError as exc:  # a read-only model folder (a container's mount): export to a temp folder
            if onnx_dir:
                raise
            fallback = Path(tempfile.gettempdir()) / "imgclf-onnx" / candidates[0].name
            logger.warning("cannot write %s (%s); exporting to %s instead", candidates[0], exc, fallback)
            found = export_for_serving(bundle_path, fallback, sha)
    predictor = OnnxPredictor(found, **kwargs)
    predictor.load_seconds = time.perf_counter() - started  # with the warm-up, like TorchPredictor.from_file
    return predictor
