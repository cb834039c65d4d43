"""Run the Fashion-MNIST recipes and report test accuracy and wall time (JSON + a table).

    python bench/train_fashion_mnist.py [--recipe small|long|small-bf16|distilled|all] [--data data/fashion-mnist]

Each recipe is a file, configs/RECIPE.toml, run as one `python -m training.train --config
configs/RECIPE.toml --data DATA --out RUNS/fashion-RECIPE` command; the test split (Fashion-MNIST's own
10,000 test images) is evaluated by training.train at the end of the run. `small-bf16` and
`distilled` are the model quality toolkit's equal-time comparison: the small recipe's network given
the small recipe's wall time, trained in bfloat16 (more epochs fit), without and with the long
recipe's model as teacher (run `--recipe long` first; the teacher is taken from this bench's --runs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("small", "long", "small-bf16", "distilled")  # configs/NAME.toml, in the order of the table


def recipe_file(recipe: str) -> str:
    return f"configs/{recipe}.toml"


def command(recipe: str, data: str, out: str, runs: str = "runs/bench") -> list[str]:
    cmd = [sys.executable, "-m", "training.train", "--config", recipe_file(recipe), "--data", data, "--out", out,
           "--quiet"]  # fmt: skip
    teacher = teacher_path(recipe, runs)
    if teacher and teacher != _options(recipe)["distill_from"]:
        cmd += ["--distill-from", teacher]
    return cmd


def teacher_path(recipe: str, runs: str) -> str | None:
    """A distillation recipe learns from the long recipe's model in this bench's run folder."""
    return str(Path(runs) / "fashion-long" / "best.pth") if "distill_from" in _options(recipe) else None


def _options(recipe: str) -> dict:
    # read here only for the teacher's path; training.train checks every value when it loads the file
    return tomllib.loads((ROOT / recipe_file(recipe)).read_text())


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
        cmd = command(recipe, args.data, str(out), args.runs)
        teacher = teacher_path(recipe, args.runs)
        if teacher and not (ROOT / teacher).is_file():
            sys.exit(f"{recipe}: the teacher {teacher} is missing; run --recipe long first")
        started = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
        metrics = json.loads((ROOT / out / "eval" / "metrics.json").read_text())
        history = json.loads((ROOT / out / "history.json").read_text())
        rows.append({
            "recipe": recipe,
            "command": shlex.join(["python", *cmd[1:]]).replace(" --quiet", ""),
            "test_top1": metrics["top1"],
            "best_val_top1": max(h["val_acc"] for h in history),
            "epochs": len(history),
            "wall_seconds": round(seconds, 1),
        })  # fmt: skip
    results = ROOT / args.results / "train_fashion_mnist.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    # Keep the rows of recipes not run this time: each recipe is measured on its own, on an idle machine.
    ran = {r["recipe"] for r in rows}
    kept = [r for r in json.loads(results.read_text()) if r["recipe"] not in ran] if results.exists() else []
    rows = sorted(kept + rows, key=lambda r: list(RECIPES).index(r["recipe"]) if r["recipe"] in RECIPES else 99)
    results.write_text(json.dumps(rows, indent=2))
    print(f"{'recipe':10} {'test top-1':>10} {'epochs':>6} {'minutes':>8}")
    for r in rows:
        print(f"{r['recipe']:10} {r['test_top1'] * 100:9.2f}% {r['epochs']:6d} {r['wall_seconds'] / 60:8.1f}")


if __name__ == "__main__":
    main()
