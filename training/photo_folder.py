"""A small labelled ImageFolder cut from the real photos that scikit-image and scikit-learn ship.

    python -m training.photo_folder --out data/photos [--per-class 60] [--size 64]

One class per photo (chelsea, coffee, astronaut, china, flower), each image a random crop of it, flipped
or not. It exists wherever the dev requirements are installed and needs no download, so a smoke run of
training (a GPU machine's short AMP run, where Fashion-MNIST's Debian package is not installed) has real
pixels to learn from. Easy on purpose: it shows that training runs and learns, not how well a model does.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from PIL import Image

from model.export import sample_photos

logger = logging.getLogger(__name__)


def write_folder(out: Path, per_class: int, size: int, seed: int = 0) -> list[str]:
    """``out/<photo>/<i>.png``: ``per_class`` crops of each sample photo at ``size`` px; the class names."""
    photos = sample_photos()
    if len(photos) < 2:
        raise SystemExit("fewer than two sample photos found: install scikit-image and scikit-learn")
    rng = random.Random(seed)  # noqa: S311 - reproducible crops, not security
    names = []
    for path in photos:
        name = path.stem
        names.append(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        short = min(photo.size)
        for i in range(per_class):
            side = int(short * rng.uniform(0.35, 1.0))
            left = rng.randint(0, photo.width - side)
            top = rng.randint(0, photo.height - side)
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / f"{i:04d}.png")
    logger.info("%s: %d classes x %d images of %d px", out, len(names), per_class, size)
    return sorted(names)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="An ImageFolder of crops of the installed sample photos.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-class", type=int, default=60, help="images per class (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the crops (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[str]:
    return write_folder(Path(args.out), args.per_class, args.size, args.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
