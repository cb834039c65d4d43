"""Fine-tuning done properly, on real data: a local weights file is all a torchvision network needs offline, and
two-phase fine-tuning (--unfreeze-at, --backbone-lr-scale) of a real pretrained EfficientNet-Lite0 on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from model.bundle import read_bundle
from model.registry import build_model
from tests.support.network import NetworkUsed
from tests.test_training import FAST, _write_recipe, run_train
from training import recipes, train, tune
from training.builders import build_network, build_optimisation
from training.checkpoint import read_resume
from training.config import TrainConfig


def test_the_guard_sees_a_download(no_network: None) -> None:
    with pytest.raises(NetworkUsed):
        build_model("resnet18", num_classes=2, pretrained="imagenet")


def test_weights_file_trains_a_torchvision_network_without_the_network(
    two_class_images, tmp_path: Path, no_network: None
) -> None:
    torch.manual_seed(5)
    source = build_model("resnet18", num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    data = tmp_path / "data"
    for name, files in two_class_images.items():
        (data / name).mkdir(parents=True)
        for i, f in enumerate(files[:10]):
            (data / name / f"{i:03d}.png").write_bytes(f.read_bytes())
    out = tmp_path / "run"
    run_train("--data", str(data), "--out", str(out), "--arch", "resnet18", "--weights-file", str(weights),
              "--img-size", "32", "--val-split", "0.2", "--test-split", "0.2", *FAST)  # fmt: skip
    args = json.loads((out / "args.json").read_text())
    assert (args["pretrained"], args["weights_file"]) == ("none", str(weights))
    assert args["lr"] == pytest.approx(0.01 * 16 / 128), "a weights file is a pretrained start: the fine-tuning lr"
    trained = read_bundle(out / "last.pth").state_dict
    assert trained["fc.weight"].shape == (2, 512)
    assert not torch.equal(trained["conv1.weight"], source.conv1.weight), "the backbone did not train"
    # one step from the file's weights: close to them, unlike a fresh random initialisation
    moved = (trained["conv1.weight"] - source.conv1.weight).abs().max()
    fresh = (build_model("resnet18", num_classes=2).conv1.weight - source.conv1.weight).abs().max()
    assert moved < fresh / 10


def test_weights_file_with_pretrained_imagenet_is_refused(fashion_subset: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--weights-file replaces"):
        run_train("--data", str(fashion_subset), "--out", str(tmp_path / "run"), "--arch", "resnet18",
                  "--pretrained", "imagenet", "--weights-file", str(tmp_path / "w.pth"), *FAST)  # fmt: skip


def _group_lrs(optimizer_state: dict) -> list[float]:
    return [group["lr"] for group in optimizer_state["param_groups"]]


def test_two_phase_fine_tuning_of_a_pretrained_network(photo_folder: Path, tmp_path: Path) -> None:
    """Epoch 1 trains the head of ImageNet EfficientNet-Lite0 alone (weights and BatchNorm statistics of the
    backbone stay the ImageNet ones), epoch 2 the whole network, the backbone at a tenth of the head's lr.
    Epoch 2 runs as a resumed run, so unfreezing also works across --resume."""
    out = tmp_path / "run"
    common = ["--data", str(photo_folder), "--out", str(out), "--arch", "efficientnet_lite0", "--img-size", "32",
              "--epochs", "2", "--batch-size", "48", "--opt", "adamw", "--lr", "0.002", "--sched", "none",
              "--unfreeze-at", "2", "--backbone-lr-scale", "0.1", "--quiet", "--workers", "0",
              "--seed", "1"]  # fmt: skip
    run_train(*common, "--stop-after", "1")
    imagenet = build_model("efficientnet_lite0", num_classes=5, pretrained="imagenet", image_size=32).state_dict()
    backbone = [key for key in imagenet if not key.startswith("_fc.")]
    assert len(backbone) > 200
    phase1 = read_bundle(out / "last.pth").state_dict
    for key in backbone:
        assert torch.equal(phase1[key], imagenet[key]), f"{key} changed while the backbone was frozen"
    run_train(*common, "--resume", str(out / "last.pth"))
    phase2 = read_bundle(out / "last.pth").state_dict
    weights = [k for k in backbone if k.endswith(".weight")]
    moved = [k for k in weights if not torch.equal(phase2[k], phase1[k])]
    assert len(moved) == len(weights), f"frozen after --unfreeze-at: {sorted(set(weights) - set(moved))[:5]}"
    assert not torch.equal(phase2["_bn0.running_mean"], phase1["_bn0.running_mean"]), "BatchNorm stats still frozen"
    assert not torch.equal(phase2["_fc.weight"], phase1["_fc.weight"])
    head_decay, head_no_decay, backbone_decay, backbone_no_decay = _group_lrs(
        read_resume(out / "last.pth")["resume"]["optimizer"]
    )
    assert head_decay == head_no_decay == 0.002
    assert backbone_decay == backbone_no_decay == pytest.approx(head_decay * 0.1)
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["lr"] == head_decay
    saved = json.loads((out / "args.json").read_text())
    assert (saved["unfreeze_at"], saved["backbone_lr_scale"], saved["freeze_backbone"]) == (2, 0.1, False)
    assert read_bundle(out / "best.pth").training["args"]["unfreeze_at"] == 2


def test_keep_norm_stats_fine_tunes_with_the_pretrained_norm_statistics(photo_folder: Path, tmp_path: Path) -> None:
    """--keep-norm-stats: after --unfreeze-at the backbone's weights and BatchNorm scales train, but every
    BatchNorm layer keeps (and normalises with) the ImageNet running statistics it started from; without
    the flag the same run moves them (the test above)."""
    out = tmp_path / "run"
    run_train("--data", str(photo_folder), "--out", str(out), "--arch", "efficientnet_lite0", "--img-size", "32",
              "--epochs", "2", "--batch-size", "48", "--opt", "adamw", "--lr", "0.002", "--sched", "none",
              "--unfreeze-at", "2", "--backbone-lr-scale", "0.1", "--keep-norm-stats", "--quiet", "--workers", "0",
              "--seed", "1")  # fmt: skip
    imagenet = build_model("efficientnet_lite0", num_classes=5, pretrained="imagenet", image_size=32).state_dict()
    tuned = read_bundle(out / "last.pth").state_dict
    stats = [k for k in imagenet if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50
    for key in stats:
        assert torch.equal(tuned[key], imagenet[key]), f"{key} moved under --keep-norm-stats"
    scales = [k for k in imagenet if k.startswith("_bn") and k.endswith(".weight")]
    assert scales and all(not torch.equal(tuned[k], imagenet[k]) for k in scales), "BatchNorm scales did not train"
    assert json.loads((out / "args.json").read_text())["keep_norm_stats"] is True


@pytest.mark.parametrize("sched", ["cosine", "step", "plateau"])
def test_every_schedule_keeps_the_backbone_at_its_scale_of_the_head_lr(
    fashion_subset: Path, tmp_path: Path, sched: str
) -> None:
    config = TrainConfig.from_options({"data": str(fashion_subset), "out": str(tmp_path), "epochs": 4,
                                       "sched": sched, "step_size": 1, "lr": 0.05, "unfreeze_at": 3,
                                       "backbone_lr_scale": 0.25})  # fmt: skip
    model = build_network(config, 10, torch.device("cpu"), None)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    optimisation = build_optimisation(config, model, steps_per_epoch=3)
    optimizer, scheduler = optimisation.optimizer, optimisation.scheduler
    seen = []
    for _ in range(6):
        optimizer.step()
        scheduler.step(0.5) if sched == "plateau" else scheduler.step()
        head_lr, _, backbone_lr, _ = (g["lr"] for g in optimizer.param_groups)
        assert backbone_lr == pytest.approx(head_lr * 0.25)
        seen.append(head_lr)
    assert len(set(seen)) > 1, f"{sched} never changed the lr: the test would not see a group left behind"


def test_fine_tuning_options_are_checked_and_recipes_may_set_them(fashion_subset: Path, tmp_path: Path) -> None:
    for bad, message in ((["--unfreeze-at", "1"], "from 2 to --epochs"), (["--unfreeze-at", "3"], "from 2 to"),
                         (["--backbone-lr-scale", "0"], "must be above 0")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            run_train("--data", str(fashion_subset), "--out", str(tmp_path / "bad"), *FAST, "--epochs", "2", *bad)
    recipe = _write_recipe(tmp_path / "ft.toml", "unfreeze_at = 3\nbackbone_lr_scale = 0.1\n")
    args = recipes.parse_args(train.get_args_parser(), ["--config", str(recipe), "--data", "d", "--out", "o"])
    assert (args.unfreeze_at, args.backbone_lr_scale) == (3, 0.1)
    with pytest.raises(ValueError, match="'unfreeze_at'"):
        recipes.load_recipe(_write_recipe(tmp_path / "typo.toml", "unfreeze = 3\n"))


def _tune_lr_range(data: Path, out: Path, *train_flags: str) -> tuple[float, float, float, float]:
    """The lr and wd distributions a trial of training.tune draws from, given the flags after ``--``."""
    args = tune.get_args_parser().parse_args(["--data", str(data), "--out", str(out), "--", *train_flags])
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    tune.suggest(trial, tune.search_space(tune.trial_options(args)))
    lr, wd = trial.distributions["lr"], trial.distributions["wd"]
    assert lr.log and wd.log
    assert lr.low <= trial.params["lr"] <= lr.high
    return lr.low, lr.high, wd.low, wd.high


def test_tune_searches_learning_rates_for_the_optimizer_and_the_starting_weights(
    fashion_subset: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "w.pth"
    torch.save(build_model("resnet18", num_classes=10).state_dict(), weights)
    ranges = {
        case: _tune_lr_range(fashion_subset, tmp_path / "tune", *argv)
        for case, argv in {
            "sgd scratch": [],
            "sgd pretrained": ["--arch", "efficientnet_lite0"],
            "adamw scratch": ["--opt", "adamw"],
            "adamw pretrained": ["--arch", "efficientnet_lite0", "--opt", "adamw"],
            "adamw weights file": ["--arch", "resnet18", "--weights-file", str(weights), "--opt", "adamw"],
        }.items()
    }
    assert ranges["sgd scratch"] == (0.01, 0.4, 1e-5, 5e-3)  # unchanged: what the recipes were tuned with
    assert ranges["adamw pretrained"][:2] == (1e-5, 1e-3)
    assert ranges["adamw weights file"] == ranges["adamw pretrained"], "a weights file is a pretrained start"
    assert len(set(ranges.values())) == 4
    for opt in ("sgd", "adamw"):
        scratch, pretrained = ranges[f"{opt} scratch"], ranges[f"{opt} pretrained"]
        assert pretrained[1] < scratch[1] and pretrained[0] < scratch[0], f"{opt}: fine-tuning needs smaller steps"
    assert ranges["adamw scratch"][2:] == (1e-3, 0.1)  # decoupled weight decay around AdamW's default 0.05
