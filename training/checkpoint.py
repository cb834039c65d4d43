"""best.pth and last.pth: the bundles a run writes each epoch, and the resume state last.pth carries.

Both are written atomically (a crash leaves the old file or the new one). best.pth holds the weights
that scored best on validation (the EMA's when there is one); last.pth holds the latest raw weights
plus everything ``--resume`` needs to continue as if never stopped: optimizer, scheduler, scaler, EMA,
epoch, best score, history and early-stopping count. Both stay servable bundles: the weights of the
auxiliary classifiers (GoogLeNet, Inception v3) are not in their ``state_dict`` but, in last.pth, in the
resume state (``aux_heads``), from which training goes on with them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from model.bundle import atomic_torch_save, library_versions, make_bundle, now_iso
from model.preprocessing import Preprocessing
from model.registry import serving_arch

logger = logging.getLogger(__name__)


def read_resume(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A last.pth written by training.train, with its resume state."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "resume" not in state:
        raise SystemExit(f"{path}: not a last.pth written by training.train (no resume state)")
    return state


class Resumable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Where a run stands after ``epoch`` epochs: the best validation top-1, the history, epochs without gain."""

    epoch: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stale_epochs: int = 0

    @classmethod
    def restore(cls, resume: dict[str, Any] | None, optimisation: Resumable, source: str | None = None) -> Progress:
        """A fresh run's progress, or the resumed run's (loading ``optimisation``'s state on the way)."""
        if resume is None:
            return cls()
        r = resume["resume"]
        optimisation.load_state_dict(r)
        logger.info("resumed from %s at epoch %d", source, r["epoch"])
        return cls(epoch=r["epoch"], best=r["best"], history=r["history"], stale_epochs=r["stale_epochs"])

    def add(self, entry: dict[str, Any], top1: float) -> bool:
        """Record an epoch; True when it improved on the best validation top-1."""
        self.history.append(entry)
        self.epoch = entry["epoch"]
        improved = top1 > self.best
        if improved:
            self.best, self.stale_epochs = top1, 0
        else:
            self.stale_epochs += 1
        return improved

    def resume_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best": self.best, "history": self.history, "stale_epochs": self.stale_epochs}


class CheckpointWriter:
    """Writes best.pth when validation improved and last.pth every epoch, in ``out``."""

    def __init__(
        self,
        out: Path,
        *,
        arch: str,
        arch_kwargs: dict[str, Any],
        class_names: list[str],
        preprocessing: Preprocessing,
        record: dict[str, Any],
    ) -> None:
        self.out = out
        self.fields = {"arch": arch, "arch_kwargs": arch_kwargs, "class_names": class_names,
                       "preprocessing": preprocessing}  # fmt: skip
        self.record = {**record, "versions": library_versions()}

    @property
    def best(self) -> Path:
        return self.out / "best.pth"

    @property
    def last(self) -> Path:
        return self.out / "last.pth"

    def write(
        self,
        progress: Progress,
        metrics: dict[str, Any],
        *,
        improved: bool,
        eval_model: nn.Module,
        model: nn.Module,
        optimisation: Resumable,
    ) -> None:
        bundle = make_bundle(
            **self.fields,
            state_dict=eval_model.state_dict(),
            training={
                **self.record,
                "date": now_iso(),
                "epoch": progress.epoch,
                "metrics": metrics,
                "history": progress.history,
            },  # fmt: skip
        )
        if improved:
            atomic_torch_save(bundle.to_dict(), self.best)
        last = bundle.to_dict()  # the raw weights (not the EMA's) and what --resume needs
        raw = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _, last["state_dict"] = serving_arch(self.fields["arch"], {}, raw)
        aux = {k: v for k, v in raw.items() if k not in last["state_dict"]}
        rng = {"torch": torch.get_rng_state()}
        last["resume"] = {**optimisation.state_dict(), **progress.resume_state(), "rng": rng}
        if aux:
            last["resume"]["aux_heads"] = aux
        atomic_torch_save(last, self.last)
