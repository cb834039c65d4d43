"""The service's own CPU per request, outside decode and model: what one worker process can carry
before its GIL, not the cores, is the limit; and beside it, the least any gunicorn + WSGI server pays.

    python -m bench.overhead [--requests 2000] [--clients 8] [--rounds 3]

One worker with one model thread serves a trivial bundle (a one-stage ``simple_cnn`` of width 1 on
8 x 8 pixels) and the clients send an 8 x 8 PNG: decode and model then cost next to nothing, and what
the worker's CPU time per request measures is HTTP parsing, multipart, admission, batching, the JSON
answer, logging and metrics. CPU time is read from /proc for the worker alone (the clients and the
master are not counted). The scaling note in docs/performance.md is computed from this figure.

In the same run, rounds interleaved and the other servers paused, the same load goes to the two floors
of bench/baselines/floor_apps.py under gunicorn's gthread worker with an access log (as the service):
``bare``, a WSGI callable that reads the body and answers a fixed JSON (gunicorn's HTTP handling alone),
and ``flask``, the smallest Flask view that reads ``request.files["file"]``. No server built on these
can spend less per request than they do, which bounds the share of the machine's limit it can reach.
"""

from __future__ import annotations

import argparse
import contextlib
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
from bench.serve import drive, multipart, paused
from model.bundle import make_bundle, save_bundle
from model.registry import build_model
from serving.launcher import GunicornServer, worker_pids

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # requirements-dev.txt


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The service's own CPU per request (trivial model, tiny image).")
    p.add_argument("--requests", type=int, default=2000, help="requests measured (default: %(default)s)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server, interleaved (default: %(default)s)")
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


FLOORS = {"bare": "bench.baselines.floor_apps:bare", "flask": "bench.baselines.floor_apps:flask"}


def floor_server(name: str, log_path: Path) -> GunicornServer:
    """A floor app under gunicorn's gthread worker: one process, the service's request threads, access log."""
    return GunicornServer(None, log_path, app=FLOORS[name], config=None, name=name,
                          args=["-k", "gthread", "--threads", "24", "-w", "1", "--access-logfile", "-"])  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, "PNG")
    bodies = [multipart("tiny.png", png.getvalue(), "image/png")]
    per_round = max(1, args.requests // args.rounds)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp) / "models"
        folder.mkdir()
        trivial_bundle(folder / "default.pth")
        env = {"FLASK_TORCH_THREADS": "1", "GUNICORN_LOGLEVEL": "warning"}
        service = stack.enter_context(GunicornServer(folder, Path(tmp) / "server.log", workers=1, env=env))
        servers = [service] + [stack.enter_context(floor_server(n, Path(tmp) / f"{n}.log")) for n in FLOORS]
        cells: dict[str, dict[str, Any]] = {s.name: {"cpu": 0.0, "wall": 0.0, "ok": 0, "errors": {}} for s in servers}
        for server in servers:
            with paused([o for o in servers if o is not server]):
                drive(server.port, bodies, args.clients, 200)  # warm
        for rnd in range(args.rounds):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                assert server.proc is not None
                workers = worker_pids(server.proc.pid)
                with paused([o for o in servers if o is not server]):
                    before, started = cpu_seconds(workers), time.perf_counter()
                    load = drive(server.port, bodies, args.clients, per_round)
                    cell = cells[server.name]
                    cell["wall"] += time.perf_counter() - started
                    cell["cpu"] += cpu_seconds(workers) - before
                    cell["ok"] += len(load["latencies"])
                    for kind, n in load["errors"].items():
                        cell["errors"][kind] = cell["errors"].get(kind, 0) + n
        assert service.proc is not None
        with paused(servers[1:]):
            profile = (
                py_spy_profile(service.port, bodies, args, worker_pids(service.proc.pid)) if args.profile else None
            )
    measured = {
        name: {
            "answered": c["ok"],
            "errors": c["errors"],
            "req_per_s": round(c["ok"] / c["wall"], 1),
            "worker_cpu_ms_per_request": round(1000 * c["cpu"] / max(1, c["ok"]), 3),
        }
        for name, c in cells.items()
    }
    ours = measured["service"]
    result = {
        "requests": args.requests,
        "rounds": args.rounds,
        "answered": ours["answered"],
        "errors": ours["errors"],
        "clients": args.clients,
        "req_per_s": ours["req_per_s"],
        "worker_cpu_ms_per_request": ours["worker_cpu_ms_per_request"],
        "one_process_ceiling_req_per_s": round(1000 / ours["worker_cpu_ms_per_request"], 1),
        "floors": {name: measured[name] for name in FLOORS},
        "profile": profile,
    }
    path = write_results("overhead", result, args.json)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))  # noqa: T201
    for row in (profile or {}).get("top", [])[:40]:
        print(f"{row['share']:6.1%}  {row['function']}")  # noqa: T201
    print("| server | worker CPU per request, ms | req/s |\n|---|---|---|")  # noqa: T201
    for name, m in measured.items():
        print(f"| {name} | {m['worker_cpu_ms_per_request']} | {m['req_per_s']} |")  # noqa: T201
    print(f"wrote {path}")  # noqa: T201
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
