"""Epoch time of the long recipe's network with each input pipeline: per-image workers vs ``--batch-aug``.

    python -m bench.train_input [--per-class 1100] [--epochs 3] [--rounds 2]

Runs `training.train` on a Fashion-MNIST subset (the first N images of each class) with the same
model and augmentations (width 64, bfloat16, pad-crop, flip, random erasing 0.5) and three input
pipelines, interleaved round by round so machine noise hits all of them alike:
``workers1`` (the per-image v2 pipeline in one DataLoader worker, the default on 2 cores),
``workers0`` (the same in the training process) and ``batch-aug``. Reports the median epoch time
after the first epoch, from each run's history.json; writes bench/results/train_input.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS_DIR, write_results

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--arch", "simple_cnn", "--arch-kwargs", '{"width": 64}', "--random-erasing", "0.5", "--amp", "on",
          "--channels-last", "--quiet", "--seed", "0"]  # fmt: skip
PIPELINES = {
    "workers1": ["--cache", "--workers", "1"],
    "workers0": ["--cache", "--workers", "0"],
    "batch-aug": ["--batch-aug"],
}


def epoch_seconds(data: Path, out: Path, pipeline: str, epochs: int) -> list[float]:
    cmd = [sys.executable, "-m", "training.train", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
           *COMMON, *PIPELINES[pipeline]]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [h["seconds"] for h in json.loads((out / "history.json").read_text())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=1100, help="images per class (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs a run, the first not timed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each pipeline, interleaved (default: %(default)s)")
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in PIPELINES}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "training.prepare_fashion_mnist", "--out", str(data),
                        "--limit-per-class", str(args.per_class)], cwd=ROOT, check=True)  # fmt: skip
        for r in range(args.rounds):
            for name in PIPELINES:
                times[name] += epoch_seconds(data, Path(tmp) / f"{name}-{r}", name, args.epochs)[1:]
    base = statistics.median(times["workers1"])
    rows = [{"pipeline": name, "median_epoch_s": round(statistics.median(t), 2), "epochs_timed": len(t),
             "speedup_vs_workers1": round(base / statistics.median(t), 2)} for name, t in times.items()]  # fmt: skip
    result = {"per_class": args.per_class, "train_images": round(args.per_class * 10 * 0.9), "rows": rows}
    write_results("train_input", result, str(RESULTS_DIR / "train_input.json"))
    print(f"{'pipeline':10} {'epoch s':>8} {'speed-up':>8}")
    for r in rows:
        print(f"{r['pipeline']:10} {r['median_epoch_s']:8.2f} {r['speedup_vs_workers1']:7.2f}x")


if __name__ == "__main__":
    main()
