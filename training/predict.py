"""Classify image files with a bundle from the command line.

python -m training.predict --bundle models/default.pth chelsea.png coffee.png [--top-k 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from model.bundle import BundleError
from model.images import ImageDecodeError, decode_image
from model.torch_predictor import TorchPredictor

logger = logging.getLogger("training.predict")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k classes of image files, from a bundle.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--bundle", default="models/default.pth", help="bundle (.pth) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON for machines (default: a table)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    return p


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.top_k < 1:
        raise SystemExit("--top-k must be at least 1")
    try:
        predictor = TorchPredictor.from_file(args.bundle, device=args.device, num_threads=args.threads, warmup=False)
    except BundleError as exc:
        raise SystemExit(str(exc)) from None
    results: list[dict[str, Any]] = []
    draft = predictor.preprocessing.resize
    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start : start + args.batch_size]
        images, ok = [], []
        for path in chunk:
            try:
                images.append(decode_image(Path(path), draft_size=draft))
                ok.append(path)
            except (ImageDecodeError, OSError) as exc:
                results.append({"file": path, "error": str(exc)})
        if images:
            for path, preds in zip(ok, predictor.predict(images, args.top_k), strict=True):
                results.append({"file": path, "predictions": preds})
    order = {p: i for i, p in enumerate(args.images)}
    results.sort(key=lambda r: order[r["file"]])
    if args.json:
        sys.stdout.write(json.dumps({"model": predictor.name, "results": results}, indent=2) + "\n")
    else:
        for r in results:
            sys.stdout.write(f"{r['file']}\n")
            if "error" in r:
                sys.stdout.write(f"  error: {r['error']}\n")
                continue
            for p in r["predictions"]:
                sys.stdout.write(f"  {p['score'] * 100:6.2f}%  {p['label']}\n")
    if any("error" in r for r in results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
