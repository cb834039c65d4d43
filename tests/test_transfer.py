"""Small-data training: ``--per-class`` subsets, and bench/transfer.py's runs end to end on real images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import transfer
from tests.support import ROOT
from training import recipes
from training.config import splits_for
from training.data import find_splits, per_class_subset


def _counts(samples: list) -> Counter:
    return Counter(label for _, label in samples)


def test_per_class_subset_is_stratified_seeded_and_nested(fashion_subset: Path) -> None:
    train = find_splits(fashion_subset, val_split=0.1).train
    five = per_class_subset(train, 5, seed=3)
    assert set(_counts(five).values()) == {5} and len(_counts(five)) == 10
    assert per_class_subset(train, 5, seed=3) == five  # the seed decides
    assert per_class_subset(train, 5, seed=4) != five
    assert set(per_class_subset(train, 2, seed=3)) <= set(five) <= set(per_class_subset(train, 9, seed=3))
    assert sorted(per_class_subset(train, 1000, seed=3)) == sorted(train)  # a class smaller than the limit: all
    with pytest.raises(ValueError, match="must be 1 or more"):
        per_class_subset(train, 0, seed=3)


def test_per_class_limits_the_training_split_only(fashion_subset: Path) -> None:
    whole = splits_for({"data": str(fashion_subset), "val_split": 0.2, "seed": 1})
    limited = splits_for({"data": str(fashion_subset), "val_split": 0.2, "seed": 1, "per_class": 3})
    assert _counts(limited.train) == dict.fromkeys(range(10), 3)
    assert set(limited.train) <= set(whole.train)
    assert (limited.val, limited.test) == (whole.val, whole.test)  # scored on the same images at every size


def test_per_class_flag_reaches_training_and_bad_values_are_refused(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = [sys.executable, "-m", "training.train", "--data", str(fashion_subset), "--out", str(out), "--quiet",
            "--epochs", "1", "--workers", "0"]  # fmt: skip
    done = subprocess.run([*base, "--per-class", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--per-class 0: must be 1 or more" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([*base, "--per-class", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "args.json").read_text())["per_class"] == 4
    assert "'train': 40" in done.stderr  # the data line training.train logs


def test_the_recipe_files_and_the_schedule_that_scales_them() -> None:
    loaded = {name: recipes.load_recipe(transfer.recipe_file(name)) for name in transfer.RECIPES}
    assert loaded["scratch"]["arch"] == "simple_cnn"
    assert loaded["frozen"]["freeze_backbone"] and "unfreeze_at" not in loaded["frozen"]
    assert loaded["finetune"]["backbone_lr_scale"] < 1 and not loaded["finetune"].get("freeze_backbone")
    recipe = loaded["finetune"]
    assert transfer.scaled_schedule(recipe, transfer.REFERENCE_SIZE) == {
        "epochs": recipe["epochs"],
        "unfreeze_at": recipe["unfreeze_at"],
    }
    for size in (5, 20, 500, 5000):
        s = transfer.scaled_schedule(recipe, size)
        assert s["epochs"] == max(2, round(recipe["epochs"] * math.sqrt(transfer.REFERENCE_SIZE / size)))
        assert 2 <= s["unfreeze_at"] <= s["epochs"]
    assert transfer.scaled_schedule(recipe, 20)["unfreeze_at"] > recipe["unfreeze_at"]


def test_bench_quick_runs_every_recipe_on_real_images(fashion_subset: Path, tmp_path: Path) -> None:
    results = tmp_path / "transfer.json"
    args = transfer.get_args_parser().parse_args(["--quick", "--data", str(fashion_subset), "--sizes", "4,8",
                                                  "--test-per-class", "0", "--runs", str(tmp_path / "runs"),
                                                  "--json", str(results)])  # fmt: skip
    transfer.main(args)
    data = json.loads(results.read_text())
    assert data["args"]["quick"] is True and data["cpu"]["cores"] >= 1 and data["test_sample"] == "all"
    rows = data["rows"]
    assert [(r["images_per_class"], r["recipe"]) for r in rows] == [
        (size, recipe) for size in (4, 8) for recipe in transfer.RECIPES
    ]
    for r in rows:
        assert isinstance(r["test_top1"], float) and 0.0 <= r["test_top1"] <= 1.0, r
        assert 0.0 <= r["best_val_top1"] <= 1.0 and r["wall_seconds"] > 0 and r["epochs"] == 2
        assert r["train_images"] == 10 * r["images_per_class"] and r["test_images"] == 200  # the whole test/
        assert r["command"].startswith(f"python -m training.train --config configs/transfer-{r['recipe']}.toml")
        assert f"--per-class {r['images_per_class']}" in r["command"]
        assert (tmp_path / "runs" / f"{r['recipe']}-{r['images_per_class']}" / "best.pth").is_file()
    assert {r["arch"] for r in rows if r["recipe"] != "scratch"} == {"efficientnet_lite0"}
    assert {r["unfreeze_at"] for r in rows if r["recipe"] == "finetune"} == {2}


def test_bench_sample_of_the_test_split_is_stratified(fashion_subset: Path, tmp_path: Path) -> None:
    args = transfer.get_args_parser().parse_args(["--quick", "--data", str(fashion_subset), "--sizes", "3",
                                                  "--recipes", "scratch", "--test-per-class", "7",
                                                  "--runs", str(tmp_path / "runs"),
                                                  "--json", str(tmp_path / "t.json")])  # fmt: skip
    (row,) = transfer.main(args)
    assert row["test_images"] == 70 and 0.0 <= row["test_top1"] <= 1.0
    with pytest.raises(SystemExit, match="unknown"):
        transfer.main(transfer.get_args_parser().parse_args(["--recipes", "scratch,nope"]))
