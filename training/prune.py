"""Prune a bundle's weights by magnitude (torch.nn.utils.prune) and write a plain bundle again.

    python -m training.prune --bundle runs/x/best.pth --amount 0.3 --out runs/x/pruned.pth [--structured]
    python -m training.train --data DIR --init-from runs/x/pruned.pth --keep-zeros --epochs 1 --out runs/x-ft

Unstructured (default): in every Conv/Linear layer but the classifier head, the ``amount`` fraction of
weights with the smallest |w| become zero (``l1_unstructured``). ``--structured``: whole output channels
(filters) of every Conv layer with the smallest L1 norm become zero (``ln_structured``, n=1, dim=0).
The head is kept whole: pruning it would silence classes. ``prune.remove`` then makes the zeros
permanent, so the bundle holds a plain state_dict that loads like any other. The stored temperature is
reset to 1 (the logits have changed; calibrate again after fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import prune

from model.bundle import load_bundle, make_bundle, save_bundle
from model.registry import find_head
from training.sparsity import file_sizes, sparsity

logger = logging.getLogger(__name__)


def prunable_layers(model: nn.Module, structured: bool) -> list[tuple[str, nn.Module]]:
    head = find_head(model)
    kinds = (nn.Conv2d,) if structured else (nn.Conv2d, nn.Linear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds) and name != head]


def prune_model(model: nn.Module, amount: float, structured: bool = False) -> list[str]:
    """Zero ``amount`` of each prunable layer in place (permanently); returns the layers' names."""
    if not 0 < amount < 1:
        raise ValueError("amount must be between 0 and 1")
    layers = prunable_layers(model, structured)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no prunable layers besides its head")
    for _, module in layers:
        if structured:
            prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
        else:
            prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")
    return [name for name, _ in layers]


def prune_bundle(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], amount: float, structured: bool = False
) -> dict[str, Any]:
    """Prune the bundle at ``src`` into ``dst``; returns sparsity and sizes before and after."""
    bundle, model = load_bundle(src)
    before = {**sparsity(bundle.state_dict), **file_sizes(src)}
    layers = prune_model(model, amount, structured)
    training = dict(bundle.training)
    pruning = {"amount": amount, "structured": structured, "layers": len(layers), "source": str(src)}
    training["pruning"] = pruning
    pruned = make_bundle(
        arch=bundle.arch,
        arch_kwargs=bundle.arch_kwargs,
        class_names=bundle.class_names,
        preprocessing=bundle.preprocessing,
        state_dict=model.state_dict(),
        training=training,
        temperature=1.0,
    )
    save_bundle(pruned, dst)
    after = {**sparsity(pruned.state_dict), **file_sizes(dst)}
    return {**pruning, "before": before, "after": after}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Magnitude-prune a bundle's Conv/Linear weights (head excluded).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="bundle to prune (.pth)")
    p.add_argument("--amount", type=float, default=0.3, help="fraction of each layer's weights (or filters) to zero")
    p.add_argument("--structured", action="store_true", help="zero whole conv filters (L1 norm) instead of weights")
    p.add_argument("--out", required=True, help="pruned bundle to write (.pth); a .json report goes next to it")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    report = prune_bundle(args.bundle, args.out, args.amount, args.structured)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    b, a = report["before"], report["after"]
    logger.info(
        "%s -> %s: %d layers, prunable sparsity %.2f%% -> %.2f%%, non-zero parameters %d -> %d, "
        "file %d -> %d bytes, gzip %d -> %d bytes",
        args.bundle,
        args.out,
        report["layers"],
        b["prunable_sparsity"] * 100,
        a["prunable_sparsity"] * 100,
        b["nonzero_parameters"],
        a["nonzero_parameters"],
        b["file_bytes"],
        a["file_bytes"],
        b["gzip_bytes"],
        a["gzip_bytes"],
    )
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
