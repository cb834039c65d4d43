"""What the start-up step (``serving.prepare``) hands the workers: which model files to serve, checked.

A worker on the ONNX backend reads this instead of the bundles, so it never loads torch: each entry
names the export to serve, the SHA-256 it had when it was checked against its bundle, and the bundle's
training record (what ``/models`` reports). The worker hashes the bytes it loads and refuses an export
that changed since (retrained and exported while the service ran: restart it to serve the new one).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.files import atomic_write

MANIFEST_ENV = "IMGCLF_MANIFEST"
FORMAT = 1


class ModelLoadError(RuntimeError):
    """The service cannot start with this model folder; the message names the file and why."""


class ManifestError(ModelLoadError):
    """A manifest that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ServedFile:
    """One model as the workers will serve it."""

    name: str
    bundle: str
    bundle_sha256: str
    path: str  # the .onnx export (onnx backend) or the bundle itself (torch backend)
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The models to serve, with the backend and device chosen for this host once, at start."""

    backend: str
    device: str
    default: str
    models: tuple[ServedFile, ...]
    reason: str = ""  # why this backend and device (logged, and shown by /models)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> Manifest:
        try:
            raw = json.loads(text)
            if raw.pop("format") != FORMAT:
                raise ValueError("unknown format")
            models = tuple(ServedFile(**m) for m in raw.pop("models"))
            return cls(models=models, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ManifestError(f"{source}: not a model manifest written by serving.prepare ({exc})") from None

    def write(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write(path, lambda f: f.write(self.to_json().encode()))


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read the model manifest {path}: {exc.strerror}") from None
    return Manifest.from_json(text, source=str(path))
