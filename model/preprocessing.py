"""The evaluation preprocessing a model expects, as one validated value.

A bundle stores it as a plain dict (``to_dict``) so the file stays ``weights_only``-loadable; every
reader turns it back into a ``Preprocessing`` (``from_dict``), so a bad value is refused once, where
it is read, with a message naming the field, instead of surfacing as a KeyError deep in a transform.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``resize``, centre-crop ``crop`` x ``crop``, normalise by ``mean``/``std``."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    channels: int = 3

    def __post_init__(self) -> None:
        problem = _coerce(self)
        if problem:
            raise ValueError(f"invalid preprocessing: {problem}")

    @classmethod
    def from_dict(cls, mapping: Any) -> Preprocessing:
        """The stored dict -> a Preprocessing; ValueError names what is wrong (unknown keys included)."""
        if not isinstance(mapping, Mapping):
            raise ValueError("invalid preprocessing: must be a dict")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in mapping if k not in known)
        if unknown:
            raise ValueError(f"invalid preprocessing: unknown keys {unknown}")
        values = {"resize": None, "crop": None, "mean": None, "std": None, **mapping}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in bundles and exported metadata (lists, not tuples)."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "channels": self.channels,
        }


def _coerce(prep: Preprocessing) -> str | None:
    """Check every field and store it as its declared type; returns the first problem, or None."""
    ints = {}
    for key in ("resize", "crop", "channels"):
        value = _as_int(getattr(prep, key))
        if value is None or value <= 0:
            return f"'{key}' must be a positive integer"
        ints[key] = value
    channels = ints["channels"]
    if channels not in (1, 3):
        return "'channels' must be 1 or 3"
    if ints["crop"] > ints["resize"]:
        return "'crop' must not exceed 'resize'"
    if not isinstance(prep.interpolation, str) or prep.interpolation not in INTERPOLATIONS:
        return f"'interpolation' must be one of {INTERPOLATIONS}"
    floats = {}
    for key in ("mean", "std"):
        values = getattr(prep, key)
        if not isinstance(values, (list, tuple)) or len(values) != channels:
            return f"'{key}' must be a list of {channels} numbers"
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            return f"'{key}' must hold numbers"
        floats[key] = tuple(float(v) for v in values)
    if not all(s > 0 for s in floats["std"]):
        return "'std' must be positive"
    for key, value in {**ints, **floats, "interpolation": str(prep.interpolation)}.items():
        object.__setattr__(prep, key, value)
    return None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
