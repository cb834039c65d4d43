"""Export a bundle to ONNX or TorchScript with its serving metadata inside, then prove parity on real photos.

    python -m model.export --bundle models/default.pth --format onnx|torchscript [--opset 18]
        [--quantize dynamic|static --calib DIR] [--eval-data DIR]

ONNX: opset >= 18 goes through torch's dynamo exporter (``torch.export``); lower opsets (the seeds'
11) through the TorchScript-based exporter (``dynamo=False``), because the dynamo exporter only
emits opset 18+ and its down-conversion fails on ``Pad`` for our models (it then silently keeps 18).
The batch axis is dynamic, the weights are inside the one file, and ``onnx.checker`` must pass.
int8 comes from ONNX Runtime's quantizer: dynamic (weights only, activations scaled at run time) or
static (QDQ, activations calibrated on a folder of images through the bundle's eval transform).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from model.bundle import Bundle, load_bundle
from model.export_metadata import METADATA_KEYS, SHA_KEY, ExportMetadata, metadata_from_bundle, parse_metadata
from model.files import atomic_write, file_sha256
from model.images import IMAGE_SUFFIXES, decode_image
from model.normalization import NormalizedInput
from model.onnx_runner import OnnxPredictor, read_onnx_metadata
from model.pixels import prepare, prepare_batch
from model.predictor import softmax
from model.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
QUANTIZE_MODES = ("none", "dynamic", "static")
EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
FIRST_DYNAMO_OPSET = 18
FP32_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"

# Real photos that ship inside dev dependencies: (package, path inside it).
SAMPLE_PHOTOS = (
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/astronaut.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)


class ParityError(RuntimeError):
    """The exported model does not compute what the torch model computes."""


# ---------------------------------------------------------------- images


def sample_photos() -> list[Path]:
    """The real photos of scikit-image and scikit-learn that are installed here (may be empty)."""
    found = []
    for package, rel in SAMPLE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if path.is_file():
            found.append(path)
    return found


def list_images(folder: str | os.PathLike[str], limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), at most ``limit``."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return paths[:limit] if limit else paths


def load_batch(paths: Sequence[str | os.PathLike[str]], preprocessing: Preprocessing) -> np.ndarray:
    """Files -> one uint8 batch (N, C, crop, crop), through ``model.pixels`` (the only eval preprocessing)."""
    return prepare_batch([decode_image(p, draft_size=preprocessing.resize) for p in paths], preprocessing)


def example_input(prep: Preprocessing, batch: int) -> torch.Tensor:
    """Random uint8 pixels shaped like a batch of ``batch`` prepared images (for tracing)."""
    return torch.randint(0, 256, (batch, prep.channels, prep.crop, prep.crop), dtype=torch.uint8)


# ---------------------------------------------------------------- ONNX


def _pick_exporter(opset: int, exporter: str) -> bool:
    """True for the dynamo exporter."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}")
    if exporter == "auto":
        return opset >= FIRST_DYNAMO_OPSET
    if exporter == "dynamo" and opset < FIRST_DYNAMO_OPSET:
        raise ValueError(f"the dynamo exporter emits opset {FIRST_DYNAMO_OPSET}+; use --exporter torchscript")
    return exporter == "dynamo"


def export_onnx(
    bundle: Bundle,
    model: torch.nn.Module,
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as one self-describing ONNX file with a dynamic batch axis; returns the path.

    ``extra_metadata``: more metadata properties, e.g. the bundle file's hash (``SHA_KEY``).
    """
    dynamo = _pick_exporter(opset, exporter)
    example = example_input(bundle.preprocessing, 2)
    model = NormalizedInput(model, bundle.preprocessing).eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
        if dynamo:
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
                **common,
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
                **common,
            )
        proto = onnx.load(str(raw))
    got = _default_opset(proto)
    if got != opset:
        raise RuntimeError(f"asked for opset {opset} but the exporter wrote opset {got}")
    return write_onnx(proto, out, {**metadata_from_bundle(bundle), **(extra_metadata or {})})


def _default_opset(proto: Any) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def write_onnx(proto: Any, out: str | os.PathLike[str], metadata: Mapping[str, str]) -> Path:
    """Set the metadata, run the full checker, and save as one file atomically."""
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    # serialised by hand: onnx.save_model takes a file object's name for a path, and ours is a descriptor
    out = atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    logger.info("wrote %s (opset %d, %.1f MB)", out, _default_opset(proto), out.stat().st_size / 1e6)
    return out


class _CalibrationReader(CalibrationDataReader):
    """Feeds calibration images, one per call, prepared as the service prepares them."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, input_name: str) -> None:
        self._paths: Iterator[Path] = iter(paths)
        self._prep = preprocessing
        self._input_name = input_name

    def get_next(self) -> dict[str, Any] | None:
        path = next(self._paths, None)
        if path is None:
            return None
        x = prepare(decode_image(path, draft_size=self._prep.resize), self._prep)
        return {self._input_name: x[np.newaxis]}


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    mode: str,
    *,
    calib_paths: Sequence[Path] = (),
) -> Path:
    """int8 copy of an exported fp32 file; static mode calibrates activations on ``calib_paths``."""
    if mode not in ("dynamic", "static"):
        raise ValueError("mode must be 'dynamic' or 'static'")
    metadata = read_onnx_metadata(src)
    info = parse_metadata(metadata, source=str(src))
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        raw = Path(tmp) / "int8.onnx"
        # ONNX Runtime's recommended first step: symbolic shape inference and graph optimisation.
        quant_pre_process(str(src), str(pre))
        if mode == "dynamic":
            quantize_dynamic(str(pre), str(raw), weight_type=QuantType.QInt8, per_channel=True)
        else:
            if not calib_paths:
                raise ValueError("static quantization needs calibration images (--calib DIR)")
            reader = _CalibrationReader(calib_paths, info.preprocessing, INPUT_NAME)
            quantize_static(
                str(pre),
                str(raw),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        proto = onnx.load(str(raw))
    return write_onnx(proto, dst, metadata)


# ---------------------------------------------------------------- TorchScript


def export_torchscript(bundle: Bundle, model: torch.nn.Module, out: str | os.PathLike[str]) -> Path:
    """Trace ``model`` behind its normalisation (uint8 input, any batch size) and save it with the metadata
    as extra files, atomically."""
    example, other = example_input(bundle.preprocessing, 2), example_input(bundle.preprocessing, 3)
    with torch.no_grad():
        traced = torch.jit.trace(NormalizedInput(model, bundle.preprocessing).eval(), example, check_inputs=[(other,)])
    extra = metadata_from_bundle(bundle)
    out = atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files=extra))
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def load_torchscript(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, ExportMetadata]:
    """A saved TorchScript model and its parsed metadata."""
    extra = dict.fromkeys(METADATA_KEYS, "")
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), parse_metadata({k: v for k, v in extra.items() if v}, source=str(path))


# ---------------------------------------------------------------- parity


def torch_probs(module: torch.nn.Module, batch: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of a module that takes uint8 batches (``NormalizedInput``, a TorchScript export)."""
    with torch.inference_mode():
        return softmax(module(torch.from_numpy(batch)).float().numpy(), temperature)


def compare(reference: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Max abs probability difference and top-1 agreement of ``probs`` against ``reference``."""
    return {
        "max_abs_diff": float(np.abs(reference - probs).max()),
        "top1_agreement": float((reference.argmax(1) == probs.argmax(1)).mean()),
        "n": int(reference.shape[0]),
    }


def folder_accuracy(
    infer: Any, folder: str | os.PathLike[str], info: Bundle | ExportMetadata, batch_size: int = 32
) -> float:
    """Top-1 accuracy of ``infer`` (batch -> probs) on a labelled ImageFolder whose folders are class names."""
    prep = info.preprocessing
    dataset = ImageFolder(
        str(folder),
        transform=lambda img: prepare(img, prep),
        loader=lambda p: decode_image(p, draft_size=prep.resize),
    )
    names = list(info.class_names)
    unknown = [c for c in dataset.classes if c not in names]
    if unknown:
        raise ValueError(f"{folder}: folders {unknown[:5]} are not classes of this model")
    to_model = np.array([names.index(c) for c in dataset.classes])
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += int((infer(x.numpy()).argmax(1) == to_model[y.numpy()]).sum())
    return correct / len(dataset)


# ---------------------------------------------------------------- CLI


def default_out(bundle_path: str | os.PathLike[str], fmt: str) -> Path:
    return Path(bundle_path).with_suffix(".onnx" if fmt == "onnx" else ".ts")


def int8_path(out: Path, mode: str) -> Path:
    return out.with_name(f"{out.stem}.int8-{mode}{out.suffix}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a model bundle to ONNX or TorchScript and check parity.")
    p.add_argument("--bundle", required=True, help="bundle (.pth) to export (required)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="what to write (default: %(default)s)")
    p.add_argument("--out", default=None, help="file to write (default: the bundle's path with .onnx or .ts)")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default: %(default)s; below {FIRST_DYNAMO_OPSET} uses the TorchScript-based exporter)",
    )
    p.add_argument("--exporter", default="auto", choices=EXPORTERS, help="ONNX exporter (default: %(default)s)")
    p.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_MODES,
        help="also write an int8 ONNX copy, <out stem>.int8-<mode>.onnx (default: %(default)s)",
    )
    p.add_argument("--calib", default=None, help="folder of calibration images for --quantize static (default: none)")
    p.add_argument(
        "--calib-limit", type=int, default=200, help="calibration images used at most (default: %(default)s)"
    )
    p.add_argument(
        "--check-images",
        default=None,
        help="folder of photos for the parity check (default: the scikit-image/scikit-learn sample photos)",
    )
    p.add_argument("--eval-data", default=None, help="labelled ImageFolder for the int8 accuracy delta (default: none)")
    p.add_argument(
        "--tolerance", type=float, default=FP32_TOLERANCE, help="fp32 max abs probability diff (default: %(default)s)"
    )
    return p


def _check_paths(args: argparse.Namespace) -> list[Path]:
    paths = list_images(args.check_images) if args.check_images else sample_photos()
    if not paths:
        raise SystemExit("no photos for the parity check: pass --check-images DIR")
    return paths


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Export, check, and return the report (also printed)."""
    bundle, model = load_bundle(args.bundle)
    out = Path(args.out) if args.out else default_out(args.bundle, args.format)
    if args.quantize != "none" and args.format != "onnx":
        raise SystemExit("--quantize works on ONNX exports only")
    if args.quantize == "static" and not args.calib:
        raise SystemExit("--quantize static needs --calib DIR")
    paths = _check_paths(args)
    batch = load_batch(paths, bundle.preprocessing)
    temperature = bundle.temperature
    reference = torch_probs(NormalizedInput(model, bundle.preprocessing).eval(), batch, temperature)
    report: dict[str, Any] = {
        "bundle": str(args.bundle),
        "format": args.format,
        "check_images": [p.name for p in paths],
    }

    if args.format == "torchscript":
        export_torchscript(bundle, model, out)
        module, _ = load_torchscript(out)
        report["fp32"] = {"file": str(out), **compare(reference, torch_probs(module, batch, temperature))}
    else:
        sha = {SHA_KEY: file_sha256(args.bundle)}  # lets the service tell this export is of this bundle
        export_onnx(bundle, model, out, opset=args.opset, exporter=args.exporter, extra_metadata=sha)
        fp32 = OnnxPredictor(out, device="cpu", warmup=False)
        fp32_probs = fp32.infer(batch)
        report["fp32"] = {"file": str(out), "opset": args.opset, **compare(reference, fp32_probs)}
        if args.quantize != "none":
            calib = list_images(args.calib, args.calib_limit) if args.calib else []
            q_out = quantize_onnx(out, int8_path(out, args.quantize), args.quantize, calib_paths=calib)
            int8 = OnnxPredictor(q_out, device="cpu", warmup=False)
            report["int8"] = {
                "file": str(q_out),
                "mode": args.quantize,
                "calibration_images": len(calib),
                "vs_fp32": compare(fp32_probs, int8.infer(batch)),
            }
            if args.eval_data:
                acc32 = folder_accuracy(fp32.infer, args.eval_data, bundle)
                acc8 = folder_accuracy(int8.infer, args.eval_data, bundle)
                report["int8"]["eval"] = {
                    "data": str(args.eval_data),
                    "fp32": acc32,
                    "int8": acc8,
                    "delta": acc8 - acc32,
                }
    _print_report(report, args.tolerance)
    if report["fp32"]["max_abs_diff"] >= args.tolerance:
        raise ParityError(
            f"{out}: max abs probability difference {report['fp32']['max_abs_diff']:.2e} >= {args.tolerance:.0e}"
        )
    return report


def _print_report(report: Mapping[str, Any], tolerance: float) -> None:
    fp32 = report["fp32"]
    ok = "ok" if fp32["max_abs_diff"] < tolerance else "FAILED"
    lines = [
        f"{report['format']} {fp32['file']}: parity on {fp32['n']} real photos vs torch: "
        f"max |dp| = {fp32['max_abs_diff']:.2e} (< {tolerance:.0e}: {ok}), top-1 agreement {fp32['top1_agreement']:.0%}"
    ]
    if "int8" in report:
        q = report["int8"]
        lines.append(
            f"int8 ({q['mode']}) {q['file']}: top-1 agreement with fp32 {q['vs_fp32']['top1_agreement']:.0%} on "
            f"{q['vs_fp32']['n']} photos, max |dp| = {q['vs_fp32']['max_abs_diff']:.3f}"
        )
        if "eval" in q:
            e = q["eval"]
            lines.append(
                f"accuracy on {e['data']}: fp32 {e['fp32']:.2%}, int8 {e['int8']:.2%}, "
                f"delta {e['delta'] * 100:+.2f} points"
            )
    print("\n".join(lines))  # noqa: T201 - the CLI's result, for people
    print(json.dumps(report, indent=None))  # noqa: T201


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("model").setLevel(logging.INFO)
    try:
        main(get_args_parser().parse_args())
    except ParityError as exc:
        logger.error("%s", exc)
        sys.exit(1)
