"""Evaluate a bundle on a labelled folder: top-1/top-5, per-class precision/recall/F1, confusion matrix, calibration.

    python -m training.evaluate --bundle runs/x/best.pth --data data/fashion-mnist [--split test] [--out DIR]
    python -m training.evaluate --bundle runs/x/best.pth --data data/fashion-mnist --calibrate
    python -m training.evaluate --bundle runs/x/best.pth --data data/fashion-mnist --mistakes 50

Writes ``metrics.json``, ``confusion.json``, ``confusion.png`` and ``reliability.png`` to ``--out`` (default:
next to the bundle, in ``eval-<split>/``). The images go through the bundle's own eval transform; scores
are ``softmax(logits / T)`` with the bundle's temperature, as the predictor serves them.

``--mistakes N`` also writes ``mistakes/index.html``: the N most confident mistakes with Grad-CAM heat
maps of the class said and the true one, and the accuracy of each class (``training.mistakes``).

``--calibrate`` first fits T on the validation split of ``--data`` (carved out exactly as training.train
did, from the split fractions and seed in the bundle's record, so the test split stays unseen) and
stores it in the bundle (atomically), then evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from model.bundle import Bundle, load_bundle, save_bundle
from model.torch_predictor import configure_threads, resolve_device
from model.transforms import build_eval_transform
from training.calibration import ECE_BINS, calibration_report, fit_temperature
from training.data import VAL_NAMES, ImageListDataset, Sample, Splits, find_splits, scan_any
from training.engine import evaluate, per_class_metrics
from training.mistakes import write_gallery
from training.plots import plot_confusion, plot_reliability

logger = logging.getLogger("training.evaluate")


def write_report(
    model: nn.Module,
    bundle: Bundle,
    samples: Sequence[Sample],
    out: Path,
    *,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
    split: str = "test",
    mistakes: int = 0,
) -> dict[str, Any]:
    """Evaluate ``samples`` (labels indexed like the bundle's classes) and write the report files; with
    ``mistakes``, also the gallery of that many most confident mistakes (``out/mistakes/``)."""
    class_names = list(bundle.class_names)
    dataset = ImageListDataset(samples, build_eval_transform(bundle.preprocessing))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    result, confusion = evaluate(model, loader, device, num_classes=len(class_names), keep_logits=True)
    calibration = calibration_report(result.logits, result.targets, bundle.temperature)
    per_class = per_class_metrics(confusion, class_names)
    f1s = [m["f1"] for m in per_class.values() if m["support"]]
    metrics = {
        "split": split,
        "samples": result.samples,
        "top1": round(result.top1, 6),
        "top5": round(result.top5 or 0.0, 6),
        "loss": round(result.loss, 6),
        "macro_f1": round(sum(f1s) / len(f1s), 6) if f1s else 0.0,
        "ece": calibration["ece"],
        "per_class": per_class,
        "calibration": calibration,
    }
    out.mkdir(parents=True, exist_ok=True)
    if mistakes:
        gallery = write_gallery(
            model, bundle, samples, result.logits.numpy(), confusion.tolist(), out / "mistakes", mistakes, device=device
        )
        metrics["per_class_accuracy"] = gallery["per_class_accuracy"]
        metrics["mistakes"] = {"shown": len(gallery["mistakes"]), "gallery": str(out / "mistakes" / "index.html")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "confusion.json").write_text(
        json.dumps({"class_names": class_names, "matrix": confusion.tolist()}, indent=None)
    )
    plot_confusion(confusion.tolist(), class_names, out / "confusion.png")
    plot_reliability(calibration["bins"], calibration["ece"], calibration["temperature"], out / "reliability.png")
    return metrics


def evaluate_best(out: Path, splits: Splits, device: torch.device, *, batch_size: int, workers: int) -> dict[str, Any]:
    """A finished run's report: best.pth on the test split (val when there is none), the figures kept in it."""
    bundle, model = load_bundle(out / "best.pth")
    split = "test" if splits.test else "val"
    samples = splits.test or splits.val or splits.train
    metrics = write_report(
        model.to(device), bundle, samples, out / "eval", device=device, batch_size=batch_size, workers=workers,
        split=split,
    )  # fmt: skip
    scores = {**bundle.training["metrics"], f"{split}_top1": metrics["top1"], f"{split}_top5": metrics["top5"]}
    save_bundle(dataclasses.replace(bundle, training={**bundle.training, "metrics": scores}), out / "best.pth")
    logger.info(
        "best model on the %s split (%d images): top-1 %.4f, top-5 %.4f; report in %s",
        split,
        metrics["samples"],
        metrics["top1"],
        metrics["top5"],
        out / "eval",
    )
    return metrics


def validation_samples(bundle: Bundle, data: str | Path) -> list[Sample]:
    """The validation split training.train used for this bundle (same fractions and seed)."""
    recorded = bundle.training.get("args") or {}
    splits = find_splits(
        data,
        val_split=float(recorded.get("val_split", 0.1)),
        test_split=float(recorded.get("test_split", 0.1)),
        seed=int(recorded.get("seed", 0)),
    )
    if splits.class_names != list(bundle.class_names):
        raise SystemExit(f"{data}: its classes {splits.class_names} differ from the bundle's")
    if not splits.val:
        raise SystemExit(f"{data}: no validation images to fit a temperature on")
    return splits.val


def calibrate(
    model: nn.Module,
    bundle: Bundle,
    samples: Sequence[Sample],
    *,
    device: torch.device,
    batch_size: int = 128,
    workers: int = 0,
) -> tuple[Bundle, dict[str, Any]]:
    """Fit the temperature on ``samples``; returns the bundle with it (the caller saves it) and the fit's record."""
    dataset = ImageListDataset(samples, build_eval_transform(bundle.preprocessing))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    result, _ = evaluate(model, loader, device, num_classes=len(bundle.class_names), keep_logits=True)
    temperature = fit_temperature(result.logits, result.targets)
    before = calibration_report(result.logits, result.targets, 1.0)
    after = calibration_report(result.logits, result.targets, temperature)
    info = {
        "temperature": round(temperature, 6),
        "fitted_on": f"validation split ({len(samples)} images)",
        "val_ece_before": before["ece"],
        "val_ece_after": after["ece"],
        "val_nll_before": before["nll"],
        "val_nll_after": after["nll"],
        "bins": ECE_BINS,
    }
    calibrated = dataclasses.replace(bundle, temperature=temperature, training={**bundle.training, "calibration": info})
    return calibrated, info


def pick_split_dir(root: Path, split: str) -> tuple[Path, str]:
    if split == "auto":
        for name in ("test", *VAL_NAMES):
            if (root / name).is_dir():
                return root / name, name
        return root, "all"
    names = VAL_NAMES if split == "val" else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name, split
    if split == "all":
        return root, "all"
    raise SystemExit(f"{root}: no '{split}' folder")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a bundle on a labelled image folder.")
    p.add_argument("--bundle", required=True, help="bundle (.pth) to evaluate")
    p.add_argument("--data", required=True, help="labelled folder (ImageFolder or with train/val/test)")
    p.add_argument(
        "--split",
        default="auto",
        choices=("auto", "test", "val", "train", "all"),
        help="which part of --data (default: %(default)s = test, else val, else the whole folder)",
    )
    p.add_argument("--out", default=None, help="report folder (default: <bundle folder>/eval-<split>)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a softmax temperature on the validation split and store it in the bundle first",
    )
    p.add_argument(
        "--mistakes",
        type=int,
        default=0,
        metavar="N",
        help="also write mistakes/index.html: the N most confident mistakes with Grad-CAM heat maps, and "
        "per-class accuracy (default: %(default)s = none)",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.mistakes < 0:
        raise SystemExit("--mistakes must be 0 or more")
    device = resolve_device(args.device)
    configure_threads(args.threads)
    bundle, model = load_bundle(args.bundle)
    model.to(device)
    if args.calibrate:
        bundle, info = calibrate(
            model,
            bundle,
            validation_samples(bundle, args.data),
            device=device,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        save_bundle(bundle, args.bundle)
        logger.info(
            "temperature %.4f fitted on the %s; validation ECE %.4f -> %.4f; stored in %s",
            info["temperature"],
            info["fitted_on"],
            info["val_ece_before"],
            info["val_ece_after"],
            args.bundle,
        )
    folder, split = pick_split_dir(Path(args.data), args.split)
    _, samples = scan_any(folder, bundle.class_names)
    if not samples:
        raise SystemExit(f"{folder}: no labelled images")
    out = Path(args.out) if args.out else Path(args.bundle).parent / f"eval-{split}"
    metrics = write_report(
        model,
        bundle,
        samples,
        out,
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        split=split,
        mistakes=args.mistakes,
    )
    logger.info(
        "%s on %s (%d images): top-1 %.4f  top-5 %.4f  macro-F1 %.4f  ECE %.4f (T = %.3f); report in %s",
        args.bundle,
        folder,
        metrics["samples"],
        metrics["top1"],
        metrics["top5"],
        metrics["macro_f1"],
        metrics["ece"],
        metrics["calibration"]["temperature"],
        out,
    )
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
