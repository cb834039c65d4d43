"""Classify image files and folders with a bundle from the command line.

    python -m training.predict --bundle models/default.pth chelsea.png coffee.png [--top-k 5] [--json]
    python -m training.predict --bundle runs/pets/best.pth data/test1 --out predictions.csv
    python -m training.predict --bundle runs/pets/best.pth data/test1 more.jpg --out predictions.jsonl

Folders are searched recursively for image files (by suffix, hidden files skipped, in sorted order);
files named on the command line are read whatever their name. Images go through the bundle's own
predictor in batches (``preprocess -> infer -> postprocess``, as the service runs them), so a score
here is the score the service would give.

Output: with ``--out`` (or ``--format``), one row per image as CSV (``path,label,score,label2,score2,...,error``)
or JSON lines, the format taken from ``--format`` or the suffix of ``--out`` (``.csv``, ``.jsonl``). Without
either, files alone print the human table (or ``--json``), and a folder prints CSV on stdout. ``--out`` is
written to a temporary file and renamed into place at the end, so an interrupted run never leaves a
partial file under the final name. A file that cannot be read or decoded gets a row with its error
instead of predictions; the run goes on, and the exit status is 1 when any row has an error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from PIL import Image
from tqdm import tqdm

from model.bundle import BundleError
from model.files import atomic_write
from model.images import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from model.predictor import Predictor
from model.torch_predictor import TorchPredictor
from training.data import is_image

logger = logging.getLogger("training.predict")

FORMATS = ("csv", "jsonl")
FORMAT_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
Row = dict[str, Any]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Top-k classes of image files and folders, from a bundle.")
    p.add_argument("images", nargs="+", help="image files, and folders searched recursively for image files")
    p.add_argument("--bundle", default="models/default.pth", help="bundle (.pth) (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes per image (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the rows to this file, atomically (default: stdout)")
    p.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="rows as CSV or JSON lines (default: from the suffix of --out; CSV for a folder on stdout)",
    )
    p.add_argument("--json", action="store_true", help="files on stdout: print one JSON document (default: a table)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown on a terminal only anyway)")
    return p


# ---------------------------------------------------------------------------------------------- inputs


def find_images(inputs: Sequence[str]) -> list[str]:
    """Files as given, in order; each folder replaced by its image files (recursive, sorted)."""
    found: list[str] = []
    for given in inputs:
        path = Path(given)
        if not path.is_dir():
            found.append(given)  # read whatever its name: a missing or bad file gets an error row
            continue
        inside = sorted(p for p in path.rglob("*") if is_image(p) and not _hidden(p.relative_to(path)))
        if not inside:
            logger.warning("%s: no image files (%s)", given, ", ".join(IMAGE_SUFFIXES))
        found.extend(str(p) for p in inside)
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


# ------------------------------------------------------------------------------------------ predicting


def predict_paths(
    predictor: Predictor, paths: Iterable[str], *, top_k: int, batch_size: int, progress: tqdm | None = None
) -> Iterator[Row]:
    """One row per path, in order: ``{"path", "predictions"}``, or ``{"path", "error"}`` when it cannot be used.

    Paths are decoded a batch at a time (only one batch of images is ever in memory) and the batch goes
    through the predictor's ``preprocess -> infer -> postprocess``.
    """
    batch: list[str] = []
    for path in paths:
        batch.append(path)
        if len(batch) >= batch_size:
            yield from _predict_batch(predictor, batch, top_k)
            if progress is not None:
                progress.update(len(batch))
            batch = []
    if batch:
        yield from _predict_batch(predictor, batch, top_k)
        if progress is not None:
            progress.update(len(batch))


def _predict_batch(predictor: Predictor, paths: Sequence[str], top_k: int) -> list[Row]:
    rows: list[Row] = [{"path": path} for path in paths]
    images: list[Image.Image] = []
    usable: list[Row] = []
    draft = predictor.preprocessing.resize
    for row in rows:
        try:
            images.append(decode_image(Path(row["path"]), draft_size=draft))
            usable.append(row)
        except (ImageDecodeError, OSError) as exc:
            row["error"] = str(exc)
    try:
        if images:
            batch, usable = _preprocess(predictor, images, usable)
            if usable:
                for row, preds in zip(usable, predictor.postprocess(predictor.infer(batch), top_k), strict=True):
                    row["predictions"] = preds
    finally:
        for img in images:  # a GIF or TIFF keeps its file open until closed
            img.close()
    return rows


def _preprocess(predictor: Predictor, images: list[Image.Image], rows: list[Row]) -> tuple[Any, list[Row]]:
    """The batch of ``images``; when one cannot be converted (a mode Pillow cannot turn into RGB, say),
    each is tried alone so only that one gets an error row."""
    try:
        return predictor.preprocess(images), rows
    except (ValueError, OSError):
        pass
    kept_images, kept_rows = [], []
    for img, row in zip(images, rows, strict=True):
        try:
            predictor.preprocess([img])
        except (ValueError, OSError) as exc:
            row["error"] = f"the image cannot be converted: {exc}"
            continue
        kept_images.append(img)
        kept_rows.append(row)
    return (predictor.preprocess(kept_images) if kept_images else None), kept_rows


# --------------------------------------------------------------------------------------------- writing


def write_csv(rows: Iterable[Row], f: TextIO, k: int) -> None:
    """``path,label,score,label2,score2,...,error``: the top k, best first; empty cells when there are none."""
    writer = csv.writer(f)
    header = ["path"]
    for i in range(1, k + 1):
        suffix = "" if i == 1 else str(i)
        header += [f"label{suffix}", f"score{suffix}"]
    writer.writerow([*header, "error"])
    for row in rows:
        cells = [row["path"]]
        preds = row.get("predictions", [])
        for i in range(k):
            cells += [preds[i]["label"], preds[i]["score"]] if i < len(preds) else ["", ""]
        writer.writerow([*cells, row.get("error", "")])


def write_jsonl(rows: Iterable[Row], f: TextIO) -> None:
    """One JSON object per line: ``{"path", "predictions": [{label, index, score}, ...]}`` or ``{"path", "error"}``."""
    for row in rows:
        f.write(json.dumps(row) + "\n")


def write_rows(rows: Iterable[Row], fmt: str, out: str | None, k: int) -> None:
    """To stdout, or to ``out`` through a temporary file renamed into place once every row is written."""

    def write(f: TextIO) -> None:
        write_csv(rows, f, k) if fmt == "csv" else write_jsonl(rows, f)

    if out is None:
        write(sys.stdout)
        return

    def write_binary(raw: Any) -> None:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        try:
            write(text)
        finally:
            text.flush()
            text.detach()  # atomic_write closes and syncs the file itself

    atomic_write(out, write_binary)


def print_table(rows: Sequence[Row], model: str, as_json: bool) -> None:
    """Files on stdout for a person (or one JSON document): what training.predict always printed."""
    results = [
        {"file": r["path"], **({"error": r["error"]} if "error" in r else {"predictions": r["predictions"]})}
        for r in rows
    ]
    if as_json:
        sys.stdout.write(json.dumps({"model": model, "results": results}, indent=2) + "\n")
        return
    for r in results:
        sys.stdout.write(f"{r['file']}\n")
        if "error" in r:
            sys.stdout.write(f"  error: {r['error']}\n")
            continue
        for p in r["predictions"]:
            sys.stdout.write(f"  {p['score'] * 100:6.2f}%  {p['label']}\n")


# ------------------------------------------------------------------------------------------------ main


def output_format(args: argparse.Namespace) -> str | None:
    """csv, jsonl, or None for the human table (files only, nothing asked for)."""
    fmt = args.format
    if fmt is None and args.out is not None:
        fmt = FORMAT_BY_SUFFIX.get(Path(args.out).suffix.lower())
        if fmt is None:
            raise SystemExit(f"--out {args.out}: name it .csv or .jsonl, or pass --format csv|jsonl")
    if fmt is not None and args.json:
        raise SystemExit("--json prints one JSON document on stdout; for rows in a file use --format jsonl")
    if fmt is None and not args.json and any(Path(p).is_dir() for p in args.images):
        fmt = "csv"
    return fmt


def main(args: argparse.Namespace) -> list[Row]:
    """Predict every image; the rows, in order. Exits with status 1 after writing when any row has an error."""
    if args.top_k < 1:
        raise SystemExit("--top-k must be at least 1")
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    fmt = output_format(args)
    paths = find_images(args.images)
    if not paths:
        raise SystemExit(f"no image files in {', '.join(args.images)}")
    try:
        predictor = TorchPredictor.from_file(args.bundle, device=args.device, num_threads=args.threads, warmup=False)
    except BundleError as exc:
        raise SystemExit(str(exc)) from None
    rows: list[Row] = []
    with tqdm(total=len(paths), unit="img", disable=True if args.quiet else None, file=sys.stderr) as bar:
        predicted = predict_paths(predictor, paths, top_k=args.top_k, batch_size=args.batch_size, progress=bar)
        if fmt is None:
            rows = list(predicted)
        else:
            write_rows(_collect(predicted, rows), fmt, args.out, k=min(args.top_k, len(predictor.class_names)))
    if fmt is None:
        print_table(rows, predictor.name, args.json)
    errors = sum("error" in r for r in rows)
    if args.out is not None:
        sys.stderr.write(f"{args.out}: {len(rows)} rows\n")
    if errors:
        sys.stderr.write(f"{errors} of {len(rows)} files could not be classified (see their error)\n")
        sys.exit(1)
    return rows


def _collect(rows: Iterable[Row], into: list[Row]) -> Iterator[Row]:
    """Pass rows on and keep each in ``into`` (main returns them; writing streams them)."""
    for row in rows:
        into.append(row)
        yield row


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
