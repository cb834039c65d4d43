"""The machine's limit for a workload: how many photos/s any server could classify here, at best.

    python -m bench.limit [--workload small,phone] [--onnx models/default.onnx] [--quick] [--json PATH]

Two rates, measured in the same run on the CPUs this process may use (its affinity and its container's
CPU quota: ``model.cpus.available_cpus``, what the service sizes itself by):

- D, decode + prepare: one process per CPU (no GIL between them), each decoding the workload's photos
  in turn (``model.images.decode_image`` with the JPEG draft to the resize size) and preparing them
  (``model.pixels.prepare``: the model's uint8 input); photos/s summed over the processes.
- M, the model: ONNX Runtime alone on the export, the best of two layouts over all CPUs (one session
  with every CPU as an intra-op thread; one single-threaded session per CPU, in processes of their own,
  running together) and of the batch sizes (uint8 or float input, as the file takes; glibc told to
  keep freed memory, as the service's workers do).

The CPU is shared: every photo needs 1/D of the whole machine to be decoded and 1/M of it for the
model, so at best limit = 1 / (1/D + 1/M) photos/s, whatever a server does with processes, threads
and batches (HTTP parsing, copies and answers only lower it). A server's req/s ÷ this limit is how
much of the machine it turns into answers. (One session per CPU usually does a little better than one
session on all of them, and the service runs that way, so M takes the better of the two: a server cannot
pass 1.0 by picking the other layout.) ``--pipeline plain`` measures D
with the peers' handler (bench/peers/plain.py) instead: the limit a plain Pillow + numpy pipeline allows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import cpu_info, write_results
from bench.workloads import Photo, describe, load_workload, parse_workloads
from model.cpus import available_cpus

PIPELINES = ("project", "plain")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure the machine's limit: decode + prepare, then the model alone.")
    p.add_argument("--quick", action="store_true", help="shorter timings: a smoke check (default: off)")
    p.add_argument("--workload", default="small,phone", help="small, phone or both (default: %(default)s)")
    p.add_argument("--onnx", default="models/default.onnx", help="the exported model (default: %(default)s)")
    p.add_argument("--pipeline", default="project", help=f"decode pipelines, of {PIPELINES} (default: %(default)s)")
    p.add_argument("--batches", default="1,2,4,8,16", help="model batch sizes (default: %(default)s)")
    p.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="timed seconds per decode rate; the model gets twice that over its batches (default: %(default)s)",
    )
    p.add_argument("--json", default=None, help="results file (default: bench/results/limit-<time>.json)")
    return p


# ---------------------------------------------------------------- the pipelines


def read_preprocessing(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The export's preprocessing (its metadata), without optimising the graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])


def pipeline(name: str, prep_dict: dict[str, Any]) -> tuple[Any, str]:
    """(bytes -> uint8 (C, crop, crop), description) for a pipeline name."""
    if name == "plain":
        from bench.peers.plain import prepare as plain_prepare

        return (lambda data: plain_prepare(data, prep_dict)), "bench/peers/plain.py"
    if name != "project":
        raise ValueError(f"unknown pipeline {name!r} (known: {', '.join(PIPELINES)})")
    from model.images import decode_image
    from model.pixels import prepare
    from model.preprocessing import Preprocessing

    prep = Preprocessing.from_dict(prep_dict)
    return (lambda data: prepare(decode_image(data, draft_size=prep.resize), prep)), "decode_image + pixels.prepare"


# ---------------------------------------------------------------- D: decode + prepare on every CPU


def _decode_worker(photos: list[bytes], prep_dict: dict[str, Any], name: str, seconds: float, offset: int,
                   barrier: Any, results: Any) -> None:  # fmt: skip
    fn, _ = pipeline(name, prep_dict)
    order = photos[offset:] + photos[:offset]
    for data in order:  # warm-up: imports, first-call costs
        fn(data)
    barrier.wait()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for data in order:  # whole passes, so every photo counts alike
            fn(data)
        done += len(order)
    results.put((done, time.perf_counter() - started))


def decode_rate(photos: list[Photo], prep_dict: dict[str, Any], name: str = "project", seconds: float = 3.0,
                cpus: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Photos/s decoded and prepared by ``cpus`` processes at once (default: one per usable CPU)."""
    cpus = cpus or available_cpus()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(cpus), ctx.Queue()
    data = [d for _, d, _ in photos]
    procs = [ctx.Process(target=_decode_worker, args=(data, prep_dict, name, seconds, i % len(data), barrier, results))
             for i in range(cpus)]  # fmt: skip
    for p in procs:
        p.start()
    rows: list[tuple[int, float]] = []
    try:
        while len(rows) < cpus:
            try:
                rows.append(results.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a decoding process failed (exit codes {dead})") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    per_process = [n / s for n, s in rows]
    return {
        "pipeline": name,
        "how": pipeline(name, prep_dict)[1],
        "processes": cpus,
        "img_s": sum(per_process),
        "per_process_img_s": per_process,
        "ms_per_photo_one_process": 1e3 / statistics.mean(per_process),
    }


# ---------------------------------------------------------------- M: the model alone, all CPUs


def _model_worker(onnx_path: str, batches: list[int], seconds: float, threads: int,
                  start_at: float = 0.0) -> dict[str, Any]:  # fmt: skip
    import onnxruntime as ort

    from serving.allocator import tune_glibc_malloc

    tune_glibc_malloc()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, sess_options=opts, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    channels, height, width = first.shape[1:]
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        pixels = rng.integers(0, 256, (batch, channels, height, width), dtype=np.uint8)
        x = pixels if first.type == "tensor(uint8)" else (pixels.astype(np.float32) / 127.5 - 1.0)
        feed = {first.name: x}
        for _ in range(2):
            session.run(None, feed)
        if start_at:  # processes side by side: all start timing together
            time.sleep(max(0.0, start_at - time.time()))
            start_at = 0.0
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rows.append({"batch": batch, "img_s": batch / median, "latency_ms": 1e3 * median, "calls": len(times)})
    best = max(rows, key=lambda r: r["img_s"])
    return {
        "onnx": onnx_path,
        "input_type": first.type,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "rows": rows,
        "img_s": best["img_s"],
        "best_batch": best["batch"],
        "batch1_ms": next((r["latency_ms"] for r in rows if r["batch"] == 1), None),
    }


def model_rate(onnx_path: str | os.PathLike[str], batches: list[int], seconds: float = 1.0,
               threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The export alone under ONNX Runtime, in fresh processes (their own allocator setting and thread
    pools): one session on ``threads`` CPUs, then one single-threaded session per CPU side by side; the
    better layout and batch is M.

    ``seconds``: timed seconds over all the batch sizes together, per layout.
    """
    threads = threads or available_cpus()
    per_batch = seconds / len(batches)
    with mp.get_context("spawn").Pool(1) as pool:
        one = pool.apply(_model_worker, (str(onnx_path), batches, per_batch, threads))
    one["layout"] = f"1 process x {threads} threads"
    layouts = [one]
    if threads > 1:
        start_at = time.time() + 5.0  # after every process has loaded its session and warmed up
        with mp.get_context("spawn").Pool(threads) as pool:
            each = pool.starmap(_model_worker, [(str(onnx_path), batches, per_batch, 1, start_at)] * threads)
        rows = [{"batch": r["batch"], "img_s": sum(e["rows"][i]["img_s"] for e in each),
                 "latency_ms": statistics.median(e["rows"][i]["latency_ms"] for e in each)}
                for i, r in enumerate(each[0]["rows"])]  # fmt: skip
        best = max(rows, key=lambda r: r["img_s"])
        layouts.append({**each[0], "rows": rows, "img_s": best["img_s"], "best_batch": best["batch"],
                        "threads": 1, "processes": threads, "layout": f"{threads} processes x 1 thread"})  # fmt: skip
    best = max(layouts, key=lambda m: m["img_s"])
    return {**best, "layouts": [{k: m[k] for k in ("layout", "img_s", "best_batch", "rows")} for m in layouts]}


# ---------------------------------------------------------------- the limit


def limit(decode_img_s: float, model_img_s: float) -> float:
    """Photos/s when decoding and the model share the same CPUs perfectly."""
    return 1.0 / (1.0 / decode_img_s + 1.0 / model_img_s)


def measure(workloads: dict[str, list[Photo]], onnx_path: str | os.PathLike[str], *, batches: list[int],
            seconds: float, pipelines: tuple[str, ...] = ("project",)) -> dict[str, Any]:  # fmt: skip
    """M once, D per workload and pipeline, and their limits: one measurement of the machine as it is now."""
    prep = read_preprocessing(onnx_path)
    model = model_rate(onnx_path, batches, 2 * seconds)
    out: dict[str, Any] = {"model": model, "workloads": {}}
    for name, photos in workloads.items():
        entry: dict[str, Any] = {}
        for how in pipelines:
            d = decode_rate(photos, prep, how, seconds)
            entry[how] = {"decode": d, "limit_img_s": limit(d["img_s"], model["img_s"])}
        out["workloads"][name] = entry
    return out


def print_limits(measured: dict[str, Any]) -> None:
    m = measured["model"]
    rows = ", ".join(f"b{r['batch']} {r['img_s']:.0f}" for r in m["rows"])
    print(f"model alone (ONNX Runtime {m['onnxruntime']}, {m.get('layout', m['threads'])}, {m['input_type']}): "
          f"{m['img_s']:.1f} img/s at batch {m['best_batch']} ({rows})")  # fmt: skip
    for other in m.get("layouts", []):
        print(f"  {other['layout']}: {other['img_s']:.1f} img/s at batch {other['best_batch']}")
    print("\n| workload | pipeline | decode + prepare D, photos/s (processes) | model M, img/s | limit, photos/s |")
    print("|---|---|---|---|---|")
    for workload, entry in measured["workloads"].items():
        for e in entry.values():
            d = e["decode"]
            print(f"| {workload} | {d['how']} | {d['img_s']:.1f} ({d['processes']}) | {m['img_s']:.1f} | "
                  f"{e['limit_img_s']:.1f} |")  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.seconds, args.batches = 1.0, "1,4,8"
    pipelines = tuple(p for p in args.pipeline.split(",") if p)
    if not Path(args.onnx).is_file():
        raise SystemExit(f"{args.onnx} is missing: python -m model.export --bundle models/default.pth")
    workloads = {w: load_workload(w) for w in parse_workloads(args.workload)}
    load_before = os.getloadavg()
    measured = measure(workloads, args.onnx, batches=[int(b) for b in args.batches.split(",") if b],
                       seconds=args.seconds, pipelines=pipelines)  # fmt: skip
    results = {
        "cpu": cpu_info(),
        "args": vars(args),
        "loadavg_before_after": [load_before, os.getloadavg()],
        "photos": {w: describe(p) for w, p in workloads.items()},
        **measured,
    }
    print_limits(measured)
    path = write_results("limit", results, args.json)
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
