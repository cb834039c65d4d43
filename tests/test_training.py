"""Training end to end on tiny real Fashion-MNIST subsets: layouts, transfer learning, resume, torchrun, CLIs,
recipe files and the resolved config a run saves."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.bundle import Bundle, load_bundle, read_bundle
from tests.support import ROOT
from training import evaluate, flags, predict, prepare_fashion_mnist, recipes, train
from training.config import TrainConfig
from training.precision import autocast_dtype, cpu_has_native_bf16

FAST = ["--epochs", "1", "--batch-size", "16", "--quiet", "--workers", "0", "--seed", "1"]


def run_train(*argv: str) -> dict:
    return train.main(recipes.parse_args(train.get_args_parser(), list(argv)))


def _check_run(out: Path, classes: list[str]) -> Bundle:
    for name in ("best.pth", "last.pth", "history.json", "args.json", "curves.png", "eval/metrics.json",
                 "eval/confusion.png", "eval/confusion.json"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing"
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    bundle, model = load_bundle(out / "best.pth")
    assert list(bundle.class_names) == classes
    assert bundle.training["metrics"]["val_top1"] >= 0
    assert json.loads((out / "args.json").read_text())["preprocessing"] == bundle.preprocessing.to_dict()
    return bundle


def test_prepare_is_idempotent_with_real_class_names(fashion_subset: Path) -> None:
    classes = sorted(p.name for p in (fashion_subset / "train").iterdir() if p.is_dir())
    assert classes == sorted(prepare_fashion_mnist.CLASS_NAMES)
    assert len(list((fashion_subset / "train" / "Bag").glob("*.png"))) == 20
    again = prepare_fashion_mnist.write_split(
        prepare_fashion_mnist.DEFAULT_SOURCE, fashion_subset, "train", limit_per_class=20
    )
    assert again == 0


def test_prepare_names_the_package_when_missing(tmp_path: Path) -> None:
    args = prepare_fashion_mnist.get_args_parser().parse_args(["--out", str(tmp_path), "--source", str(tmp_path)])
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist.main(args)


def test_train_split_folders_scratch(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_train("--data", str(fashion_subset), "--out", str(out), *FAST)
    bundle = _check_run(out, sorted(prepare_fashion_mnist.CLASS_NAMES))
    prep = bundle.preprocessing
    assert (prep.channels, prep.crop, prep.resize) == (1, 28, 28)  # grey 28 px data detected
    assert 0.2 < prep.mean[0] < 0.4
    assert result["eval"]["split"] == "test" and result["eval"]["samples"] == 200
    assert bundle.training["data"]["layout"] == "split-folders"


def test_train_imagefolder_with_stratified_split(two_class_images, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name, files in two_class_images.items():
        (data / name).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, data / name / f"{i:03d}.png")
    out = tmp_path / "run"
    run_train("--data", str(data), "--out", str(out), "--val-split", "0.2", "--test-split", "0.2",
              "--balance", "--opt", "adamw", "--sched", "step", "--ema-decay", "0.9", *FAST)  # fmt: skip
    bundle = _check_run(out, ["Bag", "Trouser"])
    assert bundle.training["data"] == {**bundle.training["data"], "train": 48, "val": 16, "test": 16}


def test_train_kaggle_flat_layout(two_class_images, tmp_path: Path) -> None:
    data = tmp_path / "dogs-vs-cats" / "train"
    data.mkdir(parents=True)
    for name, label in (("Trouser", "cat"), ("Bag", "dog")):
        for i, f in enumerate(two_class_images[name]):
            shutil.copy(f, data / f"{label}.{i}.png")
    out = tmp_path / "run"
    run_train("--data", str(data.parent), "--out", str(out), "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
              "--sched", "plateau", "--clip-grad", "5", *FAST)  # fmt: skip
    bundle = _check_run(out, ["cat", "dog"])
    assert bundle.training["data"]["layout"] == "flat-splits"


def test_transfer_learning_from_offline_imagenet_weights(two_class_images, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name, files in two_class_images.items():
        (data / name).mkdir(parents=True)
        for i, f in enumerate(files[:16]):
            shutil.copy(f, data / name / f"{i:03d}.png")
    out = tmp_path / "run"
    run_train("--data", str(data), "--out", str(out), "--arch", "efficientnet_lite0", "--img-size", "64",
              "--freeze-backbone", "--auto-augment", "trivialaugment", *FAST)  # fmt: skip
    bundle = _check_run(out, ["Bag", "Trouser"])
    assert bundle.preprocessing.channels == 3 and bundle.preprocessing.mean == (0.5, 0.5, 0.5)
    from model.registry import build_model

    imagenet = build_model("efficientnet_lite0", num_classes=2, pretrained="imagenet", image_size=64).state_dict()
    trained = bundle.state_dict
    assert torch.equal(trained["_conv_stem.weight"], imagenet["_conv_stem.weight"]), "backbone moved"
    assert torch.equal(trained["_bn0.running_mean"], imagenet["_bn0.running_mean"]), "frozen BN stats drifted"
    assert not torch.equal(trained["_fc.weight"], imagenet["_fc.weight"]), "head did not train"


@pytest.mark.parametrize("pipeline", [[], ["--batch-aug"]], ids=["per-image", "batch-aug"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(
    two_class_images, tmp_path: Path, pipeline: list[str]
) -> None:
    data = tmp_path / "data"
    for name, files in two_class_images.items():
        (data / name).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, data / name / f"{i:03d}.png")
    common = ["--data", str(data), "--epochs", "2", "--batch-size", "16", "--quiet", "--workers", "0",
              "--deterministic", "--seed", "7", "--ema-decay", "0.5", "--random-erasing", "0.5", *pipeline]  # fmt: skip
    run_train(*common, "--out", str(tmp_path / "full"))
    run_train(*common, "--out", str(tmp_path / "cut"), "--stop-after", "1")
    assert len(json.loads((tmp_path / "cut" / "history.json").read_text())) == 1
    run_train(*common, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "last.pth"))
    full = read_bundle(tmp_path / "full" / "last.pth")
    resumed = read_bundle(tmp_path / "cut" / "last.pth")
    assert full.state_dict.keys() == resumed.state_dict.keys()
    for key, value in full.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["val_loss"] for h in h_full] == [h["val_loss"] for h in h_cut]


def test_torchrun_two_processes_on_cpu(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.train",
            "--data",
            str(fashion_subset),
            "--out",
            str(out),
            "--threads",
            "1",
            *FAST,
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        assert f"process {rank} of 2 on cpu, process group backend gloo" in proc.stderr, proc.stderr[-3000:]
    _check_run(out, sorted(prepare_fashion_mnist.CLASS_NAMES))


def test_evaluate_and_predict_clis(fashion_subset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run_train("--data", str(fashion_subset), "--out", str(out), *FAST)
    metrics = evaluate.main(
        evaluate.get_args_parser().parse_args(["--bundle", str(out / "best.pth"), "--data", str(fashion_subset)])
    )
    assert metrics["split"] == "test" and metrics["samples"] == 200
    assert set(metrics["per_class"]) == set(prepare_fashion_mnist.CLASS_NAMES)
    assert (out / "eval-test" / "confusion.png").is_file()
    confusion = json.loads((out / "eval-test" / "confusion.json").read_text())["matrix"]
    assert sum(map(sum, confusion)) == 200

    bag = sorted((fashion_subset / "test" / "Bag").glob("*.png"))[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.predict",
            "--bundle",
            str(out / "best.pth"),
            "--json",
            "--top-k",
            "2",
            str(bag),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    preds = answer["results"][0]["predictions"]
    assert len(preds) == 2 and preds[0]["label"] in prepare_fashion_mnist.CLASS_NAMES
    assert answer["model"] == "best"


def test_predict_cli_on_the_default_model(default_bundle: Path, photos) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.predict", "--bundle", str(default_bundle), str(photos["chelsea"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[1]
    assert any(cat in first for cat in ("tabby", "tiger cat", "Egyptian cat")), proc.stdout


def test_predict_cli_reports_bad_files(default_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    args = predict.get_args_parser().parse_args(["--bundle", str(default_bundle), str(bad)])
    with pytest.raises(SystemExit):
        predict.main(args)


def test_bfloat16_training_on_cpu(fashion_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--amp on` on CPU: convolutions really run in bfloat16 while training, evaluation and the bundle stay float32."""
    dtypes: set[torch.dtype] = set()
    conv_forward = torch.nn.Conv2d.forward

    def spy(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = conv_forward(self, x)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    out = tmp_path / "run"
    run_train("--data", str(fashion_subset), "--out", str(out), *FAST, "--amp", "on")
    assert dtypes == {torch.bfloat16, torch.float32}
    weights = read_bundle(out / "best.pth").state_dict
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("off", cuda) is None and autocast_dtype("on", cpu) == torch.bfloat16
    # what --amp auto picks depends on the hardware: tests/test_devices.py (mocked probes), tests/test_cuda.py


# ------------------------------------------------------------------------------------ recipes and config


def test_every_recipe_file_loads_and_the_default_recipe_is_the_flags_defaults() -> None:
    names = sorted(p.stem for p in recipes.RECIPES_DIR.glob("*.toml"))
    assert {"default", "small", "long", "distilled"} <= set(names)
    loaded = {name: recipes.load_recipe(recipes.recipe_path(name)) for name in names}
    defaults = flags.defaults()
    assert loaded["default"] and all(defaults[k] == v for k, v in loaded["default"].items()), loaded["default"]
    assert loaded["small"] == {"arch": "simple_cnn", "epochs": 12, "val_split": 0.05, "cache": True, "batch_aug": True,
                              "channels_last": True}  # fmt: skip
    assert loaded["long"]["arch_kwargs"] == {"width": 64, "tta_hflip": True} and loaded["long"]["batch_aug"] is True
    assert loaded["distilled"]["distill_alpha"] == 0.9 and loaded["distilled"]["distill_from"].endswith("best.pth")


def _write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_file_round_trip(fashion_subset: Path, tmp_path: Path) -> None:
    """A recipe's values reach the parsed flags unchanged, and a config built in code from the same options
    is the same config as the command line's."""
    options = {"arch": "simple_cnn", "arch_kwargs": {"width": 8, "stages": 2}, "epochs": 3, "batch_size": 16,
               "opt": "adamw", "lr": 0.003, "nesterov": False, "cache": True, "random_erasing": 0.25}  # fmt: skip
    recipe = _write_recipe(tmp_path / "r.toml", """
arch = "simple_cnn"
arch_kwargs = { width = 8, stages = 2 }
epochs = 3
batch_size = 16
opt = "adamw"
lr = 0.003
nesterov = false
cache = true
random_erasing = 0.25
""")  # fmt: skip
    assert recipes.load_recipe(recipe) == options
    args = recipes.parse_args(train.get_args_parser(), ["--config", str(recipe), "--data", str(fashion_subset),
                                                        "--out", str(tmp_path / "run")])  # fmt: skip
    assert {k: getattr(args, k) for k in options} == options
    assert args.config == str(recipe) and args.label_smoothing == flags.defaults()["label_smoothing"]
    from_cli = TrainConfig.from_args(args)
    in_code = TrainConfig.from_options(
        {**options, "config": str(recipe), "data": str(fashion_subset), "out": str(tmp_path / "run")}
    )
    assert from_cli == in_code
    assert TrainConfig.from_dict(json.loads(json.dumps(from_cli.to_dict()))) == from_cli


def test_flags_override_the_recipe_file(tmp_path: Path) -> None:
    parser = train.get_args_parser()
    small = str(recipes.recipe_path("small"))
    args = recipes.parse_args(parser, ["--config", small, "--data", "d", "--out", "o", "--epochs", "3", "--no-cache"])
    assert (args.epochs, args.cache, args.channels_last, args.arch) == (3, False, True, "simple_cnn")
    argv = ["--config", str(recipes.recipe_path("long")), "--data", "d", "--out", "o", "--arch-kwargs", '{"width": 16}',
            "--no-batch-aug"]  # fmt: skip
    args = recipes.parse_args(train.get_args_parser(), argv)
    assert (args.arch_kwargs, args.batch_aug, args.val_split, args.amp) == ('{"width": 16}', False, 0.05, "on")
    # a recipe may name the data and the run folder: the flags are no longer required, and still win
    folder = _write_recipe(tmp_path / "with-data.toml", 'data = "from-file"\nout = "runs/from-file"\n')
    args = recipes.parse_args(train.get_args_parser(), ["--config", str(folder), "--out", "runs/flag"])
    assert (args.data, args.out) == ("from-file", "runs/flag")


@pytest.mark.parametrize(
    "text, names",
    [
        ("batchsize = 64\n", ["'batchsize'", "'batch_size'"]),
        ("epochs = 10\n[model]\narch = 'simple_cnn'\n", ["'model'"]),
        ('epochs = "ten"\n', ["epochs", "int"]),
        ('opt = "adam"\n', ["opt", "sgd, adamw"]),
        ("cache = 1\n", ["cache", "true or false"]),
        ('config = "other.toml"\n', ["'config'"]),
    ],
    ids=["unknown-key", "unknown-table", "wrong-type", "not-a-choice", "not-a-switch", "nested-recipe"],
)
def test_recipe_file_errors_name_the_key(tmp_path: Path, capsys, text: str, names: list[str]) -> None:
    recipe = _write_recipe(tmp_path / "bad.toml", text)
    with pytest.raises(ValueError) as err:
        recipes.load_recipe(recipe)
    assert str(recipe) in str(err.value) and all(name in str(err.value) for name in names), str(err.value)
    with pytest.raises(SystemExit) as exit_:
        recipes.parse_args(train.get_args_parser(), ["--config", str(recipe), "--data", "d", "--out", "o"])
    assert exit_.value.code == 2 and names[0] in capsys.readouterr().err


def test_the_saved_config_is_what_ran(fashion_subset: Path, tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path / "r.toml", 'arch_kwargs = { width = 8, stages = 2 }\nsched = "none"\n'
                           'epochs = 2\nlabel_smoothing = 0.05\n')  # fmt: skip
    out = tmp_path / "run"
    args = recipes.parse_args(train.get_args_parser(), ["--config", str(recipe), "--data", str(fashion_subset),
                                                        "--out", str(out), *FAST])  # fmt: skip
    given = dict(vars(args))
    result = train.main(args)
    assert vars(args) == given, "training changed the caller's arguments"
    config = result["config"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    saved = json.loads((out / "args.json").read_text())
    assert saved == config.to_dict() and TrainConfig.from_dict(saved) == config
    # resolved: the file's values, the flags over them, and what training.train works out itself
    assert (config.epochs, config.label_smoothing, config.sched, config.seed) == (1, 0.05, "none", 1)
    assert config.lr == 0.1 * 16 / 128 and config.wd == 5e-4 and config.pretrained == "none"
    assert (config.img_size, config.channels, config.crop, config.workers) == (28, 1, "pad", 0)
    assert config.device == "cpu" and config.world_size == 1 and config.channels_last is False
    assert config.amp == "auto" and config.amp_dtype == ("bfloat16" if cpu_has_native_bf16() else None)
    # ...and what ran: the schedule-free learning rate, the threads, the bundle's network and input
    assert [h["lr"] for h in result["history"]] == [config.lr]
    assert torch.get_num_threads() == config.threads
    bundle = _check_run(out, sorted(prepare_fashion_mnist.CLASS_NAMES))
    assert (bundle.arch, bundle.arch_kwargs) == (config.arch, config.arch_kwargs)
    assert bundle.preprocessing == config.preprocessing
    assert bundle.training["args"] == config.options() and bundle.training["args"]["config"] == str(recipe)
