"""What an exported model (ONNX or TorchScript) carries about itself: the bundle's serving facts as JSON.

An exported file must be usable without its bundle, so the class names, the preprocessing, the
architecture and the softmax temperature travel inside it (ONNX ``metadata_props``, TorchScript extra
files), and a reader rebuilds the eval transform from them with ``build_eval_transform``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from model.bundle import FORMAT_VERSION, BundleError, make_preprocessing

METADATA_KEYS = ("class_names", "preprocessing", "arch", "temperature", "bundle_format_version")


def metadata_from_bundle(bundle: Mapping[str, Any]) -> dict[str, str]:
    """The bundle's serving facts as JSON strings, keyed by ``METADATA_KEYS``."""
    return {
        "class_names": json.dumps(list(bundle["class_names"])),
        "preprocessing": json.dumps(dict(bundle["preprocessing"]), sort_keys=True),
        "arch": json.dumps(dict(bundle["arch"]), sort_keys=True),
        "temperature": json.dumps(float(bundle.get("temperature", 1.0))),
        "bundle_format_version": json.dumps(FORMAT_VERSION),
    }


def parse_metadata(meta: Mapping[str, str], source: str = "exported model") -> dict[str, Any]:
    """JSON strings -> validated ``class_names``, ``preprocessing``, ``arch``, ``temperature``."""
    missing = [k for k in ("class_names", "preprocessing", "arch") if k not in meta]
    if missing:
        raise BundleError(f"{source}: not exported by model.export (metadata lacks {missing})")
    try:
        values = {k: json.loads(meta[k]) for k in METADATA_KEYS if k in meta}
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: metadata is not valid JSON: {exc}") from None
    names = values["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BundleError(f"{source}: metadata 'class_names' must be a non-empty list of strings")
    prep = values["preprocessing"]
    try:
        prep = make_preprocessing(**prep)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{source}: metadata 'preprocessing' is invalid: {exc}") from None
    temperature = values.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise BundleError(f"{source}: metadata 'temperature' must be a positive number")
    return {
        "class_names": names,
        "preprocessing": prep,
        "arch": values["arch"],
        "temperature": float(temperature),
    }
