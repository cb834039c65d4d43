"""Train several architectures under the same budget and compare accuracy, size and CPU speed.

    python -m training.compare --data DIR --archs simple_cnn,resnet18,mobilenet_v3_small --epochs 3 \\
        [--out runs/compare] [-- --img-size 32 --cache]

Every architecture gets the same data, epochs and extra flags (after ``--``, a ``--config`` recipe
among them if wanted): one config each, built in code and trained by ``training.train.run_training``.
``--pretrained auto`` starts EfficientNet-Lite from its offline ImageNet weights and everything else
from scratch (torchvision's ImageNet weights need the internet). Writes ``compare.md`` (a Markdown
table), ``compare.json`` and ``accuracy_vs_speed.png`` to OUT; each run stays in OUT/ARCH.

CPU images/s: the bundle's model through the TorchPredictor (eval mode, inference_mode, the preprocessed
batch already in memory, so decoding is not counted), batches of ``--bench-batch``, with
``--bench-threads`` threads; on a shared machine the figure moves with the other load.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.bundle import read_bundle
from model.torch_predictor import TorchPredictor
from training.config import TrainConfig, splits_for
from training.data import Splits
from training.recipes import recipe_and_flags
from training.train import run_training

logger = logging.getLogger("training.compare")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train architectures under one budget; a table and a plot of accuracy vs CPU speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="image folder, as for training.train")
    p.add_argument("--archs", default="simple_cnn,resnet18,mobilenet_v3_small", help="comma-separated architectures")
    p.add_argument("--epochs", type=int, default=3, help="epochs for every architecture")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument(
        "--pretrained",
        default="auto",
        choices=("auto", "none", "imagenet"),
        help="auto: offline ImageNet weights for efficientnet_lite*, from scratch otherwise",
    )
    p.add_argument("--bench-batch", type=int, default=32, help="batch size of the CPU speed measurement")
    p.add_argument("--bench-seconds", type=float, default=3.0, help="time spent measuring each model's speed")
    p.add_argument("--bench-threads", type=int, default=None, help="torch threads for the speed measurement")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags passed to every run unchanged")
    return p


def pretrained_for(arch: str, choice: str) -> str:
    if choice != "auto":
        return choice
    return "imagenet" if arch.startswith("efficientnet_lite") else "none"


def cpu_images_per_second(bundle_path: Path, batch: int, seconds: float, threads: int | None) -> float:
    predictor = TorchPredictor.from_file(bundle_path, device="cpu", num_threads=threads)
    x = np.random.default_rng(0).integers(0, 256, (batch, *predictor.input_shape), dtype=np.uint8)
    predictor.infer(x)
    done, started = 0, time.perf_counter()
    while done < 3 * batch or time.perf_counter() - started < seconds:
        predictor.infer(x)
        done += batch
    return done / (time.perf_counter() - started)


def run_one(arch: str, args: argparse.Namespace, shared: dict[str, Any], splits: Splits) -> dict[str, Any]:
    out = Path(args.out) / arch
    given = {"data": str(args.data), "arch": arch, "epochs": args.epochs, "out": str(out),
             "pretrained": pretrained_for(arch, args.pretrained), "quiet": True}  # fmt: skip
    started = time.perf_counter()
    result = run_training(TrainConfig.from_options({**given, **shared}, splits), splits)
    wall = time.perf_counter() - started
    bundle_path = out / "best.pth"
    state = read_bundle(bundle_path).state_dict
    params = sum(v.numel() for k, v in state.items() if v.is_floating_point() and "running_" not in k)
    return {
        "arch": arch,
        "pretrained": pretrained_for(arch, args.pretrained),
        "test_top1": result["eval"]["top1"],
        "split": result["eval"]["split"],
        "parameters": params,
        "size_mb": round(bundle_path.stat().st_size / 1e6, 3),
        "cpu_images_per_s": round(
            cpu_images_per_second(bundle_path, args.bench_batch, args.bench_seconds, args.bench_threads), 1
        ),  # fmt: skip
        "train_seconds": round(sum(h["seconds"] for h in result["history"]), 1),
        "wall_seconds": round(wall, 1),
        "epochs": len(result["history"]),
        "command": "python -m training.train " + " ".join(command_flags(given, _extra(args))),
    }


def _extra(args: argparse.Namespace) -> list[str]:
    extra = list(args.train_args)
    return extra[1:] if extra[:1] == ["--"] else extra


def command_flags(given: dict[str, Any], extra: list[str]) -> list[str]:
    """The run as training.train flags, for the table's record (the flags after ``--`` win, as in the run)."""
    flags = ["--data", given["data"], "--arch", given["arch"], "--epochs", str(given["epochs"]), "--out",
             given["out"], "--pretrained", given["pretrained"], "--quiet"]  # fmt: skip
    return [*flags, *extra]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| architecture | weights | test top-1 | parameters | bundle size | CPU images/s | training time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['pretrained']} | {r['test_top1'] * 100:.2f} % | {r['parameters'] / 1e6:.2f} M "
            f"| {r['size_mb']:.1f} MB | {r['cpu_images_per_s']:.0f} | {r['train_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_speed(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        size = 30 + 200 * (r["parameters"] / max(x["parameters"] for x in rows))
        ax.scatter(r["cpu_images_per_s"], r["test_top1"] * 100, s=size, alpha=0.7)
        ax.annotate(r["arch"], (r["cpu_images_per_s"], r["test_top1"] * 100), textcoords="offset points",
                    xytext=(6, 4))  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("CPU images/s (log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy vs CPU speed (marker area: parameters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs:
        raise SystemExit("--archs is empty")
    out = Path(args.out)
    shared = recipe_and_flags(_extra(args))
    splits = splits_for({"data": str(args.data), **shared})  # found once: every architecture trains on the same
    rows = []
    for arch in archs:
        logger.info("training %s (%d epochs)", arch, args.epochs)
        rows.append(run_one(arch, args, shared, splits))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (out / "compare.md").write_text(f"Data: `{args.data}`, {args.epochs} epochs each, test split top-1.\n\n" + table)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    plot_accuracy_vs_speed(rows, out / "accuracy_vs_speed.png")
    logger.info("comparison in %s:\n%s", out / "compare.md", table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    main(get_args_parser().parse_args())
