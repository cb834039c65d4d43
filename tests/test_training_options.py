"""Training options checked by what they do on real Fashion-MNIST images: class-weighted loss on imbalanced data,
early stopping, and the rotation / vertical flip / hue augmentations end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.bundle import read_bundle
from tests.test_training import FAST, _write_recipe, run_train
from training import prepare_fashion_mnist, recipes, train
from training.data import class_loss_weights, find_splits

MAJORITY, MINORITY = "Trouser", "Bag"
# A small network in float32 (whatever the CPU offers), one thread (steady on a loaded machine), and enough
# steps per epoch for BatchNorm's running statistics to settle: with fewer, the eval-mode network answers
# one class whatever the weights.
SMALL = ["--arch-kwargs", '{"width": 8, "stages": 2}', "--epochs", "4", "--batch-size", "16", "--opt", "adamw",
         "--lr", "0.003", "--threads", "1", "--workers", "0", "--quiet", "--amp", "off"]  # fmt: skip


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/: 200 trousers, 10 bags (20:1) from Fashion-MNIST's training set; test/: 50 of each from its test set."""
    source = prepare_fashion_mnist.DEFAULT_SOURCE
    root = tmp_path_factory.mktemp("imbalanced")
    for split, counts in (("train", {MAJORITY: 200, MINORITY: 10}), ("test", {MAJORITY: 50, MINORITY: 50})):
        stem = prepare_fashion_mnist.FILES[split]
        images = prepare_fashion_mnist.read_idx(source / f"{stem}-images-idx3-ubyte.gz")
        labels = prepare_fashion_mnist.read_idx(source / f"{stem}-labels-idx1-ubyte.gz")
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in np.flatnonzero(labels == prepare_fashion_mnist.CLASS_NAMES.index(name))[:count]:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    return root


def test_class_weights_are_inverse_frequencies_averaging_one_per_sample(imbalanced: Path) -> None:
    splits = find_splits(imbalanced, val_split=0.1, seed=0)
    counts = {name: sum(label == i for _, label in splits.train) for i, name in enumerate(splits.class_names)}
    assert counts == {MINORITY: 9, MAJORITY: 180}
    weights = class_loss_weights(splits.train, 2).tolist()
    assert weights == pytest.approx([189 / (2 * 9), 189 / (2 * 180)])  # Bag, Trouser (sorted class order)
    assert sum(w * counts[n] for w, n in zip(weights, splits.class_names, strict=True)) == pytest.approx(189)
    assert class_loss_weights([(Path("a.png"), 0)], 3).tolist() == [pytest.approx(1 / 3), 0.0, 0.0]


def test_class_weights_raise_the_minority_recall_on_imbalanced_data(imbalanced: Path, tmp_path: Path) -> None:
    """The same runs (seeds, data order, initial weights) with and without --class-weights auto: the
    unweighted loss learns that bags are rare and calls most test bags trousers; the weighted one finds them,
    without giving up the trousers. Two seeds, averaged: one 20:1 run is noisy, the difference is not."""
    recall: dict[str, list[float]] = {"none": [], "auto": []}
    majority: dict[str, list[float]] = {"none": [], "auto": []}
    for seed in ("1", "2"):
        for weights in recall:
            out = tmp_path / f"{weights}-{seed}"
            result = run_train("--data", str(imbalanced), "--out", str(out), *SMALL, "--seed", seed,
                               "--class-weights", weights)  # fmt: skip
            per_class = result["eval"]["per_class"]
            assert result["eval"]["split"] == "test" and per_class[MINORITY]["support"] == 50
            recall[weights].append(per_class[MINORITY]["recall"])
            majority[weights].append(per_class[MAJORITY]["recall"])
    mean = {k: sum(v) / len(v) for k, v in recall.items()}
    assert mean["auto"] >= mean["none"] + 0.25, recall
    assert sum(majority["auto"]) / 2 >= 0.8, f"the weighted runs gave up the majority class: {majority}"
    assert read_bundle(tmp_path / "auto-1" / "best.pth").training["args"]["class_weights"] == "auto"


def _two_class_folder(two_class_images: dict[str, list[Path]], root: Path) -> Path:
    for name, files in two_class_images.items():
        (root / name).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, root / name / f"{i:03d}.png")
    return root


def test_patience_stops_when_validation_stops_improving(two_class_images, tmp_path: Path) -> None:
    """With 8 validation images top-1 takes 9 values, so it can improve at most 9 times: --patience 2 must
    stop by epoch 9 + 8 + 2 = 19, before the 20 asked for, and right after 2 epochs without a new best."""
    data = _two_class_folder(two_class_images, tmp_path / "data")
    out = tmp_path / "run"
    result = run_train("--data", str(data), "--out", str(out), *SMALL[:2], "--epochs", "20", "--batch-size", "16",
                       "--threads", "1", "--workers", "0", "--quiet", "--seed", "1", "--patience", "2")  # fmt: skip
    history = result["history"]
    assert read_bundle(out / "best.pth").training["data"]["val"] == 8
    assert len(history) < 20, "early stopping never stopped"
    accuracies = [h["val_acc"] for h in history]
    best_before = max(accuracies[:-3], default=-1.0)
    assert accuracies[-3] > best_before, f"the last new best must be 3 epochs from the end: {accuracies}"
    assert max(accuracies[-2:]) <= accuracies[-3], accuracies
    assert result["eval"]["split"] == "test", "a run stopped early is a finished run: it gets its evaluation"
    assert read_bundle(out / "best.pth").training["metrics"]["val_top1"] == pytest.approx(accuracies[-3], abs=1e-6)


def test_rotation_vertical_flip_and_hue_train_end_to_end(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    augment = {"rotation": 15.0, "vflip": 0.5, "hue": 0.05}
    run_train("--data", str(fashion_subset), "--out", str(out), *FAST, "--channels", "3", "--rotation", "15",
              "--vflip", "0.5", "--hue", "0.05", "--color-jitter", "0.2", "--mixup-alpha", "0.2",
              "--class-weights", "auto")  # fmt: skip
    bundle = read_bundle(out / "best.pth")
    assert bundle.preprocessing.channels == 3
    assert {k: bundle.training["args"][k] for k in augment} == augment


def test_hue_on_grey_input_and_rotation_with_batch_aug_are_refused(fashion_subset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--hue needs colour input"):
        run_train("--data", str(fashion_subset), "--out", str(tmp_path / "grey"), *FAST, "--hue", "0.1")
    with pytest.raises(SystemExit, match="--batch-aug.*--rotation"):
        run_train("--data", str(fashion_subset), "--out", str(tmp_path / "batch"), *FAST, "--batch-aug",
                  "--rotation", "10")  # fmt: skip


def test_a_recipe_may_set_the_new_options_and_misspelling_them_is_named(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path / "aug.toml", 'rotation = 10\nvflip = 0.5\nhue = 0.1\nclass_weights = "auto"\n')
    assert recipes.load_recipe(recipe) == {"rotation": 10, "vflip": 0.5, "hue": 0.1, "class_weights": "auto"}
    args = recipes.parse_args(train.get_args_parser(), ["--config", str(recipe), "--data", "d", "--out", "o"])
    assert (args.rotation, args.vflip, args.hue, args.class_weights) == (10, 0.5, 0.1, "auto")
    for text, named in (('class_weights = "balanced"\n', "none, auto"), ("rotate = 10\n", "'rotation'")):
        with pytest.raises(ValueError, match=named):
            recipes.load_recipe(_write_recipe(tmp_path / "bad.toml", text))
