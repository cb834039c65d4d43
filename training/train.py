"""Train a classifier on a folder of labelled images and write checkpoint bundles.

    python -m training.train --data DIR --arch simple_cnn --out runs/x
    python -m training.train --config configs/small.toml --data DIR --out runs/x        # a recipe; flags override it
    python -m training.train --data DIR --arch efficientnet_lite0 --out runs/y --epochs 5   # transfer learning
    torchrun --nproc_per_node 2 -m training.train --data DIR --arch simple_cnn --out runs/z
    python -m training.train --data DIR --out runs/s --distill-from runs/big/best.pth      # distillation
    python -m training.train --data DIR --out runs/ft --init-from pruned.pth --keep-zeros  # fine-tune a bundle

RUN_DIR gets best.pth and last.pth (bundles; last.pth also holds what --resume needs), history.json,
args.json (the resolved configuration), curves.png, TensorBoard events in tb/, and an evaluation report
of the best model on the test split (or the validation split when there is none) in eval/.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from training import recipes
from training.builders import (
    build_batch_transform,
    build_checkpoint_writer,
    build_criterion,
    build_loaders,
    build_network,
    build_optimisation,
    build_teacher,
)
from training.checkpoint import Progress, read_resume
from training.config import TrainConfig, splits_for
from training.data import Splits
from training.distributed import start_session
from training.evaluate import evaluate_best
from training.fit import EpochCallback, TrainingParts, fit
from training.flags import add_training_arguments
from training.records import RunLog


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train an image classifier and write bundles.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return add_training_arguments(parser)


def main(args: argparse.Namespace, epoch_callback: EpochCallback | None = None) -> dict[str, Any]:
    """Train as the flags say; ``epoch_callback(entry)`` sees each epoch's history entry and may return
    True to stop there, without the final evaluation (training.tune prunes trials this way)."""
    splits = splits_for(vars(args))
    return run_training(TrainConfig.from_args(args, splits), splits, epoch_callback)


def run_training(
    config: TrainConfig, splits: Splits | None = None, epoch_callback: EpochCallback | None = None
) -> dict[str, Any]:
    """One run of ``config`` (on ``splits`` when the caller found them already): build the parts, fit, evaluate."""
    splits = splits or splits_for(config.options())
    session = start_session(config)
    resume = read_resume(config.resume) if config.resume else None
    model = build_network(config, len(splits.class_names), session.device, resume)
    loaders = build_loaders(config, splits, session)
    loop_model = session.wrap(model)
    optimisation = build_optimisation(config, model, len(loaders.train))
    teacher = build_teacher(config, splits.class_names, session.device)
    parts = TrainingParts(
        model=model,
        loop_model=loop_model,
        loaders=loaders,
        optimisation=optimisation,
        criterion=build_criterion(config, teacher, splits).to(session.device),
        batch_transform=build_batch_transform(config, len(splits.class_names), loaders.batch_augment, teacher),
        num_classes=len(splits.class_names),
    )
    progress = Progress.restore(resume, optimisation, source=config.resume)
    checkpoints = build_checkpoint_writer(config, splits)
    run_log = RunLog(config, splits, enabled=session.is_main)
    run_log.start(session.device)
    try:
        done = fit(config, session, parts, progress, checkpoints, run_log, epoch_callback)
    finally:
        loaders.close()
    result: dict[str, Any] = {
        "history": done.progress.history,
        "best_val_top1": done.progress.best,
        "stopped_by_callback": done.stopped_by_callback,
        "config": config,
    }
    if session.is_main:
        run_log.close()
        if done.finished(config) and checkpoints.best.exists():
            result["eval"] = evaluate_best(
                checkpoints.out, splits, session.device, batch_size=config.batch_size, workers=config.workers
            )
    session.close()
    return result


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    main(recipes.parse_args(get_args_parser()))
