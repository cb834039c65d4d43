"""Turn Debian's ``dataset-fashion-mnist`` package into an ImageFolder of PNGs with the real class names.

    python -m training.prepare_fashion_mnist --out data/fashion-mnist [--limit-per-class N]

Writes ``OUT/train/<class>/00000.png`` and ``OUT/test/<class>/00000.png``. Idempotent: a finished
split (marked by ``OUT/<split>/.complete``) is left alone, so running it twice costs nothing.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# The label order of the original dataset (zalandoresearch/fashion-mnist README).
CLASS_NAMES = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]
FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_split(source: Path, out: Path, split: str, limit_per_class: int | None) -> int:
    done = out / split / ".complete"
    marker = f"limit={limit_per_class}"
    if done.is_file() and done.read_text() == marker:
        logger.info("%s already complete", out / split)
        return 0
    images = read_idx(source / f"{FILES[split]}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{FILES[split]}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{source}: {split} has {len(images)} images but {len(labels)} labels")
    written = 0
    per_class = [0] * len(CLASS_NAMES)
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        if limit_per_class is not None and per_class[label] >= limit_per_class:
            continue
        per_class[label] += 1
        folder = out / split / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(".png.tmp")
            Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
            os.replace(tmp, path)
            written += 1
    done.write_text(marker)
    logger.info("%s: %d images (%d new)", out / split, sum(per_class), written)
    return written


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fashion-MNIST (Debian package) -> ImageFolder PNGs.")
    p.add_argument("--out", default="data/fashion-mnist", help="output folder (default: %(default)s)")
    p.add_argument(
        "--source", default=str(DEFAULT_SOURCE), help=f"where {PACKAGE} put its files (default: %(default)s)"
    )
    p.add_argument(
        "--limit-per-class", type=int, default=None, help="keep only the first N images of each class (default: all)"
    )
    return p


def main(args: argparse.Namespace) -> Path:
    source = Path(args.source)
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(
            f"Fashion-MNIST not found in {source}. Install the Debian package: "
            f"sudo apt-get install {PACKAGE} (or pass --source DIR)"
        )
    out = Path(args.out)
    for split in FILES:
        write_split(source, out, split, args.limit_per_class)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
