"""The model quality toolkit end to end on a tiny real Fashion-MNIST subset: tuning, distillation,
pruning, calibration and the architecture comparison (one epoch, small networks)."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.bundle import load_bundle, read_bundle
from model.preprocessing import Preprocessing
from model.torch_predictor import TorchPredictor
from tests.support import ROOT
from training import compare, evaluate, prune, sparsity, train, tune
from training.calibration import expected_calibration_error, fit_temperature
from training.distill import DistillationLoss, Teacher, adapt_batch
from training.recipes import DEFAULT_RECIPE, load_recipe

SMALL = ["--arch-kwargs", '{"width": 8, "stages": 2}']
FAST = ["--epochs", "1", "--batch-size", "16", "--quiet", "--workers", "0", "--seed", "1"]


def run_train(*argv: str, epoch_callback=None) -> dict:
    return train.main(train.get_args_parser().parse_args(list(argv)), epoch_callback=epoch_callback)


@pytest.fixture(scope="module")
def trained(fashion_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simple_cnn trained for two epochs on the real subset."""
    out = tmp_path_factory.mktemp("trained")
    run_train("--data", str(fashion_subset), "--out", str(out), *SMALL, *FAST, "--epochs", "2")
    return out / "best.pth"


def _classes(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "train").iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------------- tuning


def test_epoch_callback_stops_training_without_final_evaluation(fashion_subset: Path, tmp_path: Path) -> None:
    seen = []
    result = run_train("--data", str(fashion_subset), "--out", str(tmp_path / "run"), *SMALL, *FAST,
                       "--epochs", "3", epoch_callback=lambda entry: seen.append(entry) or True)  # fmt: skip
    assert [e["epoch"] for e in seen] == [1] and len(result["history"]) == 1
    assert result["stopped_by_callback"] and "eval" not in result
    assert (tmp_path / "run" / "best.pth").is_file()


def _tune_args(data: Path, out: Path, trials: int) -> list[str]:
    return ["--data", str(data), "--trials", str(trials), "--epochs", "1", "--out", str(out),
            "--startup-trials", "1", "--", *SMALL, "--workers", "0", "--seed", "1"]  # fmt: skip


def test_tune_writes_a_runnable_best_command_and_plots_and_resumes(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    summary = tune.main(tune.get_args_parser().parse_args(_tune_args(fashion_subset, out, 2)))
    assert summary["trials"] == 2 and summary["complete"] == 2
    import optuna

    storage = f"sqlite:///{out / 'study.db'}"
    first = optuna.load_study(study_name="tune-simple_cnn", storage=storage).trials[0]
    # the search starts from the default recipe file: its values, lr and wd as training resolves them...
    recipe = load_recipe(DEFAULT_RECIPE)
    assert set(first.params) == set(tune.SEARCHED)
    assert all(first.params[k] == v for k, v in recipe.items() if k in first.params), first.params
    assert (first.params["lr"], first.params["wd"]) == (0.1, 5e-4)  # the flags' defaults: SGD from scratch, batch 128
    # ...and that is what its first trial ran (a config built in code, saved by the run)
    ran = json.loads((Path(first.user_attrs["out"]) / "args.json").read_text())
    assert first.params == {k: ran[k] for k in first.params}
    assert 0 <= summary["best_value"] <= 1
    command = (out / "best_command.txt").read_text().strip()
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "training.train"]
    parsed = train.get_args_parser().parse_args(argv[3:])  # ready to run: training.train accepts it
    assert parsed.lr == pytest.approx(summary["best_params"]["lr"], rel=1e-4)
    assert parsed.batch_size == summary["best_params"]["batch_size"]
    assert parsed.auto_augment == summary["best_params"]["auto_augment"]
    assert json.loads(parsed.arch_kwargs) == {"width": 8, "stages": 2}
    for name in ("optimization_history.png", "param_importances.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 100
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    assert all(Path(r["out"], "best.pth").is_file() for r in rows)

    # The SQLite study is shared: a second process and this one add trials to it at the same time.
    other = subprocess.Popen(
        [sys.executable, "-m", "training.tune", *_tune_args(fashion_subset, out, 1)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    again = tune.main(tune.get_args_parser().parse_args(_tune_args(fashion_subset, out, 1)))
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="tune-simple_cnn", storage=storage)
    assert len(study.trials) == 4 and again["trials"] >= 3
    assert len({t.user_attrs["out"] for t in study.trials}) == 4  # every trial has its own run folder


# ------------------------------------------------------------------------------------------ distillation


def test_distillation_loss_terms() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))
    hard = torch.nn.CrossEntropyLoss()
    loss = DistillationLoss(hard, alpha=0.7, temperature=3.0)
    # A teacher that agrees with the student adds nothing; one that disagrees adds a positive term.
    assert loss(logits, (labels, logits)) == pytest.approx(0.3 * float(hard(logits, labels)), rel=1e-5)
    assert loss(logits, (labels, -logits)) > loss(logits, (labels, logits))


def test_adapt_batch_converts_grey_student_input_to_a_colour_teacher() -> None:
    grey = Preprocessing(resize=28, crop=28, mean=[0.3], std=[0.35], interpolation="bilinear", channels=1)
    colour = Preprocessing(resize=56, crop=56, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear", channels=3)
    pixels = torch.rand(2, 1, 28, 28)
    x = (pixels - 0.3) / 0.35
    y = adapt_batch(x, grey, colour)
    assert y.shape == (2, 3, 56, 56)
    assert torch.allclose(y[:, 0], y[:, 2]) and y.min() >= -1.01 and y.max() <= 1.01
    assert adapt_batch(x, grey, grey) is x


def test_teacher_runs_in_the_students_autocast_type(fashion_subset: Path, trained: Path) -> None:
    """With ``--amp on`` the teacher's forward pass is bfloat16 too (cheaper), and its logits stay close."""
    bundle = read_bundle(trained)
    prep = bundle.preprocessing
    images = torch.randn(8, 1, 28, 28)
    full = Teacher.from_file(trained, _classes(fashion_subset), prep, torch.device("cpu")).logits(images)
    half = Teacher.from_file(
        trained, _classes(fashion_subset), prep, torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True
    ).logits(images)
    assert full.dtype == half.dtype == torch.float32
    assert not torch.equal(full, half), "the teacher did not run in bfloat16"
    assert torch.allclose(full, half, atol=0.1, rtol=0.05)


def test_distilled_student_learns_from_the_teacher(
    fashion_subset: Path, trained: Path, tmp_path: Path, make_tiny_bundle
) -> None:
    # Two different teachers: the trained grey 28 px model, and a random colour 32 px one (whose
    # input is converted on the fly).
    other_teacher = make_tiny_bundle(tmp_path / "other.pth", _classes(fashion_subset), seed=3, size=32)
    common = ["--data", str(fashion_subset), *SMALL, *FAST, "--deterministic"]

    def student(name: str, *extra: str) -> dict[str, torch.Tensor]:
        run_train(*common, "--out", str(tmp_path / name), *extra)
        return read_bundle(tmp_path / name / "last.pth").state_dict

    plain = student("plain")
    by_trained = student("a", "--distill-from", str(trained), "--distill-alpha", "0.9")
    by_other = student("b", "--distill-from", str(other_teacher), "--distill-alpha", "0.9")
    no_soft = student("c", "--distill-from", str(trained), "--distill-alpha", "0")
    key = "head.weight"
    assert not torch.equal(by_trained[key], by_other[key]), "the teacher did not change the student"
    assert not torch.equal(by_trained[key], plain[key])
    assert all(torch.equal(no_soft[k], plain[k]) for k in plain), "alpha 0 must be plain training"
    args = json.loads((tmp_path / "a" / "args.json").read_text())
    assert args["distill_from"] == str(trained) and args["distill_alpha"] == 0.9


# ---------------------------------------------------------------------------------------------- pruning


def test_prune_zeroes_weights_and_fine_tuning_keeps_them_zero(
    fashion_subset: Path, trained: Path, tmp_path: Path
) -> None:
    pruned = tmp_path / "pruned.pth"
    report = prune.main(prune.get_args_parser().parse_args(["--bundle", str(trained), "--amount", "0.3",
                                                            "--out", str(pruned)]))  # fmt: skip
    bundle, model = load_bundle(pruned)  # a plain bundle: no weight_orig / weight_mask
    assert not any(k.endswith(("_orig", "_mask")) for k in bundle.state_dict)
    convs = {k: v for k, v in bundle.state_dict.items() if k.endswith(".weight") and v.ndim == 4}
    for name, w in convs.items():
        assert (w == 0).sum() == round(0.3 * w.numel()), name
    assert not (bundle.state_dict["head.weight"] == 0).any(), "the head must stay whole"
    assert report["after"]["prunable_sparsity"] > 0.25 > report["before"]["prunable_sparsity"]
    assert report["after"]["gzip_bytes"] < report["before"]["gzip_bytes"]
    assert json.loads(pruned.with_suffix(".json").read_text())["amount"] == 0.3

    common = ["--data", str(fashion_subset), "--init-from", str(pruned), *FAST]
    run_train(*common, "--keep-zeros", "--out", str(tmp_path / "ft"))
    tuned = read_bundle(tmp_path / "ft" / "best.pth")
    assert tuned.arch_kwargs == bundle.arch_kwargs and tuned.preprocessing == bundle.preprocessing
    for name, w in convs.items():
        after = tuned.state_dict[name]
        assert torch.equal(after[w == 0], torch.zeros_like(after[w == 0])), f"{name}: zeros came back"
        assert not torch.equal(after, w), f"{name} did not train"
    run_train(*common, "--out", str(tmp_path / "ft-free"))
    free = read_bundle(tmp_path / "ft-free" / "best.pth").state_dict
    assert any((free[n][w == 0] != 0).any() for n, w in convs.items()), "without --keep-zeros zeros move"
    assert sparsity.describe(tmp_path / "ft" / "best.pth")["prunable_sparsity"] > 0.25


def test_structured_pruning_zeroes_whole_filters(trained: Path, tmp_path: Path) -> None:
    prune.prune_bundle(trained, tmp_path / "s.pth", 0.5, structured=True)
    state = read_bundle(tmp_path / "s.pth").state_dict
    for name, w in state.items():
        if name.endswith(".weight") and w.ndim == 4:
            dead = (w.flatten(1) == 0).all(dim=1)
            assert int(dead.sum()) == round(0.5 * w.shape[0]), name


# ------------------------------------------------------------------------------------------ calibration


def test_ece_and_temperature_fit_on_known_cases() -> None:
    probs = torch.tensor([[0.9, 0.1]] * 10)
    right = torch.zeros(10, dtype=torch.long)
    assert expected_calibration_error(probs, right)[0] == pytest.approx(0.1)  # 90 % sure, always right
    half = torch.tensor([0] * 9 + [1])
    assert expected_calibration_error(probs, half)[0] == pytest.approx(0.0, abs=1e-6)  # 90 % sure, 90 % right
    # Labels drawn from softmax(z); the model reports 3 z: the fitted temperature undoes the factor.
    torch.manual_seed(0)
    z = torch.randn(4000, 10) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1).squeeze(1)
    assert fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.1)


def test_calibrate_stores_a_temperature_that_changes_scores_not_ranking(
    fashion_subset: Path, trained: Path, tmp_path: Path
) -> None:
    bundle_path = tmp_path / "model.pth"
    shutil.copy(trained, bundle_path)
    before = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--bundle", str(bundle_path), "--data", str(fashion_subset), "--out", str(tmp_path / "before")]))  # fmt: skip
    after = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--bundle", str(bundle_path), "--data", str(fashion_subset), "--calibrate",
         "--out", str(tmp_path / "after")]))  # fmt: skip
    calibrated = read_bundle(bundle_path)
    t = calibrated.temperature
    assert t > 0 and t != 1.0
    info = calibrated.training["calibration"]
    assert info["temperature"] == pytest.approx(t, rel=1e-5) and info["val_ece_after"] >= 0
    assert info["val_nll_after"] <= info["val_nll_before"] + 1e-9  # the fit minimises validation NLL
    for m in (before, after):
        assert 0 <= m["ece"] <= 1 and len(m["calibration"]["bins"]) == 15
    assert after["calibration"]["temperature"] == pytest.approx(t)
    assert after["top1"] == before["top1"]
    assert after["calibration"]["ece_at_temperature_1"] == pytest.approx(before["ece"])
    for folder in ("before", "after"):
        with Image.open(tmp_path / folder / "reliability.png") as img:
            assert img.size[0] > 100

    images = [Image.open(p) for p in sorted((fashion_subset / "test" / "Bag").glob("*.png"))[:4]]
    raw = TorchPredictor.from_file(trained, device="cpu", warmup=False).predict(images, top_k=10)
    cal = TorchPredictor.from_file(bundle_path, device="cpu", warmup=False).predict(images, top_k=10)
    for r, c in zip(raw, cal, strict=True):
        assert [p["label"] for p in r] == [p["label"] for p in c]
        assert [p["score"] for p in r] != [p["score"] for p in c]


# ------------------------------------------------------------------------------------------- comparison


def test_compare_writes_table_and_plot(fashion_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rows = compare.main(compare.get_args_parser().parse_args(
        ["--data", str(fashion_subset), "--archs", "simple_cnn,mobilenet_v3_small", "--epochs", "1",
         "--out", str(out), "--bench-seconds", "0.2", "--bench-batch", "8",
         "--", "--img-size", "28", "--batch-size", "16", "--workers", "0"]))  # fmt: skip
    assert [r["arch"] for r in rows] == ["simple_cnn", "mobilenet_v3_small"]
    for r in rows:
        assert 0 <= r["test_top1"] <= 1 and r["cpu_images_per_s"] > 0 and r["train_seconds"] > 0
        assert r["pretrained"] == "none" and r["epochs"] == 1
    assert rows[0]["parameters"] < rows[1]["parameters"]
    table = (out / "compare.md").read_text()
    assert "| simple_cnn |" in table and "| mobilenet_v3_small |" in table
    assert json.loads((out / "compare.json").read_text()) == rows
    with Image.open(out / "accuracy_vs_speed.png") as img:
        assert img.size[0] > 100
