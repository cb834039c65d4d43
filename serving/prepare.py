"""The start-up step that runs once, before any worker: choose the backend, check every model, write
the manifest the workers serve from.

    python -m serving.prepare --manifest PATH      (gunicorn.conf.py's on_starting runs this)

Everything that needs torch happens here, in a process that then exits: building the default model
when it is missing, reading each bundle, exporting it to ONNX when its export is missing or stale and
checking that the export serves what the bundle says (``serving.exports``). A worker on the ONNX
backend then loads only the checked ``.onnx`` files named in the manifest: no torch, no bundle. A
model folder that cannot be served stops the start here, with one message, before a worker forks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from flask import Config

from model.bundle import BundleError, read_bundle
from model.default import ensure_default_model
from model.export_metadata import SHA_KEY
from model.files import file_lock, file_sha256
from serving.backend_choice import BackendChoice, BackendUnavailable, choose_backend
from serving.config import ConfigError, load_settings
from serving.exports import onnx_predictor_for_bundle
from serving.logs import escape_handlers
from serving.manifest import Manifest, ModelLoadError, ServedFile

logger = logging.getLogger(__name__)

BUILT_IN_DEFAULT = "default"


def probe_backend(backend: str, device: str) -> BackendChoice:
    """``choose_backend`` with this host's answers: does torch see a GPU, has onnxruntime its CUDA provider."""
    try:
        return choose_backend(
            backend,
            device,
            torch_cuda=torch.cuda.is_available(),
            ort_cuda="CUDAExecutionProvider" in ort.get_available_providers(),
        )
    except BackendUnavailable as exc:
        raise ModelLoadError(str(exc)) from None


def bundle_paths(folder: Path, default: str) -> list[Path]:
    """The bundles to serve, sorted; the built-in default is built first when it is the default and missing."""
    if default == BUILT_IN_DEFAULT and not (folder / f"{default}.pth").exists():
        try:  # several services may start at once on one folder: one builds, the others wait
            with file_lock(folder / ".build.lock"):
                ensure_default_model(folder / f"{default}.pth")
        except OSError as exc:  # e.g. a read-only mounted folder of the user's own bundles
            raise ModelLoadError(
                f"{folder.resolve()} has no {default}.pth and it cannot be built there ({exc}); "
                f"set FLASK_DEFAULT_MODEL to one of your bundles' names"
            ) from None
    paths = sorted(folder.glob("*.pth")) if folder.is_dir() else []
    if not paths:
        raise ModelLoadError(f"no model bundles (*.pth) in {folder.resolve()}")
    stems = [p.stem for p in paths]
    if default not in stems:
        raise ModelLoadError(f"default model {default!r} is not in {folder.resolve()} (found: {', '.join(stems)})")
    return paths


def served_file(path: Path, choice: BackendChoice, onnx_dir: str | None) -> ServedFile:
    """One bundle checked for ``choice``: its current export (ONNX) or the bundle itself (torch)."""
    try:
        if choice.backend == "onnx":
            predictor = onnx_predictor_for_bundle(path, onnx_dir=onnx_dir, device="cpu", num_threads=1, warmup=False)
            onnx, bundle_sha = predictor.path, predictor.metadata[SHA_KEY]  # the export matched the bundle's hash
            return ServedFile(path.stem, str(path), bundle_sha, str(onnx), file_sha256(onnx), predictor.training)
        bundle = read_bundle(path)
        sha = file_sha256(path)
        return ServedFile(path.stem, str(path), sha, str(path), sha, bundle.training)
    except BundleError as exc:  # its message names the file
        raise ModelLoadError(f"cannot serve the bundle {exc}") from exc
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot serve the bundle {path}: {exc}") from exc


def prepare_models(config: Mapping[str, Any]) -> Manifest:
    """The manifest for these settings: backend and device chosen, every bundle checked (and exported)."""
    started = time.perf_counter()
    choice = probe_backend(config["BACKEND"], config["DEVICE"])
    logger.info("serving on %s (%s): %s", choice.backend, choice.device, choice.reason)
    folder, default = Path(config["MODEL_DIR"]), config["DEFAULT_MODEL"]
    models = tuple(served_file(p, choice, config["ONNX_DIR"]) for p in bundle_paths(folder, default))
    logger.info("checked %d model(s) in %.2fs", len(models), time.perf_counter() - started)
    return Manifest(choice.backend, choice.device, default, models, choice.reason)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check the models to serve (FLASK_* settings) and write the manifest.")
    p.add_argument("--manifest", required=True, help="file to write the manifest to (required)")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        config = load_settings(Config(os.getcwd()))
        prepare_models(config).write(args.manifest)
    except (ModelLoadError, ConfigError) as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    escape_handlers(logging.getLogger())  # paths and model names are quoted in these lines
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # the exporter's pass-by-pass notes
    sys.exit(main(get_args_parser().parse_args()))
