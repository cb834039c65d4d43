"""The checkpoint bundle: one `.pth` of plain types that carries everything needed to serve a model.

A bundle is a dict loadable with ``torch.load(path, weights_only=True)``: no pickled classes, so
loading one can never run code. Training writes bundles; serving, evaluation, prediction and export
read them and take the class names and the preprocessing from here, never from constants of their own.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pickle
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model import version as release
from model.registry import build_model, find_head, is_known_architecture

logger = logging.getLogger(__name__)

FORMAT_NAME = "imgclf-bundle"
FORMAT_VERSION = 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class BundleError(ValueError):
    """A file that cannot be used as a bundle; the message names the file and what is wrong."""


def make_preprocessing(
    *,
    resize: int,
    crop: int,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    interpolation: str = "bilinear",
    channels: int = 3,
) -> dict[str, Any]:
    """The evaluation preprocessing, as stored in a bundle (validated)."""
    prep = {
        "resize": int(resize),
        "crop": int(crop),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(interpolation),
        "channels": int(channels),
    }
    problem = _preprocessing_problem(prep)
    if problem:
        raise ValueError(f"invalid preprocessing: {problem}")
    return prep


def make_bundle(
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None,
    class_names: list[str],
    preprocessing: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    training: Mapping[str, Any] | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Assemble a bundle dict; tensors are detached and moved to the CPU so it loads anywhere."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": {"name": str(arch), "kwargs": plain(dict(arch_kwargs or {}))},
        "class_names": [str(c) for c in class_names],
        "preprocessing": plain(dict(preprocessing)),
        "temperature": float(temperature),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "training": plain(dict(training or {})),
    }


def plain(obj: Any) -> Any:
    """Deep-convert to the types ``weights_only`` loading accepts (str subclasses, tuples, paths...)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, torch.Tensor)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    return str(obj)


def library_versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {
        "imgclf": release.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "pillow": str(PIL.__version__),
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Save so that a crash at any moment leaves either the old file or the new one, never half.

    The temporary file lives in the destination folder (``os.replace`` is atomic only within one
    file system) and is fsynced before the rename; the folder is fsynced after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a folder; the data is synced anyway
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_bundle(bundle: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Validate, then write atomically; refuses to write a bundle that could not be loaded back."""
    validate_bundle(bundle, source=str(path))
    atomic_torch_save(dict(bundle), path)
    logger.info("wrote bundle %s", path)


def read_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a bundle file; every failure is a BundleError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BundleError(
            f"{path}: refused: it holds pickled Python objects, not plain data "
            f"(bundles load with weights_only=True): {_first_line(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage; all mean "unreadable"
        raise BundleError(f"{path}: not a readable torch file (truncated or corrupt): {_first_line(exc)}") from None
    validate_bundle(obj, source=str(path))
    return obj


def validate_bundle(obj: Any, source: str = "bundle") -> None:
    """Check structure, version, architecture, class names, preprocessing and weights."""
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_NAME:
        raise BundleError(f"{source}: not a model bundle (no '{FORMAT_NAME}' format marker)")
    version = obj.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{source}: unknown bundle format version {version!r} (this code reads version {FORMAT_VERSION})"
        )
    for key in ("arch", "class_names", "preprocessing", "state_dict"):
        if key not in obj:
            raise BundleError(f"{source}: bundle is missing '{key}'")
    arch = obj["arch"]
    if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
        raise BundleError(f"{source}: 'arch' must be a dict with a 'name'")
    if not is_known_architecture(arch["name"]):
        raise BundleError(f"{source}: unknown architecture {arch['name']!r}")
    names = obj["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{source}: 'class_names' must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise BundleError(f"{source}: 'class_names' has duplicates")
    problem = _preprocessing_problem(obj["preprocessing"])
    if problem:
        raise BundleError(f"{source}: invalid preprocessing: {problem}")
    temperature = obj.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BundleError(f"{source}: 'temperature' must be a positive number")
    state = obj["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{source}: 'state_dict' must map names to tensors")


def model_from_bundle(bundle: Mapping[str, Any], source: str = "bundle") -> torch.nn.Module:
    """Build the architecture the bundle names and load its weights, with errors a person can act on."""
    arch = bundle["arch"]
    names = bundle["class_names"]
    kwargs = dict(arch.get("kwargs") or {})
    kwargs.setdefault("in_channels", bundle["preprocessing"]["channels"])
    try:
        model = build_model(arch["name"], num_classes=len(names), pretrained="none", **kwargs)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: cannot build {arch['name']!r} with {kwargs}: {exc}") from None
    state = bundle["state_dict"]
    head = find_head(model)
    head_weight = state.get(f"{head}.weight")
    if head_weight is not None and head_weight.shape[0] != len(names):
        raise BundleError(
            f"{source}: class count mismatch: {len(names)} class names but the head "
            f"'{head}' has {head_weight.shape[0]} outputs"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
                f"vs {tuple(expected[k].shape)})"
            )
        raise BundleError(f"{source}: weights do not fit architecture {arch['name']!r}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def load_bundle(path: str | os.PathLike[str]) -> tuple[dict[str, Any], torch.nn.Module]:
    """Read a bundle file and build its model in eval mode, on the CPU."""
    bundle = read_bundle(path)
    model = model_from_bundle(bundle, source=str(path))
    model.eval()
    return bundle, model


def _preprocessing_problem(prep: Any) -> str | None:
    if not isinstance(prep, Mapping):
        return "must be a dict"
    for key in ("resize", "crop", "channels"):
        if not isinstance(prep.get(key), int) or prep[key] <= 0:
            return f"'{key}' must be a positive integer"
    if prep["channels"] not in (1, 3):
        return "'channels' must be 1 or 3"
    if prep["crop"] > prep["resize"]:
        return "'crop' must not exceed 'resize'"
    if prep.get("interpolation") not in INTERPOLATIONS:
        return f"'interpolation' must be one of {INTERPOLATIONS}"
    for key in ("mean", "std"):
        vals = prep.get(key)
        if not isinstance(vals, list) or len(vals) != prep["channels"]:
            return f"'{key}' must be a list of {prep['channels']} numbers"
        if not all(isinstance(v, (int, float)) for v in vals):
            return f"'{key}' must hold numbers"
    if not all(s > 0 for s in prep["std"]):
        return "'std' must be positive"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
