"""Decode + eval transform time for JPEGs of 0.3, 3 and 12 MP and a large PNG, with and without JPEG draft
mode, as a fraction of the model's own batch-1 time measured in the same run.

    python -m bench.preprocess [--quick] [--json PATH]

The test images are a real photo (scikit-learn's china.jpg) resized with Pillow and encoded in memory.
Draft mode (``decode_image(..., draft_size=resize)``) lets libjpeg decode at 1/2, 1/4 or 1/8 scale.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import cpu_info, median, time_call, write_results
from model.bundle import load_bundle
from model.default import build_default_bundle
from model.export import sample_photos
from model.images import decode_image
from model.pixels import prepare
from model.torch_predictor import TorchPredictor


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark image decoding and preprocessing against the model.")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: fewer repeats, a 3 MP PNG (default: off)")
    p.add_argument("--bundle", default="models/default.pth", help="model whose preprocessing (default: %(default)s)")
    p.add_argument("--jpeg-mp", default="0.3,3,12", help="JPEG sizes in megapixels (default: %(default)s)")
    p.add_argument("--png-mp", type=float, default=12, help="PNG size in megapixels (default: %(default)s)")
    p.add_argument(
        "--threads", type=int, default=0, help="the models' threads, 0 = CPUs available (default: %(default)s)"
    )
    p.add_argument(
        "--preprocess-threads",
        type=int,
        default=1,
        help="torch threads while preprocessing; 1 is what the service's onnx backend uses (default: %(default)s)",
    )
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per cell (default: %(default)s)")
    p.add_argument("--min-iters", type=int, default=5, help="timed calls per cell at least (default: %(default)s)")
    p.add_argument(
        "--onnx",
        default=None,
        help="ONNX export to time too, the service's default backend (default: the bundle's .onnx if present)",
    )
    p.add_argument("--json", default=None, help="results file (default: bench/results/preprocess-<time>.json)")
    return p


def make_image(source: Image.Image, megapixels: float, fmt: str) -> bytes:
    """``source`` resized (same aspect) to about ``megapixels`` and encoded in memory."""
    scale = (megapixels * 1e6 / (source.width * source.height)) ** 0.5
    img = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.png_mp, args.min_seconds, args.min_iters = 3, 0.1, 3
    path = Path(args.bundle)
    if path.is_file():
        bundle, model = load_bundle(path)
    else:
        bundle, model = build_default_bundle(), None
    predictor = TorchPredictor(bundle, model, device="cpu", num_threads=args.threads or None)
    prep = bundle.preprocessing

    x = np.zeros((1, *predictor.input_shape), dtype=np.uint8)
    model_s = median(time_call(lambda: predictor.infer(x), min_seconds=args.min_seconds, min_iters=args.min_iters))
    onnx_path = Path(args.onnx) if args.onnx else path.with_suffix(".onnx")
    onnx_s = None
    if onnx_path.is_file():
        from model.onnx_runner import OnnxPredictor

        ort = OnnxPredictor(onnx_path, device="cpu", num_threads=args.threads or None)
        onnx_s = median(time_call(lambda: ort.infer(x), min_seconds=args.min_seconds, min_iters=args.min_iters))

    china = next(p for p in sample_photos() if p.name == "china.jpg")
    source = Image.open(china).convert("RGB")
    cases = [(f"JPEG {mp} MP", make_image(source, float(mp), "JPEG")) for mp in args.jpeg_mp.split(",")]
    cases.append((f"PNG {args.png_mp:g} MP", make_image(source, args.png_mp, "PNG")))

    torch.set_num_threads(args.preprocess_threads)
    rows = []
    for label, data in cases:
        size = Image.open(io.BytesIO(data)).size
        for draft in (False, True):
            draft_size = prep.resize if draft else None

            def decode(data: bytes = data, draft_size: int | None = draft_size) -> Image.Image:
                return decode_image(data, draft_size=draft_size)

            def full(data: bytes = data, draft_size: int | None = draft_size) -> torch.Tensor:
                return prepare(decode_image(data, draft_size=draft_size), prep)

            dec = median(time_call(decode, min_seconds=args.min_seconds, min_iters=args.min_iters))
            tot = median(time_call(full, min_seconds=args.min_seconds, min_iters=args.min_iters))
            rows.append(
                {
                    "image": label,
                    "size": list(size),
                    "bytes": len(data),
                    "draft": draft,
                    "decoded_size": list(decode().size),
                    "decode_ms": dec * 1e3,
                    "decode_transform_ms": tot * 1e3,
                    "fraction_of_model": tot / model_s,
                    "fraction_of_onnx_model": tot / onnx_s if onnx_s else None,
                }
            )
    result = {
        "cpu": cpu_info(),
        "loadavg": os.getloadavg(),
        "preprocess_threads": args.preprocess_threads,
        "model": {"arch": predictor.arch, "threads": predictor.num_threads, "batch1_ms": model_s * 1e3},
        "onnx_model": {"file": str(onnx_path), "batch1_ms": onnx_s * 1e3} if onnx_s else None,
        "preprocessing": prep.to_dict(),
        "rows": rows,
    }
    print(f"model {predictor.arch}, eager torch, batch 1, {predictor.num_threads} threads: {model_s * 1e3:.1f} ms")
    if onnx_s:
        print(f"model under ONNX Runtime ({onnx_path}), batch 1: {onnx_s * 1e3:.1f} ms")
    print("| image | pixels | draft | decoded to | decode ms | decode+transform ms | × eager batch-1 | × ORT batch-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['image']} | {r['size'][0]}x{r['size'][1]} | {'on' if r['draft'] else 'off'} | "
            f"{r['decoded_size'][0]}x{r['decoded_size'][1]} | {r['decode_ms']:.1f} | {r['decode_transform_ms']:.1f} | "
            f"{r['fraction_of_model']:.0%} | "
            + (f"{r['fraction_of_onnx_model']:.0%} |" if r["fraction_of_onnx_model"] else "- |")
        )
    print(f"\nwrote {write_results('preprocess', result, args.json)}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
