"""Run the README's Fashion-MNIST recipes and report test accuracy and wall time (JSON + a table).

    python bench/train_fashion_mnist.py [--recipe small|long|all] [--data data/fashion-mnist]

Each recipe is one `python -m training.train` command, exactly as the README prints it; the test split
(Fashion-MNIST's own 10,000 test images) is evaluated by training.train at the end of the run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    # The default small recipe: the README's quick training example.
    "small": "--arch simple_cnn --epochs 10 --cache --channels-last",
    # A longer recipe: three times the epochs, with random erasing.
    "long": "--arch simple_cnn --epochs 30 --random-erasing 0.25 --cache --channels-last",
}


def command(recipe: str, data: str, out: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--data", data, "--out", out, "--quiet",
            *shlex.split(RECIPES[recipe])]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="small", choices=(*RECIPES, "all"), help="which recipe (default: small)")
    p.add_argument("--data", default="data/fashion-mnist", help="prepared data (default: %(default)s)")
    p.add_argument("--runs", default="runs/bench", help="run folders go here (default: %(default)s)")
    p.add_argument("--results", default="bench/results", help="JSON output folder (default: %(default)s)")
    args = p.parse_args()
    subprocess.run([sys.executable, "-m", "training.prepare_fashion_mnist", "--out", args.data], cwd=ROOT, check=True)
    rows = []
    for recipe in RECIPES if args.recipe == "all" else [args.recipe]:
        out = Path(args.runs) / f"fashion-{recipe}"
        cmd = command(recipe, args.data, str(out))
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
        metrics = json.loads((ROOT / out / "eval" / "metrics.json").read_text())
        history = json.loads((ROOT / out / "history.json").read_text())
        rows.append({
            "recipe": recipe,
            "command": "python -m training.train --data " + args.data + " --out " + str(out) + " " + RECIPES[recipe],
            "test_top1": metrics["top1"],
            "best_val_top1": max(h["val_acc"] for h in history),
            "epochs": len(history),
            "wall_seconds": round(seconds, 1),
        })  # fmt: skip
    out_dir = ROOT / args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_fashion_mnist.json").write_text(json.dumps(rows, indent=2))
    print(f"{'recipe':8} {'test top-1':>10} {'epochs':>6} {'minutes':>8}")
    for r in rows:
        print(f"{r['recipe']:8} {r['test_top1'] * 100:9.2f}% {r['epochs']:6d} {r['wall_seconds'] / 60:8.1f}")


if __name__ == "__main__":
    main()
