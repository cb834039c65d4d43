"""The checkpoint bundle: one `.pth` of plain types that carries everything needed to serve a model.

On disk a bundle is a dict of plain types loadable with ``torch.load(path, weights_only=True)``: no
pickled classes, so loading one can never run code. In memory it is a ``Bundle``, validated when it is
made (``Bundle.from_dict`` / ``to_dict`` convert). Training writes bundles; serving, evaluation,
prediction and export read them and take the class names and the preprocessing from here, never from
constants of their own.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pickle
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision

from model import version as release
from model.bundle_format import FORMAT_NAME, FORMAT_VERSION, BundleError
from model.files import atomic_write
from model.preprocessing import Preprocessing
from model.registry import build_model, find_head, is_known_architecture, serving_arch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Bundle:
    """Everything needed to serve a model: architecture, weights, class names, preprocessing, record.

    Constructing one validates it (``BundleError``), so a Bundle in hand is always servable as far as
    its fields go; whether the weights fit the architecture is checked by ``model_from_bundle``.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    training: dict[str, Any]
    temperature: float = 1.0

    def __post_init__(self) -> None:
        problem = _fields_problem(self.arch, self.arch_kwargs, self.class_names, self.temperature, self.state_dict)
        if problem is None and not isinstance(self.preprocessing, Preprocessing):
            problem = "'preprocessing' must be a Preprocessing"
        if problem is None and not isinstance(self.training, Mapping):
            problem = "'training' must be a dict"
        if problem:
            raise BundleError(f"bundle: {problem}")
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "state_dict", dict(self.state_dict))
        object.__setattr__(self, "training", dict(self.training))
        object.__setattr__(self, "temperature", float(self.temperature))

    @classmethod
    def from_dict(cls, obj: Any, source: str = "bundle") -> Bundle:
        """A dict in the file format -> a Bundle; every problem is a BundleError that names ``source``."""
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
        arch_kwargs = arch.get("kwargs") or {}
        temperature = obj.get("temperature", 1.0)
        problem = _fields_problem(arch["name"], arch_kwargs, obj["class_names"], temperature, obj["state_dict"])
        if problem:
            raise BundleError(f"{source}: {problem}")
        try:
            prep = Preprocessing.from_dict(obj["preprocessing"])
        except ValueError as exc:
            raise BundleError(f"{source}: {exc}") from None
        training = obj.get("training") or {}
        if not isinstance(training, Mapping):
            raise BundleError(f"{source}: 'training' must be a dict")
        return cls(
            arch=arch["name"],
            arch_kwargs=dict(arch_kwargs),
            class_names=tuple(obj["class_names"]),
            preprocessing=prep,
            state_dict=dict(obj["state_dict"]),
            training=dict(training),
            temperature=temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        """The file format: plain types only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arch": {"name": self.arch, "kwargs": plain(self.arch_kwargs)},
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "temperature": self.temperature,
            "state_dict": dict(self.state_dict),
            "training": plain(self.training),
        }


def _fields_problem(arch: Any, arch_kwargs: Any, class_names: Any, temperature: Any, state_dict: Any) -> str | None:
    """What is wrong with a bundle's fields (the preprocessing is checked by Preprocessing), or None."""
    if not isinstance(arch, str) or not is_known_architecture(arch):
        return f"unknown architecture {arch!r}"
    if not isinstance(arch_kwargs, Mapping):
        return "'arch' kwargs must be a dict"
    names = class_names
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        return "'class_names' must be a non-empty list of strings"
    if len(set(names)) != len(names):
        return "'class_names' has duplicates"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        return "'temperature' must be a positive number"
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return "'state_dict' must map names to tensors"
    return None


def make_bundle(
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None,
    class_names: Sequence[str],
    preprocessing: Preprocessing | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    training: Mapping[str, Any] | None = None,
    temperature: float = 1.0,
) -> Bundle:
    """Assemble a Bundle; tensors are detached and moved to the CPU so it loads anywhere.

    Auxiliary classifiers (GoogLeNet's, Inception v3's) are training's alone: they are left out of the
    weights and the arguments say ``aux_logits=False`` (registry.serving_arch), so the served network
    is built without them.
    """
    arch_kwargs, state_dict = serving_arch(str(arch), dict(arch_kwargs or {}), dict(state_dict))
    if not isinstance(preprocessing, Preprocessing):
        try:
            preprocessing = Preprocessing.from_dict(preprocessing)
        except ValueError as exc:
            raise BundleError(f"bundle: {exc}") from None
    return Bundle(
        arch=str(arch),
        arch_kwargs=plain(arch_kwargs),
        class_names=tuple(str(c) for c in class_names),
        preprocessing=preprocessing,
        state_dict={k: v.detach().cpu().clone() for k, v in state_dict.items()},
        training=plain(dict(training or {})),
        temperature=float(temperature),
    )


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
    """``torch.save`` through ``atomic_write``: a crash leaves the old file or the new one, never half."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_bundle(bundle: Bundle, path: str | os.PathLike[str]) -> None:
    """Write atomically in the file format (a Bundle is valid by construction)."""
    atomic_torch_save(bundle.to_dict(), path)
    logger.info("wrote bundle %s", path)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
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
    return Bundle.from_dict(obj, source=str(path))


def model_from_bundle(bundle: Bundle, source: str = "bundle") -> torch.nn.Module:
    """Build the architecture the bundle names and load its weights, with errors a person can act on."""
    names = bundle.class_names
    kwargs = dict(bundle.arch_kwargs)
    kwargs.setdefault("in_channels", bundle.preprocessing.channels)
    try:
        model = build_model(bundle.arch, num_classes=len(names), pretrained="none", **kwargs)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: cannot build {bundle.arch!r} with {kwargs}: {exc}") from None
    state = bundle.state_dict
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
        raise BundleError(f"{source}: weights do not fit architecture {bundle.arch!r}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def load_bundle(path: str | os.PathLike[str]) -> tuple[Bundle, torch.nn.Module]:
    """Read a bundle file and build its model in eval mode, on the CPU."""
    bundle = read_bundle(path)
    model = model_from_bundle(bundle, source=str(path))
    model.eval()
    return bundle, model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
