"""Finding labelled images on disk, in the layouts people actually have.

Supported layouts (checked in this order):
- split folders: ``DIR/train/<class>/*``, ``DIR/val|valid|validation/<class>/*``, optional ``DIR/test/<class>/*``
  (any split may be missing but train; missing ones are carved out of train, stratified);
- the Kaggle dogs-vs-cats flat layout: ``DIR/cat.123.jpg``, ``DIR/dog.45.jpg`` (or inside ``DIR/train/``),
  the label being the name up to the first dot;
- an ImageFolder: ``DIR/<class>/*``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from model.images import IMAGE_SUFFIXES, decode_image

logger = logging.getLogger(__name__)

VAL_NAMES = ("val", "valid", "validation")
# Training data is the operator's own: allow large photos, but keep Pillow's bomb guard on.
TRAIN_MAX_PIXELS = 200_000_000

Sample = tuple[Path, int]


@dataclass
class Splits:
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "imagefolder"

    def describe(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "classes": len(self.class_names),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
        }


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def scan_imagefolder(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """``root/<class>/**/image`` -> (class names, samples); given class names fix the index order."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(f"{root}: classes {unknown} are not among the model's classes")
    index = {name: i for i, name in enumerate(class_names)}
    samples = [(p, index[name]) for name in found for p in sorted((root / name).rglob("*")) if is_image(p)]
    return list(class_names), samples


def scan_flat(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Kaggle dogs-vs-cats: ``root/<label>.<anything>.<ext>``."""
    files = sorted(p for p in root.iterdir() if is_image(p) and "." in p.stem)
    labels = [p.name.split(".", 1)[0] for p in files]
    if class_names is None:
        class_names = sorted(set(labels))
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{root}: labels {unknown} are not among the model's classes")
    return list(class_names), [(p, index[label]) for p, label in zip(files, labels, strict=True)]


def _is_flat(root: Path) -> bool:
    files = [p for p in root.iterdir() if is_image(p)]
    return bool(files) and all("." in p.stem for p in files)


def scan_any(root: Path, class_names: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    return scan_flat(root, class_names) if _is_flat(root) else scan_imagefolder(root, class_names)


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split off ``fraction`` of every class (at least one image of a class with two or more)."""
    if fraction <= 0:
        return samples, []
    if fraction >= 1:
        raise ValueError("split fractions must be below 1")
    rng = random.Random(seed)  # noqa: S311 - reproducible shuffling, not security
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    keep: list[Sample] = []
    taken: list[Sample] = []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n = round(len(items) * fraction)
        if n == 0 and len(items) >= 2:
            n = 1
        taken += items[:n]
        keep += items[n:]
    return sorted(keep), sorted(taken)


def per_class_subset(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` samples of every class, drawn at random by ``seed``.

    Each class is shuffled once by the seed and its first ``limit`` samples kept, so that with one seed
    the subset for a smaller limit lies inside the subset for a larger one: a learning curve adds
    images to the same ones rather than drawing new ones at each size.
    """
    if limit < 1:
        raise ValueError(f"per-class limit {limit}: must be 1 or more")
    rng = random.Random(seed)  # noqa: S311 - reproducible sampling, not security
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples):
        by_class.setdefault(s[1], []).append(s)
    kept: list[Sample] = []
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        kept += items[:limit]
    return sorted(kept)


def find_splits(
    root: str | Path, *, val_split: float = 0.1, test_split: float = 0.1, seed: int = 0, per_class: int | None = None
) -> Splits:
    """Work out the layout of ``root`` and return train/val/test samples with one class order.

    ``per_class`` keeps at most that many training images of each class (``per_class_subset``), after the
    validation and test images are set aside: those stay the same whatever the limit, so runs on
    subsets of different sizes are scored on the same images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    test_dir = root / "test" if (root / "test").is_dir() else None
    if train_dir.is_dir():
        layout = "flat-splits" if _is_flat(train_dir) else "split-folders"
        class_names, train = scan_any(train_dir)
        val = scan_any(val_dir, class_names)[1] if val_dir else []
        test = scan_any(test_dir, class_names)[1] if test_dir else []
        if not val:
            train, val = stratified_split(train, val_split, seed)
        if not test_dir and test_split > 0:
            train, test = stratified_split(train, test_split / (1 - val_split), seed + 1)
    else:
        layout = "flat" if _is_flat(root) else "imagefolder"
        class_names, samples = scan_any(root)
        rest, test = stratified_split(samples, test_split, seed + 1)
        train, val = stratified_split(rest, val_split / (1 - test_split) if test_split else val_split, seed)
    if per_class is not None:
        train = per_class_subset(train, per_class, seed + 2)
    if not class_names or not train:
        raise ValueError(f"{root}: found no labelled images (see the data layouts in docs/training.md)")
    if len(class_names) < 2:
        raise ValueError(f"{root}: found only one class ({class_names[0]}); a classifier needs two or more")
    splits = Splits(class_names, train, val, test, layout)
    logger.info("data %s: %s", root, splits.describe())
    return splits


def load_image(path: Path) -> Image.Image:
    return decode_image(path, max_pixels=TRAIN_MAX_PIXELS)


class ImageListDataset(Dataset):
    """(path, label) samples -> (transformed image, label); images may be decoded once and cached."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any], cache: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self._cache: list[Image.Image] | None = None
        if cache:
            self._cache = [load_image(p) for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = self._cache[i] if self._cache is not None else load_image(path)
        return self.transform(img), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    counts = Counter(label for _, label in samples)
    return [counts.get(i, 0) for i in range(num_classes)]


def balanced_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Per-sample weights for a WeightedRandomSampler that draws every class equally often."""
    counts = class_counts(samples, num_classes)
    return torch.tensor([1.0 / counts[label] for _, label in samples], dtype=torch.double)


def class_loss_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Per-class loss weights inversely proportional to the class's share of ``samples``, scaled so that an
    average training sample weighs 1 (total / (classes x count): scikit-learn's "balanced"), which keeps
    the learning rate meaning what it meant. A class with no sample gets 0 (it never is a target)."""
    counts = class_counts(samples, num_classes)
    total = sum(counts)
    return torch.tensor([total / (num_classes * c) if c else 0.0 for c in counts], dtype=torch.float32)


def image_statistics(samples: Sequence[Sample], channels: int, limit: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Look at a sample of images: grey or colour, typical size, per-channel mean/std (0..1)."""
    import numpy as np

    from model.pixels import to_model_mode

    rng = random.Random(seed)  # noqa: S311 - sampling, not security
    picked = rng.sample(list(samples), min(limit, len(samples)))
    greys = 0
    short_sides = []
    sums = np.zeros(3)
    sq = np.zeros(3)
    count = 0
    for path, _ in picked:
        img = load_image(path)
        short_sides.append(min(img.size))
        if img.mode in ("L", "1", "I;16", "I", "F", "LA"):
            greys += 1
        arr = np.asarray(to_model_mode(img, 3), dtype=np.float64).reshape(-1, 3) / 255.0
        sums += arr.mean(0)
        sq += (arr**2).mean(0)
        count += 1
    mean = sums / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-12))
    grey = greys == len(picked)
    if channels == 1 or (channels == 0 and grey):
        mean, std = [float(mean.mean())], [float(std.mean())]
    else:
        mean, std = [float(m) for m in mean], [float(s) for s in std]
    return {
        "grey": grey,
        "median_short_side": int(np.median(short_sides)),
        "mean": mean,
        "std": std,
    }
