"""One command for a CUDA machine: the CUDA tests, the model on the GPU, the service on the GPU beside
its CPU backend, and a short AMP training run, summed up in one JSON file.

    python -m bench.gpu_check [--out DIR] [--quick]        (make gpu-check)

On a machine without CUDA it says so and exits 0 without measuring anything. Each step has its own
time budget and a failing step is recorded, not fatal, so one run (under 8 minutes) always ends with a
summary. Figures:
- model: the bundle's network through ``TorchPredictor`` on the GPU (uint8 batch in, probabilities
  out: the copies both ways included) at several batch sizes, in the precision ``auto`` chose;
- decode limit: the real photos decoded and prepared (``model.pixels``) on every CPU at once, one
  process per CPU: no service on this machine can answer faster than that;
- service: gunicorn with the defaults (BACKEND=auto picks the GPU), and again with FLASK_DEVICE=cpu as
  the baseline, 1 client (p50) and 64 clients (req/s), the clients in 4 processes on the same machine;
- goal (issue #16): c64 >= 0.8 x min(GPU model ceiling, decode limit); c1 p50 <= 1.5 x (batch-1
  latency + one photo's decode).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="GPU check: CUDA tests, model, service, AMP training; one JSON.")
    p.add_argument("--out", default="bench/results", help="folder for gpu_check-<time>.json (default: %(default)s)")
    p.add_argument("--bundle", default="models/default.pth", help="bundle to measure (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer requests and batches (a smoke run)")
    p.add_argument("--train-data", default=None, help="ImageFolder for the AMP training run (default: skip it)")
    return p


# ---------------------------------------------------------------- steps


def cuda_tests(timeout: float) -> dict[str, Any]:
    tests = [str(p) for p in sorted((REPO / "tests").glob("test_cuda*.py"))]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    tail = (done.stdout + done.stderr).strip().splitlines()
    return {
        "command": " ".join(cmd[2:]),
        "returncode": done.returncode,
        "summary": tail[-1] if tail else "",
        "log": tail[-40:],
    }


def photos() -> list[tuple[str, bytes]]:
    from model.export import sample_photos

    return [(p.name, p.read_bytes()) for p in sample_photos()]


def model_on_gpu(bundle: Path, batches: list[int], seconds: float) -> dict[str, Any]:
    import torch

    from model.torch_predictor import TorchPredictor

    predictor = TorchPredictor.from_file(bundle, device="cuda", warmup_batch_sizes=batches)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        x = rng.integers(0, 256, (batch, *predictor.input_shape), dtype=np.uint8)
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 5:
            t0 = time.perf_counter()
            predictor.infer(x)
            times.append(time.perf_counter() - t0)
        p50 = statistics.median(times)
        rows.append({"batch": batch, "p50_ms": round(p50 * 1000, 3), "images_per_s": round(batch / p50, 1)})
    return {
        "device_name": torch.cuda.get_device_name(0),
        "precision": predictor.precision,
        "rows": rows,
        "batch1_ms": rows[0]["p50_ms"],
        "ceiling_images_per_s": max(r["images_per_s"] for r in rows),
    }


def _decode_worker(args: tuple[list[tuple[str, bytes]], float, dict[str, Any]]) -> int:
    from model.images import decode_image
    from model.pixels import prepare
    from model.preprocessing import Preprocessing

    items, seconds, prep_dict = args
    prep = Preprocessing.from_dict(prep_dict)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        name, data = items[done % len(items)]
        prepare(decode_image(data, draft_size=prep.resize), prep)
        done += 1
    return done


def decode_limit(bundle: Path, items: list[tuple[str, bytes]], seconds: float) -> dict[str, Any]:
    from model.bundle import read_bundle

    prep = read_bundle(bundle).preprocessing.to_dict()
    cpus = len(os.sched_getaffinity(0))
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_decode_worker, [(items, 0.5, prep)] * cpus)  # imports and caches warm
        started = time.perf_counter()
        counts = pool.map(_decode_worker, [(items, seconds, prep)] * cpus)
        wall = time.perf_counter() - started
    single = sum(counts) / cpus / seconds
    return {"cpus": cpus, "photos_per_s": round(sum(counts) / wall, 1), "one_cpu_ms": round(1000 / single, 3)}


def _client_process(args: tuple[int, list[tuple[str, bytes]], int, int]) -> dict[str, Any]:
    """One load process: ``threads`` closed-loop clients (bench/serve.py's) sending ``total`` requests."""
    from bench.serve import drive as drive_threads
    from bench.serve import multipart

    port, items, threads, total = args
    bodies = [multipart(n, d, "image/png" if n.endswith(".png") else "image/jpeg") for n, d in items]
    return drive_threads(port, bodies, threads, total)


def drive(port: int, items: list[tuple[str, bytes]], clients: int, total: int) -> dict[str, Any]:
    procs = min(4, clients)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        started = time.perf_counter()
        parts = pool.map(_client_process, [(port, items, n, total * n // clients) for n in per])
        wall = time.perf_counter() - started
    latencies = sorted(x for p in parts for x in p["latencies"])
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "clients": clients,
        "requests": len(latencies) + sum(errors.values()),
        "req_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "errors": errors,
    }


def serve(bundle: Path, items: list[tuple[str, bytes]], name: str, env: dict[str, str], quick: bool) -> dict[str, Any]:
    from serving.launcher import GunicornServer

    folder = Path(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"))
    for suffix in (".pth", ".onnx"):
        if bundle.with_suffix(suffix).exists():
            shutil.copy(bundle.with_suffix(suffix), folder / f"default{suffix}")
    server = GunicornServer(folder, folder / "server.log", env=env, name=name)
    try:
        server.start(timeout=240)
        with urllib_open(server.url("/readyz")) as ready:
            info = json.loads(ready)
        drive(server.port, items, 16, 200 if quick else 600)  # warm: every batch size, every worker
        one = drive(server.port, items, 1, 50 if quick else 200)
        many = drive(server.port, items, 64, 1000 if quick else 4000)
        return {"ready": info, "ready_s": round(server.ready_s, 1), "c1": one, "c64": many}
    finally:
        server.stop()
        log = (folder / "server.log").read_text(errors="replace") if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        if log:
            sys.stderr.write(f"--- {name} log (tail)\n" + "\n".join(log.splitlines()[-8:]) + "\n")


def urllib_open(url: str) -> Any:
    import urllib.request

    class _Body:
        def __enter__(self) -> str:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own 127.0.0.1 URL
                return r.read().decode()

        def __exit__(self, *exc: object) -> None:
            return None

    return _Body()


def amp_training(data: str, timeout: float) -> dict[str, Any]:
    out = tempfile.mkdtemp(prefix="gpu-check-train-")
    cmd = [sys.executable, "-m", "training.train", "--data", data, "--out", out, "--epochs", "2", "--amp", "auto",
           "--quiet"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    result: dict[str, Any] = {"command": " ".join(cmd[2:]), "returncode": done.returncode,
                              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    args_json = Path(out) / "args.json"
    if args_json.exists():
        resolved = json.loads(args_json.read_text())
        result["resolved"] = {k: resolved.get(k) for k in ("device", "amp", "amp_dtype", "channels_last", "workers")}
    metrics = Path(out) / "metrics.json"
    if metrics.exists():
        result["metrics"] = json.loads(metrics.read_text())
    result["log_tail"] = (done.stdout + done.stderr).strip().splitlines()[-12:]
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------- main


def step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the summary; the other steps still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc().splitlines()[-6:]}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
    sys.stderr.write(f"[gpu_check] {name}: {time.perf_counter() - started:.0f}s\n")


def goals(r: dict[str, Any]) -> dict[str, Any]:
    try:
        ceiling = r["model"]["ceiling_images_per_s"]
        limit = r["decode_limit"]["photos_per_s"]
        target = min(ceiling, limit)
        gpu = r["serve_gpu"]
        c64 = gpu["c64"]["req_per_s"]
        budget = r["model"]["batch1_ms"] + r["decode_limit"]["one_cpu_ms"]
        return {
            "c64_req_per_s": c64,
            "bound": "GPU model" if ceiling < limit else "CPU decode",
            "c64_over_bound": round(c64 / target, 3),
            "c64_goal_met": c64 >= 0.8 * target,
            "c1_p50_ms": gpu["c1"]["p50_ms"],
            "c1_budget_ms": round(1.5 * budget, 2),
            "c1_goal_met": gpu["c1"]["p50_ms"] <= 1.5 * budget,
            "gpu_over_cpu_backend_c64": round(c64 / r["serve_cpu"]["c64"]["req_per_s"], 2),
        }
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return {"error": f"not computed: {exc!r}"}


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {"date": stamp, "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
                               "torch": torch.__version__, "cuda": torch.cuda.is_available()}  # fmt: skip
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing checked, nothing measured")  # noqa: T201
        return results
    bundle = Path(args.bundle)
    items = photos()
    batches = [1, 8, 32] if args.quick else [1, 4, 8, 16, 32, 64, 128]
    step(results, "cuda_tests", lambda: cuda_tests(150))
    step(results, "model", lambda: model_on_gpu(bundle, batches, 0.5 if args.quick else 1.5))
    step(results, "decode_limit", lambda: decode_limit(bundle, items, 2.0 if args.quick else 5.0))
    step(results, "serve_gpu", lambda: serve(bundle, items, "gpu", {}, args.quick))
    step(results, "serve_gpu_1worker", lambda: serve(bundle, items, "gpu-w1", {"WEB_CONCURRENCY": "1"}, args.quick))
    step(results, "serve_cpu", lambda: serve(bundle, items, "cpu", {"FLASK_DEVICE": "cpu"}, args.quick))
    if args.train_data:
        step(results, "amp_training", lambda: amp_training(args.train_data, 150))
    results["goals"] = goals(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {path}")  # noqa: T201
    return results


def print_table(r: dict[str, Any]) -> None:
    lines = [f"GPU check on {r.get('model', {}).get('device_name', '?')}, {r['cpus']} CPUs, torch {r['torch']}"]
    if "model" in r and "rows" in r["model"]:
        lines.append(f"model ({r['model']['precision']}): " + ", ".join(
            f"b{row['batch']} {row['images_per_s']}/s ({row['p50_ms']} ms)" for row in r["model"]["rows"]))  # fmt: skip
    if "decode_limit" in r and "photos_per_s" in r["decode_limit"]:
        d = r["decode_limit"]
        lines.append(f"decode + prepare on {d['cpus']} CPUs: {d['photos_per_s']} photos/s ({d['one_cpu_ms']} ms each)")
    for key in ("serve_gpu", "serve_gpu_1worker", "serve_cpu"):
        s = r.get(key, {})
        if "c64" in s:
            lines.append(f"{key}: c1 p50 {s['c1']['p50_ms']} ms, c64 {s['c64']['req_per_s']} req/s "
                         f"(p99 {s['c64']['p99_ms']} ms, errors {s['c64']['errors']})")  # fmt: skip
        elif s:
            lines.append(f"{key}: {s.get('error')}")
    lines.append(f"goals: {json.dumps(r.get('goals'))}")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main(get_args_parser().parse_args())
