"""Transfer learning on small data: from scratch vs a frozen pretrained network vs two-phase fine-tuning.

    python -m bench.transfer [--sizes 20,100,500] [--data data/fashion-mnist] [--quick]

For each training-set size (images per class, drawn by training.train's ``--per-class``, nested: the 20
images of a class are among its 100) and each recipe file ``configs/transfer-RECIPE.toml`` (scratch:
simple_cnn; frozen: EfficientNet-Lite0's ImageNet weights with only the head trained; finetune: the head
first, then everything with the backbone at a tenth of the learning rate), one run of training.train
(in this process, through ``run_training``), scored on a fixed stratified sample of the test split
(``--test-per-class`` images of each class; 0: the whole split). Every run of one size validates on the
same images (``--val-split`` of the training folder, set aside before the subset is drawn) and is scored
on the same test images.

Smaller sets get more epochs, so that the runs are not cut short by having few steps: a recipe's
epochs x sqrt(100 / images per class), at least 2 (and its --unfreeze-at moved in proportion). Test
top-1 and wall time (training, validation and the test evaluation) go to a table and to
bench/results/transfer-<stamp>.json. Wall times are the machine's: compare them only between runs on an
idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, cpu_info, write_results
from training import recipes
from training.config import TrainConfig, splits_for
from training.data import per_class_subset
from training.train import run_training

RECIPES = ("scratch", "frozen", "finetune")  # configs/transfer-NAME.toml, in the order of the table
REFERENCE_SIZE = 100  # images per class at which a recipe runs its own number of epochs


def recipe_file(recipe: str) -> Path:
    return recipes.recipe_path(f"transfer-{recipe}")


def scaled_schedule(recipe: dict[str, Any], per_class: int) -> dict[str, Any]:
    """Epochs (and the unfreeze epoch) for ``per_class`` images of each class: the recipe's at
    REFERENCE_SIZE, times sqrt(REFERENCE_SIZE / per_class), so that a tenth of the images gets about a
    third of the steps rather than a tenth."""
    epochs = max(2, round(recipe["epochs"] * math.sqrt(REFERENCE_SIZE / per_class)))
    out: dict[str, Any] = {"epochs": epochs}
    if recipe.get("unfreeze_at") is not None:
        frozen = (recipe["unfreeze_at"] - 1) * epochs / recipe["epochs"]
        out["unfreeze_at"] = min(epochs, max(2, 1 + round(frozen)))
    return out


def run_options(recipe: str, per_class: int, args: argparse.Namespace) -> dict[str, Any]:
    """training.train's options for one run: the recipe file's, the bench's data settings, the schedule."""
    options = recipes.load_recipe(recipe_file(recipe))
    options.update(
        config=str(recipe_file(recipe).relative_to(recipes.RECIPES_DIR.parent)),
        data=args.data,
        out=str(Path(args.runs) / f"{recipe}-{per_class}"),
        per_class=per_class,
        val_split=args.val_split,
        seed=args.seed,
        quiet=True,
    )
    options.update(scaled_schedule(options, per_class))
    if args.quick:
        options.update(epochs=2, unfreeze_at=2 if "unfreeze_at" in options else None, workers=0)
        if options["arch"] != "simple_cnn":
            options.update(img_size=32, resize=32)
    return options


def command_line(options: dict[str, Any]) -> str:
    """The training.train command that makes the same run (without the bench's fixed test sample)."""
    recipe = recipes.load_recipe(options["config"])
    parts = ["python -m training.train", f"--config {options['config']}"]
    for key in ("data", "out", "per_class", "val_split", "epochs", "unfreeze_at", "img_size", "resize", "seed"):
        value = options.get(key)
        if value is not None and value != recipe.get(key) and (key != "seed" or value != 0):
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def run_one(recipe: str, per_class: int, args: argparse.Namespace) -> dict[str, Any]:
    options = run_options(recipe, per_class, args)
    splits = splits_for(options)
    if args.test_per_class:
        splits = dataclasses.replace(splits, test=per_class_subset(splits.test, args.test_per_class, args.seed))
    started = time.perf_counter()
    result = run_training(TrainConfig.from_options(options, splits), splits)
    seconds = time.perf_counter() - started
    history = result["history"]
    return {
        "recipe": recipe,
        "images_per_class": per_class,
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "arch": options["arch"],
        "img_size": result["config"].img_size,
        "epochs": len(history),
        "unfreeze_at": options.get("unfreeze_at"),
        "seed": args.seed,
        "test_top1": result["eval"]["top1"],
        "best_val_top1": max(h["val_acc"] for h in history),
        "train_seconds": round(sum(h["seconds"] for h in history), 1),
        "wall_seconds": round(seconds, 1),
        "command": command_line(options),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'images/class':>12} {'recipe':9} {'test top-1':>10} {'epochs':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['images_per_class']:12d} {r['recipe']:9} {r['test_top1'] * 100:9.2f}% {r['epochs']:6d} "
              f"{r['wall_seconds']:7.1f}")  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion-mnist", help="prepared Fashion-MNIST (default: %(default)s)")
    p.add_argument("--sizes", default="20,100,500", help="training images per class (default: %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="which of %(default)s, in this order")
    p.add_argument(
        "--val-split",
        type=float,
        default=0.005,
        help="validation share of the training folder (default: %(default)s: 30 images a class)",
    )
    p.add_argument(
        "--test-per-class",
        type=int,
        default=200,
        help="test images of each class, a fixed sample (0: the whole split; default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the subsets and seeds training (default: %(default)s)")
    p.add_argument("--runs", default="runs/bench/transfer", help="run folders go here (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/transfer-<stamp>.json)")
    p.add_argument("--quick", action="store_true", help="2 epochs, 32 px: a check that it all runs (for tests)")
    return p


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(s) for s in args.sizes.split(",")]
    chosen = args.recipes.split(",")
    unknown = sorted(set(chosen) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown} (known: {', '.join(RECIPES)})")
    path = Path(args.json) if args.json else RESULTS_DIR / f"transfer-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    load_before = os.getloadavg()
    for per_class in sizes:
        for recipe in chosen:
            rows.append(run_one(recipe, per_class, args))
            print_table(rows[-1:])
            report = {
                "args": vars(args),
                "cpu": cpu_info(),
                "loadavg_before_after": [load_before, os.getloadavg()],
                "total_seconds": round(time.perf_counter() - started, 1),
                "test_sample": f"{args.test_per_class} images of each class" if args.test_per_class else "all",
                "rows": rows,
            }
            write_results("transfer", report, str(path))  # after every run: a long bench keeps what it did
    print()
    print_table(rows)
    print(f"-> {path}")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
