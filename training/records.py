"""What a person reads about a run: args.json (the resolved config), history.json, curves.png, TensorBoard, the log.

Only the main process writes; the others get a ``RunLog`` that does nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from training.config import TrainConfig
from training.data import Splits
from training.engine import EpochResult
from training.plots import plot_curves
from training.precision import amp_choice

logger = logging.getLogger("training.train")


class RunLog:
    def __init__(self, config: TrainConfig, splits: Splits, *, enabled: bool) -> None:
        self.config = config
        self.splits = splits
        self.enabled = enabled
        self.out = Path(config.out)
        self.writer: SummaryWriter | None = None

    def start(self, device: torch.device) -> None:
        """Save the config the run resolved, open TensorBoard, and say what is about to train."""
        if not self.enabled:
            return
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "args.json").write_text(json.dumps(c.to_dict(), indent=2))
        self.writer = SummaryWriter(str(self.out / "tb"))
        logger.info(
            "training %s on %s: %s, lr %.4g, %d epochs, device %s, %d threads, %s",
            c.arch,
            c.data,
            self.splits.describe(),
            c.lr,
            c.epochs,
            device,
            c.threads,
            "batches augmented on the device" if c.batch_aug else f"{c.workers} workers",
        )
        amp = amp_choice(c.amp, device)
        logger.log(
            logging.INFO if amp.native else logging.WARNING,
            "precision %s (%s%s), %s memory format%s",
            c.amp_dtype or "float32",
            amp.reason,
            "" if amp.native else "; training will be slower, not faster",
            "channels_last" if c.channels_last else "contiguous",
            ", pinned host memory" if device.type == "cuda" else "",
        )

    def epoch(self, entry: dict[str, Any], train: EpochResult, val: EpochResult) -> None:
        """The epoch's log line and TensorBoard scalars."""
        if not self.enabled:
            return
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f top5 %.4f  lr %.3g  %.1fs",
            entry["epoch"],
            self.config.epochs,
            train.loss,
            train.top1,
            val.loss,
            val.top1,
            val.top5 or 0,
            entry["lr"],
            entry["seconds"],
        )
        for key, value in entry.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, entry["epoch"])

    def history(self, history: list[dict[str, Any]]) -> None:
        if self.enabled:
            (self.out / "history.json").write_text(json.dumps(history, indent=2))
            plot_curves(history, self.out / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
