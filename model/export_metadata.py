"""What an exported model (ONNX or TorchScript) carries about itself: the bundle's serving facts as JSON.

An exported file must be usable without its bundle, so the class names, the preprocessing, the
architecture and the softmax temperature travel inside it (ONNX ``metadata_props``, TorchScript extra
files), and a reader prepares images from them with ``model.pixels``. The input is uint8 pixels
(N, C, crop, crop) and the normalisation is inside the exported network (``model.normalization``);
files written before that took normalised floats, carry no ``input`` key and are refused here, so a
stale export is exported again instead of being fed the wrong values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.bundle_format import FORMAT_VERSION, BundleError
from model.preprocessing import Preprocessing

if TYPE_CHECKING:
    from model.bundle import Bundle

METADATA_KEYS = ("class_names", "preprocessing", "arch", "temperature", "bundle_format_version", "input")
# What the exported network takes: uint8 pixels, channels first, normalised inside the graph.
INPUT_SPEC = {"dtype": "uint8", "layout": "NCHW", "normalization": "in-graph"}
# The SHA-256 of the bundle file an ONNX export was made from: lets the service tell a current export
# from a stale one (serving/exports.py).
SHA_KEY = "bundle_sha256"


@dataclass(frozen=True)
class ExportMetadata:
    """The serving facts read back from an exported file."""

    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    arch: str
    arch_kwargs: dict[str, Any]
    temperature: float = 1.0


def metadata_from_bundle(bundle: Bundle) -> dict[str, str]:
    """The bundle's serving facts as JSON strings, keyed by ``METADATA_KEYS``."""
    return {
        "class_names": json.dumps(list(bundle.class_names)),
        "preprocessing": json.dumps(bundle.preprocessing.to_dict(), sort_keys=True),
        "arch": json.dumps(bundle.to_dict()["arch"], sort_keys=True),
        "temperature": json.dumps(bundle.temperature),
        "bundle_format_version": json.dumps(FORMAT_VERSION),
        "input": json.dumps(INPUT_SPEC, sort_keys=True),
    }


def takes_pixels(meta: Mapping[str, str]) -> bool:
    """True when an export's input is uint8 pixels with the normalisation inside (``INPUT_SPEC``)."""
    try:
        return json.loads(meta.get("input", "null")) == INPUT_SPEC
    except json.JSONDecodeError:
        return False


def parse_metadata(meta: Mapping[str, str], source: str = "exported model") -> ExportMetadata:
    """JSON strings -> validated class names, preprocessing, architecture and temperature."""
    missing = [k for k in ("class_names", "preprocessing", "arch") if k not in meta]
    if missing:
        raise BundleError(f"{source}: not exported by model.export (metadata lacks {missing})")
    try:
        values = {k: json.loads(meta[k]) for k in METADATA_KEYS if k in meta}
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: metadata is not valid JSON: {exc}") from None
    if not takes_pixels(meta):
        raise BundleError(
            f"{source}: exported by an older version of model.export (its input is not uint8 pixels with the "
            f"normalisation inside): export it again with python -m model.export"
        )
    names = values["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{source}: metadata 'class_names' must be a non-empty list of strings")
    try:
        prep = Preprocessing.from_dict(values["preprocessing"])
    except ValueError as exc:
        raise BundleError(f"{source}: metadata 'preprocessing' is invalid: {exc}") from None
    temperature = values.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BundleError(f"{source}: metadata 'temperature' must be a positive number")
    arch = values["arch"] if isinstance(values["arch"], Mapping) else {}
    kwargs = arch.get("kwargs") if isinstance(arch.get("kwargs"), Mapping) else {}
    return ExportMetadata(
        class_names=tuple(names),
        preprocessing=prep,
        arch=str(arch.get("name", "unknown")),
        arch_kwargs=dict(kwargs),
        temperature=float(temperature),
    )
