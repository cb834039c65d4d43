"""The service's own CPU per request, outside decode and model: what one worker process can carry
before its GIL, not the cores, is the limit.

    python -m bench.overhead [--requests 2000] [--clients 8]

One worker with one model thread serves a trivial bundle (a one-stage ``simple_cnn`` of width 1 on
8 x 8 pixels) and the clients send an 8 x 8 PNG: decode and model then cost next to nothing, and what
the worker's CPU time per request measures is HTTP parsing, multipart, admission, batching, the JSON
answer, logging and metrics. CPU time is read from /proc for the worker alone (the clients and the
master are not counted). The scaling note in docs/performance.md is computed from this figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.common import write_results
from bench.serve import drive, multipart
from model.bundle import make_bundle, save_bundle
from model.registry import build_model
from serving.launcher import GunicornServer, worker_pids

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # requirements-dev.txt


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The service's own CPU per request (trivial model, tiny image).")
    p.add_argument("--requests", type=int, default=2000, help="requests measured (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/overhead-<time>.json)")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        help="also sample the worker with py-spy for this many seconds under the same load (default: off)",
    )
    return p


def trivial_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    kwargs = {"width": 1, "stages": 1}
    net = build_model("simple_cnn", num_classes=3, **kwargs)
    prep = {"resize": 8, "crop": 8, "mean": [0.5] * 3, "std": [0.5] * 3}
    save_bundle(make_bundle(arch="simple_cnn", arch_kwargs=kwargs, class_names=["a", "b", "c"],
                            preprocessing=prep, state_dict=net.state_dict()), path)  # fmt: skip
    return path


def cpu_seconds(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (after the command name)
    return total / CLOCK_TICKS


def py_spy_profile(port: int, bodies: list[Any], args: argparse.Namespace, workers: set[int]) -> dict[str, Any]:
    """Where the worker's active threads are, by function (inclusive share of samples), under load."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen(  # noqa: S603 - py-spy from this venv on our own worker
            [PY_SPY, "record", "--format", "raw", "--nonblocking", "--rate", "250",
             "-d", str(max(1, round(args.profile))), "-p", str(next(iter(workers))), "-o", str(raw)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        drive(port, bodies, args.clients, int(args.profile * 600))
        spy.wait(timeout=args.profile + 30)
        lines = raw.read_text().splitlines() if raw.exists() else []
    total, inclusive = 0, Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = {frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] for frame in stack.split(";")}
        total += int(count)
        for frame in frames:
            inclusive[frame] += int(count)
    top = [{"function": f, "share": round(n / total, 3)} for f, n in inclusive.most_common(40)] if total else []
    return {"samples": total, "top": top}


def main(args: argparse.Namespace) -> dict[str, Any]:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, "PNG")
    bodies = [multipart("tiny.png", png.getvalue(), "image/png")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        trivial_bundle(folder / "default.pth")
        env = {"FLASK_TORCH_THREADS": "1", "GUNICORN_LOGLEVEL": "warning"}
        with GunicornServer(folder, Path(tmp) / "server.log", workers=1, env=env) as server:
            assert server.proc is not None
            workers = worker_pids(server.proc.pid)
            drive(server.port, bodies, args.clients, 200)  # warm
            before = cpu_seconds(workers)
            started = time.perf_counter()
            load = drive(server.port, bodies, args.clients, args.requests)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(workers) - before
            profile = py_spy_profile(server.port, bodies, args, workers) if args.profile else None
    ok = len(load["latencies"])
    per_request_ms = 1000 * cpu / max(1, ok)
    result = {
        "requests": args.requests,
        "answered": ok,
        "errors": load["errors"],
        "clients": args.clients,
        "req_per_s": round(ok / wall, 1),
        "worker_cpu_ms_per_request": round(per_request_ms, 3),
        "one_process_ceiling_req_per_s": round(1000 / per_request_ms, 1),
        "profile": profile,
    }
    path = write_results("overhead", result, args.json)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))  # noqa: T201
    for row in (profile or {}).get("top", [])[:40]:
        print(f"{row['share']:6.1%}  {row['function']}")  # noqa: T201
    print(  # noqa: T201
        f"| worker CPU per request (trivial model, 8x8 PNG) | {result['worker_cpu_ms_per_request']} ms |\n"
        f"| one process at most (1 / that) | {result['one_process_ceiling_req_per_s']} req/s |\n"
        f"| measured with {args.clients} clients | {result['req_per_s']} req/s |\nwrote {path}"
    )
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
