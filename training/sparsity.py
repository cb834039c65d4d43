"""How sparse is a model, and keeping its zeros zero while it trains further.

    python -m training.sparsity runs/pruned/best.pth [more.pth ...]

A pruned bundle is a dense state_dict with exact zeros: the file is not smaller, but it compresses (the
gzip size is reported) and sparse kernels could skip the zeros. Only weight matrices and kernels count
as prunable (tensors of two or more dimensions); biases and norm parameters are left alone.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.bundle import read_bundle

logger = logging.getLogger(__name__)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> boolean mask of the non-zero entries, for every prunable weight that has zeros."""
    masks = {}
    for name, p in model.named_parameters():
        if p.ndim >= 2 and bool((p == 0).any()):
            masks[name] = p.detach() != 0
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero again what the masks say is zero (after an optimizer step moved it)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(p.device, p.dtype))


def sparsity(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Zero counts over the prunable weights (ndim >= 2) and over all parameters."""
    prunable = [v for k, v in state_dict.items() if v.is_floating_point() and v.ndim >= 2 and _is_param(k)]
    every = [v for k, v in state_dict.items() if v.is_floating_point() and _is_param(k)]
    n_prunable = sum(v.numel() for v in prunable)
    n_all = sum(v.numel() for v in every)
    z_prunable = sum(int((v == 0).sum()) for v in prunable)
    z_all = sum(int((v == 0).sum()) for v in every)
    return {
        "parameters": n_all,
        "nonzero_parameters": n_all - z_all,
        "prunable_weights": n_prunable,
        "prunable_zeros": z_prunable,
        "prunable_sparsity": round(z_prunable / n_prunable, 6) if n_prunable else 0.0,
        "overall_sparsity": round(z_all / n_all, 6) if n_all else 0.0,
    }


def _is_param(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def file_sizes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes on disk, and gzip-compressed (where zeros pay off without sparse formats)."""
    data = Path(path).read_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as f:
        f.write(data)
    return {"file_bytes": len(data), "gzip_bytes": len(buf.getvalue())}


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    bundle = read_bundle(path)
    return {"bundle": str(path), **sparsity(bundle.state_dict), **file_sizes(path)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description="Sparsity and size of bundles.")
    p.add_argument("bundles", nargs="+", help="bundle files (.pth)")
    args = p.parse_args(argv)
    rows = [describe(b) for b in args.bundles]
    for r in rows:
        logger.info(
            "%s: prunable sparsity %.2f%%, overall %.2f%%, %d non-zero of %d parameters, %d bytes (gzip %d)",
            r["bundle"],
            r["prunable_sparsity"] * 100,
            r["overall_sparsity"] * 100,
            r["nonzero_parameters"],
            r["parameters"],
            r["file_bytes"],
            r["gzip_bytes"],
        )
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
