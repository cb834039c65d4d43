"""The service as a whole, under load, against a naive baseline and against the machine's limit.

    python -m bench.serve [--quick] [--workload small,phone] [--json PATH] [--variant NAME:ENV=V,ENV=V ...]

Starts the real service (``gunicorn --config gunicorn.conf.py "app:create_app()"``) and, in the same
run, the naive baseline (bench/baselines/naive_app.py under gunicorn's defaults), each on 127.0.0.1,
and drives them with the same closed-loop load (C clients, each sending its next request when the
last answer arrived, keep-alive connections where the server keeps them) at concurrency 1, 4 and 16,
a bounded number of requests each, cycling through the photos of each workload (bench/workloads.py:
"small" web photos, "phone" 12 MP camera JPEGs). Servers and rounds are interleaved so that the shared
machine's load changes hit every server alike. The machine's limit for each workload (bench/limit.py:
decode + prepare on every CPU, then the model alone at its best batch, sharing the CPUs) is measured
in this run too, before the servers start and (without ``--quick``) after they stop; every server's
req/s is reported against it. So is each server's memory: the PSS of all its processes (gunicorn's
master and workers), idle after a warm-up and again after the load.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import os
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import cpu_info, process_tree, tree_memory, write_results
from bench.limit import measure as measure_limit
from bench.limit import print_limits
from bench.workloads import Photo, describe, load_workload, parse_workloads, small_photos
from serving.launcher import GunicornServer

PERCENTILES = (50, 95, 99)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the service under load against a naive baseline.")
    p.add_argument("--quick", action="store_true", help="a short smoke run, a few minutes (default: off)")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument(
        "--backend", default="onnx", choices=("onnx", "torch"), help="service backend (default: %(default)s)"
    )
    p.add_argument("--workload", default="small,phone", help="photos to send: small, phone (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default: %(default)s)")
    p.add_argument(
        "--requests", type=int, default=96, help="requests per server, level and round (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (default: %(default)s)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another service configuration to compare, NAME:ENV=V,ENV=V (e.g. w2:WEB_CONCURRENCY=2); "
        "repeatable (default: the service's defaults only)",
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline (default: run it)")
    p.add_argument(
        "--limit-batches", default="1,2,4,8,16", help="model batches for the machine's limit (default: %(default)s)"
    )
    p.add_argument(
        "--limit-seconds", type=float, default=3.0, help="timed seconds per decode rate (default: %(default)s)"
    )
    p.add_argument("--json", default=None, help="results file (default: bench/results/serve-<time>.json)")
    return p


def quick_defaults(args: argparse.Namespace) -> None:
    """What ``--quick`` changes (bench/report.py leaves these out of the command it names)."""
    args.requests, args.rounds, args.limit_batches, args.limit_seconds = 12, 1, "1,4,8", 1.0


# ---------------------------------------------------------------- images and load


def load_photos(quick: bool = False) -> list[Photo]:
    """The "small" workload (bench/overload.py and bench/profile_serve.py send it too)."""
    return small_photos()


def multipart(name: str, data: bytes, kind: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def drive(port: int, bodies: list[tuple[bytes, str]], clients: int, total: int) -> dict[str, Any]:
    """``clients`` threads send ``total`` requests in all (closed loop); latencies, errors, wall time."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter)
            if i >= total:
                break
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and b'"predictions"' in payload
                if resp.will_close:
                    conn.close()
                key = None if ok else f"status {resp.status}"
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                key = type(exc).__name__
            elapsed = time.perf_counter() - t0
            with lock:
                if key is None:
                    latencies.append(elapsed)
                else:
                    errors[key] = errors.get(key, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu_started = time.process_time()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - cpu_started
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "requests": total, "client_cpu_s": client_cpu}


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server and level: req/s per round (median reported) and pooled latency percentiles."""
    rates = [len(c["latencies"]) / c["wall_s"] for c in cells]
    lat = sorted(x for c in cells for x in c["latencies"])
    errors: dict[str, int] = {}
    for c in cells:
        for k, v in c["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out: dict[str, Any] = {
        "req_s": statistics.median(rates),
        "req_s_rounds": rates,
        "requests": sum(c["requests"] for c in cells),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "client_cpu_ms_per_request": 1e3 * sum(c["client_cpu_s"] for c in cells) / sum(c["requests"] for c in cells),
    }
    for p in PERCENTILES:
        out[f"p{p}_ms"] = 1e3 * lat[min(len(lat) - 1, int(len(lat) * p / 100))] if lat else None
    return out


@contextlib.contextmanager
def paused(servers: list[Any]) -> Iterator[None]:
    """The other servers' processes stopped (SIGSTOP) while one is measured, then continued: an idle
    server's timers, heartbeats and polling loops would otherwise take CPU from the one under load,
    and not the same amount for every server."""
    pids = [pid for s in servers for pid in process_tree(s.proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def run_load(
    servers: list[Any], workloads: dict[str, list[Photo]], levels: list[int], rounds: int, requests: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every workload and level, servers interleaved, each measured with the others paused; and each
    server's memory (PSS of all its
    processes) idle after a warm-up that sends every photo once, and again after the load.

    ``servers``: started servers with ``name``, ``port`` and ``proc`` (the process whose tree they are).
    """
    bodies = {w: [multipart(*p) for p in photos] for w, photos in workloads.items()}
    for s in servers:
        for b in bodies.values():
            drive(s.port, b, 1, len(b))
    time.sleep(1.0)  # idle: nothing in flight
    memory = {s.name: {"idle": tree_memory(s.proc.pid)} for s in servers}
    cells: dict[str, Any] = {w: {s.name: {c: [] for c in levels} for s in servers} for w in workloads}
    for w, b in bodies.items():
        for clients in levels:
            for rnd in range(rounds):
                order = servers if rnd % 2 == 0 else servers[::-1]
                for s in order:
                    with paused([o for o in servers if o is not s]):
                        drive(s.port, b, clients, max(clients, len(b)))  # warm-up, not counted
                        cell = drive(s.port, b, clients, max(requests, clients))
                    cells[w][s.name][clients].append(cell)
                    rate = len(cell["latencies"]) / cell["wall_s"]
                    n_err = sum(cell["errors"].values())
                    print(f"... {w:>5} {s.name:>10} c={clients:<3} round {rnd + 1}: {rate:.1f} req/s, {n_err} errors",
                          flush=True)  # fmt: skip
    time.sleep(1.0)
    for s in servers:
        memory[s.name]["after_load"] = tree_memory(s.proc.pid)
    return cells, memory


def summarize_limits(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of this run's measurements of the machine's limit (bench/limit.py's ``measure``)."""
    workloads = measurements[0]["workloads"]
    return {
        "model_img_s": statistics.median(m["model"]["img_s"] for m in measurements),
        "model_batch1_ms": statistics.median(m["model"]["batch1_ms"] or 0 for m in measurements) or None,
        "model_input": measurements[0]["model"]["input_type"],
        "workloads": {
            w: {
                "decode_img_s": statistics.median(
                    m["workloads"][w]["project"]["decode"]["img_s"] for m in measurements
                ),
                "limit_img_s": statistics.median(m["workloads"][w]["project"]["limit_img_s"] for m in measurements),
                "pipeline": measurements[0]["workloads"][w]["project"]["decode"]["how"],
            }
            for w in workloads
        },
        "measurements": measurements,
    }


# ---------------------------------------------------------------- servers and main


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    env = dict(item.split("=", 1) for item in spec.split(",") if item)
    return name, env


def service_threads(env: dict[str, str]) -> tuple[int, int]:
    """(workers, model threads per worker) as gunicorn.conf.py will size them (serving/sizing.py, on CPUs)."""
    from model.cpus import available_cpus
    from serving.sizing import cpu_sizing, model_threads

    cpus = available_cpus()
    workers = int(env.get("WEB_CONCURRENCY", "0")) or cpu_sizing(cpus).workers
    per = int(env.get("FLASK_TORCH_THREADS", "0")) or model_threads(cpus, workers)
    return workers, per


def naive_server(bundle: Path, log_path: Path) -> GunicornServer:
    """The seed-tutorial baseline: bench/baselines/naive_app.py with gunicorn's defaults, 1 worker."""
    return GunicornServer(
        None,
        log_path,
        app="bench.baselines.naive_app:app",
        config=None,
        args=["-w", "1"],
        env={"NAIVE_BUNDLE": str(bundle)},
        name="naive",
    )


def prepare_model_dir(bundle: Path, backend: str, folder: Path) -> Path | None:
    """The bundle (symlinked) in a fresh folder, and its ONNX export made ahead of time (not timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "default.pth").symlink_to(bundle.resolve())
    if backend != "onnx":
        return None
    from model.files import file_sha256
    from serving.exports import export_for_serving, exported_sha, onnx_candidates

    sha = file_sha256(bundle)
    for path in onnx_candidates(folder / "default.pth"):
        if exported_sha(path) == sha:
            return path
    return export_for_serving(folder / "default.pth", folder / "default.onnx", sha)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        quick_defaults(args)
    levels = _ints(args.concurrency)
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise SystemExit(f"{bundle} is missing: python -m model.default --out {bundle}")
    workloads = {w: load_workload(w) for w in parse_workloads(args.workload)}
    variants = [("service", {"FLASK_BACKEND": args.backend})]
    variants += [(n, {"FLASK_BACKEND": args.backend, **e}) for n, e in map(parse_variant, args.variant)]
    load_before = os.getloadavg()
    results: dict[str, Any] = {"cpu": cpu_info(), "args": vars(args)}
    limit_settings = {"batches": _ints(args.limit_batches), "seconds": args.limit_seconds}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        # the limit is measured on the export whatever backend the service runs
        onnx_path = prepare_model_dir(bundle, "onnx", workdir / "models")
        servers: list[GunicornServer] = []
        configs: dict[str, Any] = {}
        for name, env in variants:
            workers, per = service_threads(env)
            configs[name] = {"env": env, "backend": env["FLASK_BACKEND"], "workers": workers, "threads_per_worker": per}
            servers.append(GunicornServer(workdir / "models", workdir / f"{name}.log", env=env, name=name))
        if not args.no_naive:
            servers.append(naive_server(bundle, workdir / "naive.log"))
            configs["naive"] = {"workers": 1, "threads_per_worker": "torch default", "batching": False}
        print("... the machine's limit (before the servers start)", flush=True)
        limit_runs = [measure_limit(workloads, onnx_path, **limit_settings)]
        try:
            for s in servers:
                s.start()
                configs[s.name]["ready_s"] = s.ready_s
            cells, memory = run_load(servers, workloads, levels, args.rounds, args.requests)
        finally:
            for s in servers:
                s.stop()
        if not args.quick:
            print("... the machine's limit (after the servers stopped)", flush=True)
            limit_runs.append(measure_limit(workloads, onnx_path, **limit_settings))

    results["loadavg_before_after"] = [load_before, os.getloadavg()]
    results["servers"] = configs
    results["limit"] = summarize_limits(limit_runs)
    results["memory_mib"] = memory
    results["workloads"] = {
        w: {
            "photos": describe(photos),
            "load": {name: {str(c): summarize(v) for c, v in per.items()} for name, per in cells[w].items()},
        }
        for w, photos in workloads.items()
    }
    results["ratios"] = ratios(results, levels)
    print_table(results, levels)
    path = write_results("serve", results, args.json)
    print(f"\nwrote {path}")
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def ratios(results: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """Per workload and server: c1 p50, top-level req/s, and that req/s ÷ the machine's limit and ÷ naive."""
    top, low = max(levels), min(levels)
    limit = results["limit"]
    out: dict[str, Any] = {}
    for w, entry in results["workloads"].items():
        load = entry["load"]
        per: dict[str, Any] = {}
        for name, by_level in load.items():
            r = {
                f"p50_c{low}_ms": by_level[str(low)]["p50_ms"],
                f"req_s_c{top}": by_level[str(top)]["req_s"],
                f"over_limit_c{top}": by_level[str(top)]["req_s"] / limit["workloads"][w]["limit_img_s"],
            }
            if limit["model_batch1_ms"] and by_level[str(low)]["p50_ms"]:
                r[f"p50_c{low}_over_model_batch1"] = by_level[str(low)]["p50_ms"] / limit["model_batch1_ms"]
            if "naive" in load and name != "naive":
                r.update({f"over_naive_c{c}": by_level[str(c)]["req_s"] / load["naive"][str(c)]["req_s"]
                          for c in levels if load["naive"][str(c)]["req_s"]})  # fmt: skip
            per[name] = r
        out[w] = per
    return out


def print_table(results: dict[str, Any], levels: list[int]) -> None:
    print(f"\nload average before/after: {results['loadavg_before_after']}")
    for i, m in enumerate(results["limit"]["measurements"]):
        print(f"\nthe machine's limit, measurement {i + 1}:")
        print_limits(m)
    top, low = max(levels), min(levels)
    for w, entry in results["workloads"].items():
        print(f"\n{w} photos\n\n| server | clients | req/s (median of rounds) | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|")
        for name, per in entry["load"].items():
            for c in levels:
                r = per[str(c)]
                p = [f"{r[f'p{q}_ms']:.1f}" if r[f"p{q}_ms"] else "-" for q in PERCENTILES]
                print(f"| {name} | {c} | {r['req_s']:.1f} | {' | '.join(p)} | {r['errors']} |")
    print(f"\n| workload | server | p50 ms at {low} | req/s at {top} | ÷ limit | limit, photos/s | "
          "PSS idle MiB | PSS after load MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for w, per in results["ratios"].items():
        lim = results["limit"]["workloads"][w]["limit_img_s"]
        for name, r in per.items():
            mem = results["memory_mib"][name]
            p50 = r[f"p50_c{low}_ms"]
            print(f"| {w} | {name} | {'-' if p50 is None else f'{p50:.1f}'} | {r[f'req_s_c{top}']:.1f} | "
                  f"{r[f'over_limit_c{top}']:.2f} | {lim:.1f} | {mem['idle']['pss_mib']:.0f} | "
                  f"{mem['after_load']['pss_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main(get_args_parser().parse_args())
