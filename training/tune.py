"""Hyper-parameter search with Optuna over training.train: TPE sampling, median pruning, an SQLite study.

    python -m training.tune --data DIR --arch simple_cnn --trials 20 --timeout 3600 --epochs 5 \\
        [--storage sqlite:///runs/tune/study.db] [--out runs/tune] [-- --cache --workers 1]

Each trial is one ``training.train.run_training`` run (the same loop, nothing re-implemented) in
OUT/trial-NNNN, with a config built in code: the recipe (``--config``, default configs/default.toml,
training.train's own defaults), then the flags after ``--`` (the same for every trial), then the values
drawn from the search space below. The validation top-1 of every epoch is reported to Optuna, and the
median pruner stops a trial whose accuracy at an epoch is below the median of earlier trials at that
epoch. The objective is the best validation top-1 (the test split is never looked at). A new study's
first trial is the recipe itself (``--no-default-trial`` to skip it).

The study lives in an SQLite file: run the same command again to add trials to it, or start it in
several terminals at once to search in parallel. ``--timeout`` is checked between trials. Outputs in
OUT: ``best_command.txt`` (a ready-to-run training.train command line), ``best.json``,
``trials.csv``, ``optimization_history.png`` and ``param_importances.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shlex
import warnings
from pathlib import Path
from typing import Any

import optuna

from training import flags
from training.config import TrainConfig, model_source, splits_for
from training.data import Splits
from training.recipes import DEFAULT_RECIPE, load_recipe, recipe_and_flags
from training.train import run_training

logger = logging.getLogger("training.tune")

BATCH_SIZES = (32, 64, 128, 256)
AUGMENTATIONS = ("none", "trivialaugment", "randaugment")
MIXUP_ALPHAS = (0.0, 0.2, 0.4)
CUTMIX_ALPHAS = (0.0, 0.5, 1.0)
SEARCHED = (  # the names suggest() draws
    "lr",
    "wd",
    "batch_size",
    "label_smoothing",
    "auto_augment",
    "random_erasing",
    "mixup_alpha",
    "cutmix_alpha",
)


# Learning-rate ranges by (optimizer, fine-tuning?): fine-tuning pretrained weights wants one to two orders of
# magnitude less than training from scratch (large steps wreck the features it starts from), and AdamW's
# normalised steps want less than SGD's. Weight decay by optimizer: AdamW's is decoupled (0.05 by default).
LR_RANGES = {
    ("sgd", False): (0.01, 0.4),
    ("sgd", True): (1e-4, 0.05),
    ("adamw", False): (1e-4, 1e-2),
    ("adamw", True): (1e-5, 1e-3),
}
WD_RANGES = {"sgd": (1e-5, 5e-3), "adamw": (1e-3, 0.1)}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The ranges that depend on the run: the optimizer, and whether it starts from pretrained weights."""

    opt: str
    fine_tuning: bool

    @property
    def lr(self) -> tuple[float, float]:
        return LR_RANGES[self.opt, self.fine_tuning]

    @property
    def wd(self) -> tuple[float, float]:
        return WD_RANGES[self.opt]


def search_space(base: dict[str, Any]) -> SearchSpace:
    """The space for the trials' shared options: pretrained weights, a weights file or --init-from is fine-tuning."""
    options = {**flags.defaults(), **base}
    source = model_source(options)
    return SearchSpace(opt=options["opt"], fine_tuning=source["pretrained"] != "none" or bool(source["weights_file"]))


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The search space, as training options (with the recipe's optimizer and schedule: SGD, cosine by default)."""
    return {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "wd": trial.suggest_float("wd", *space.wd, log=True),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "auto_augment": trial.suggest_categorical("auto_augment", AUGMENTATIONS),
        "random_erasing": trial.suggest_float("random_erasing", 0.0, 0.5),
        "mixup_alpha": trial.suggest_categorical("mixup_alpha", MIXUP_ALPHAS),
        "cutmix_alpha": trial.suggest_categorical("cutmix_alpha", CUTMIX_ALPHAS),
    }


def as_flags(params: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in params.items():
        flags += ["--" + key.replace("_", "-"), f"{value:.6g}" if isinstance(value, float) else str(value)]
    return flags


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Optuna search over training.train's hyper-parameters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="image folder, as for training.train")
    p.add_argument("--arch", default="simple_cnn", help="architecture to tune")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs (the study may hold more)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial")
    p.add_argument("--out", default="runs/tune", help="folder for trial runs, plots and the best command")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--study-name", default=None, help="study name (default: tune-ARCH)")
    p.add_argument("--seed", type=int, default=None, help="TPE sampler seed (leave unset when processes share a study)")
    p.add_argument("--startup-trials", type=int, default=5, help="trials before TPE and the pruner start")
    p.add_argument("--warmup-epochs", type=int, default=1, help="epochs before a trial can be pruned")
    p.add_argument("--config", default=None, help="recipe every trial starts from (default: configs/default.toml)")
    p.add_argument("--no-default-trial", action="store_true", help="do not start a new study with the recipe itself")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags passed to every trial unchanged")
    return p


def create_study(args: argparse.Namespace) -> optuna.Study:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{out / 'study.db'}"
    # Several processes share the file: wait for SQLite's lock instead of failing at once.
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.create_study(
        study_name=args.study_name or f"tune-{args.arch}",
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=args.startup_trials),
        # Steps are epochs 1..E; the first --warmup-epochs of them never prune.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.startup_trials, n_warmup_steps=args.warmup_epochs + 1),
        load_if_exists=True,
    )


def trial_options(args: argparse.Namespace) -> dict[str, Any]:
    """What every trial shares: the recipe, tune's data, arch and epochs, the flags after ``--``."""
    recipe = load_recipe(args.config or DEFAULT_RECIPE)
    fixed = {"data": str(args.data), "arch": args.arch, "epochs": args.epochs}
    return {**recipe, **fixed, **recipe_and_flags(_extra(args)), "quiet": True}


def starting_point(base: dict[str, Any], splits: Splits, out: str) -> dict[str, Any]:
    """The recipe's own values of the searched parameters, as training resolves them (lr from the batch size...).

    A new study tries them first, so the search can only report something at least as good on validation.
    """
    config = TrainConfig.from_options({**base, "out": out}, splits)
    return {name: getattr(config, name) for name in SEARCHED}


def objective(args: argparse.Namespace, base: dict[str, Any], splits: Splits):
    space = search_space(base)
    logger.info("search space: lr %s, wd %s (%s, %s)", space.lr, space.wd, space.opt,
                "fine-tuning" if space.fine_tuning else "from scratch")  # fmt: skip

    def run(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        out = Path(args.out) / f"trial-{trial.number:04d}"
        trial.set_user_attr("out", str(out))

        def report(entry: dict[str, Any]) -> bool:
            trial.report(entry["val_acc"], step=entry["epoch"])
            return trial.should_prune()

        config = TrainConfig.from_options({**base, **params, "out": str(out)}, splits)
        result = run_training(config, splits, epoch_callback=report)
        trial.set_user_attr("epochs", len(result["history"]))
        trial.set_user_attr("seconds", round(sum(h["seconds"] for h in result["history"]), 1))
        if result["stopped_by_callback"]:
            raise optuna.TrialPruned(f"val top-1 {result['history'][-1]['val_acc']:.4f} below the median")
        return result["best_val_top1"]

    return run


def _extra(args: argparse.Namespace) -> list[str]:
    extra = list(args.train_args)
    return extra[1:] if extra[:1] == ["--"] else extra


def fixed_flags(args: argparse.Namespace) -> list[str]:
    """The shared options as training.train flags, for the ready-to-run command line."""
    recipe = ["--config", str(args.config)] if args.config else []
    return [*recipe, "--data", str(args.data), "--arch", args.arch, "--epochs", str(args.epochs), *_extra(args)]


def best_command(args: argparse.Namespace, study: optuna.Study) -> str:
    argv = [*fixed_flags(args), *as_flags(study.best_params), "--out", str(Path(args.out) / "best")]
    return shlex.join(["python", "-m", "training.train", *argv])


def write_outputs(args: argparse.Namespace, study: optuna.Study) -> dict[str, Any]:
    out = Path(args.out)
    states = optuna.trial.TrialState
    done = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    summary: dict[str, Any] = {
        "study": study.study_name,
        "trials": len(study.trials),
        "complete": len(done),
        "pruned": len(study.get_trials(deepcopy=False, states=(states.PRUNED,))),
    }
    write_trials_csv(study, out / "trials.csv")
    if not done:
        logger.warning("no completed trial yet: nothing to recommend")
        return summary
    command = best_command(args, study)
    summary.update(
        {"best_value": study.best_value, "best_params": study.best_params, "best_trial": study.best_trial.number}
    )
    summary["command"] = command
    (out / "best_command.txt").write_text(command + "\n")
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    write_plots(study, out)
    return summary


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", "epochs", "seconds", *params, "out"])
        for t in trials:
            writer.writerow(
                [t.number, t.state.name, t.value, t.user_attrs.get("epochs"), t.user_attrs.get("seconds")]
                + [t.params.get(k) for k in params]
                + [t.user_attrs.get("out")]
            )


def write_plots(study: optuna.Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    # The matplotlib back end is marked experimental; its figures are all this needs from it.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    ax = ov.plot_optimization_history(study)
    ax.figure.tight_layout()
    ax.figure.savefig(out / "optimization_history.png", dpi=100)
    plt.close(ax.figure)
    try:
        ax = ov.plot_param_importances(study)
    except (ValueError, RuntimeError) as exc:  # e.g. a single completed trial: no variance to explain
        logger.warning("no parameter importances yet: %s", exc)
        return
    ax.figure.tight_layout()
    ax.figure.savefig(out / "param_importances.png", dpi=100)
    plt.close(ax.figure)


def main(args: argparse.Namespace) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = create_study(args)
    base = trial_options(args)
    splits = splits_for(base)  # found once: every trial trains on the same samples
    if not args.no_default_trial and not study.trials:
        study.enqueue_trial(starting_point(base, splits, args.out))
    study.optimize(objective(args, base, splits), n_trials=args.trials, timeout=args.timeout, gc_after_trial=True)
    summary = write_outputs(args, study)
    if "command" in summary:
        logger.info(
            "best of %d trials (%d complete, %d pruned): val top-1 %.4f\n%s",
            summary["trials"],
            summary["complete"],
            summary["pruned"],
            summary["best_value"],
            summary["command"],
        )
    return summary


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    main(get_args_parser().parse_args())
