"""The service as a whole, under load, against a naive baseline and against the model's own ceiling.

    python -m bench.serve [--quick] [--json PATH] [--variant NAME:ENV=V,ENV=V ...]

Starts the real service (``gunicorn --config gunicorn.conf.py "app:create_app()"``) and, in the same
run, the naive baseline (bench/baselines/naive_app.py under gunicorn's defaults), each on 127.0.0.1,
and drives them with the same closed-loop load (C clients, each sending its next request when the
last answer arrived, keep-alive connections where the server keeps them) at concurrency 1, 4 and 16,
a bounded number of requests each, cycling through real photos of mixed sizes. Servers and rounds are
interleaved so that the shared machine's load changes hit every server alike. The model-only ceiling
(bench/model.py's code: best batch images/s, and batch-1 latency, for the same model, backend and
threads, under the same malloc setting) is measured in this run too: before the load and after each
concurrency level, so that it sees the same changing machine; the ratios use its medians.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from bench.common import cpu_info, write_results
from serving.launcher import GunicornServer

PERCENTILES = (50, 95, 99)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the service under load against a naive baseline.")
    p.add_argument("--quick", action="store_true", help="a CI-sized run, well under a minute (default: off)")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument(
        "--backend", default="onnx", choices=("onnx", "torch"), help="service backend (default: %(default)s)"
    )
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
        "--ceiling-batches", default="1,2,4,8", help="batches for the model-only ceiling (default: %(default)s)"
    )
    p.add_argument("--json", default=None, help="results file (default: bench/results/serve-<time>.json)")
    return p


# ---------------------------------------------------------------- images and load


def load_photos(quick: bool) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type): the sample PNGs and JPEGs, Grace Hopper, and a generated 3 MP JPEG."""
    import matplotlib

    from model.export import sample_photos

    paths = [*sample_photos(), Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    photos = []
    for path in paths:
        kind = "image/png" if path.suffix == ".png" else "image/jpeg"
        photos.append((path.name, path.read_bytes(), kind))
    china = Image.open(next(p for p in paths if p.name == "china.jpg")).convert("RGB")
    big = china.resize((2048, 1536), Image.Resampling.LANCZOS)  # 3.1 MP
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    photos.append(("generated-3MP.jpg", buf.getvalue(), "image/jpeg"))
    return photos


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


def preprocess_costs(bundle: Path, photos: list[tuple[str, bytes, str]]) -> dict[str, Any]:
    """Decode + eval transform per photo, as a request thread does it (one torch thread): the CPU each
    request needs besides the forward pass, measured in this run."""
    import torch

    from bench.common import median, time_call
    from model.bundle import read_bundle
    from model.images import decode_image
    from model.transforms import build_eval_transform

    torch.set_num_threads(1)
    prep = read_bundle(bundle).preprocessing
    transform = build_eval_transform(prep)
    per_photo = {}
    for name, data, _ in photos:
        times = time_call(
            lambda data=data: transform(decode_image(data, draft_size=prep.resize)), min_seconds=0.2, min_iters=5
        )
        per_photo[name] = 1e3 * median(times)
    return {"ms_per_photo": per_photo, "mean_ms": statistics.mean(per_photo.values())}


# ---------------------------------------------------------------- the model-only ceiling


def model_ceiling(
    bundle: Path, onnx_path: Path | None, backend: str, threads: int, batches: list[int], quick: bool, workdir: Path
) -> dict[str, Any]:
    """bench/model.py's measurement (its child process, mallopt as in the service) for one backend and threads."""
    from bench.model import run_setting
    from model.bundle import read_bundle

    prep = read_bundle(bundle).preprocessing
    entry: dict[str, Any] = {"name": "default", "bundle": str(bundle), "input": [prep.channels, prep.crop]}
    if onnx_path is not None:
        entry["onnx"] = str(onnx_path)
    settings = argparse.Namespace(
        batches=",".join(map(str, batches)), min_seconds=0.3 if quick else 1.5, min_iters=3 if quick else 5
    )
    bench_backend = "onnx" if backend == "onnx" else "eager"
    rows = run_setting("mallopt", [entry], [bench_backend], [threads], settings, workdir)["rows"]
    best = max(rows, key=lambda r: r["img_s"])
    b1 = next(r for r in rows if r["batch"] == 1)
    return {
        "backend": bench_backend,
        "threads": threads,
        "rows": rows,
        "best_img_s": best["img_s"],
        "best_batch": best["batch"],
        "batch1_ms": b1["latency_ms"],
    }


# ---------------------------------------------------------------- main


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    env = dict(item.split("=", 1) for item in spec.split(",") if item)
    return name, env


def service_threads(env: dict[str, str]) -> tuple[int, int]:
    """(workers, intra-op threads per worker) as gunicorn.conf.py will set them."""
    workers = int(env.get("WEB_CONCURRENCY", "1"))
    per = int(env.get("FLASK_TORCH_THREADS", "0")) or max(1, len(os.sched_getaffinity(0)) // workers)
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
        args.requests, args.rounds, args.ceiling_batches = 12, 1, "1,4"
    levels = [int(c) for c in args.concurrency.split(",") if c]
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise SystemExit(f"{bundle} is missing: python -m model.default --out {bundle}")
    photos = load_photos(args.quick)
    bodies = [multipart(*p) for p in photos]
    variants = [("service", {"FLASK_BACKEND": args.backend})]
    variants += [(n, {"FLASK_BACKEND": args.backend, **e}) for n, e in map(parse_variant, args.variant)]
    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "cpu": cpu_info(),
        "args": vars(args),
        "photos": [{"name": n, "bytes": len(b), "size": Image.open(io.BytesIO(b)).size} for n, b, _ in photos],
    }
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        backends = {env["FLASK_BACKEND"] for _, env in variants}
        onnx_path = prepare_model_dir(bundle, "onnx" if "onnx" in backends else "torch", workdir / "models")
        servers: list[GunicornServer] = []
        configs: dict[str, Any] = {}
        for name, env in variants:
            workers, per = service_threads(env)
            configs[name] = {"env": env, "backend": env["FLASK_BACKEND"], "workers": workers, "threads_per_worker": per}
            servers.append(GunicornServer(workdir / "models", workdir / f"{name}.log", env=env, name=name))
        if not args.no_naive:
            servers.append(naive_server(bundle, workdir / "naive.log"))
            configs["naive"] = {"workers": 1, "threads_per_worker": "torch default", "batching": False}
        keys = sorted({(configs[n]["backend"], configs[n]["threads_per_worker"]) for n, _ in variants})
        batches = _ints(args.ceiling_batches)
        ceilings: dict[tuple[str, int], list[dict[str, Any]]] = {k: [] for k in keys}

        def measure_ceilings() -> None:
            for k in keys:
                ceilings[k].append(model_ceiling(bundle, onnx_path, *k, batches, args.quick, workdir))

        measure_ceilings()
        cells: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {c: [] for c in levels} for s in servers}
        try:
            for s in servers:
                s.start()
                configs[s.name]["ready_s"] = s.ready_s
            for clients in levels:
                for rnd in range(args.rounds):
                    order = servers if rnd % 2 == 0 else servers[::-1]
                    for s in order:
                        drive(s.port, bodies, clients, max(clients, len(bodies)))  # warm-up, not counted
                        cell = drive(s.port, bodies, clients, max(args.requests, clients))
                        cells[s.name][clients].append(cell)
                        rate = len(cell["latencies"]) / cell["wall_s"]
                        n_err = sum(cell["errors"].values())
                        print(f"... {s.name:>10} c={clients:<3} round {rnd + 1}: {rate:.1f} req/s, {n_err} errors")
                if not args.quick or clients == levels[-1]:
                    measure_ceilings()  # idle servers: neither spins
        finally:
            for s in servers:
                s.stop()

    results["loadavg_before_after"] = [load_before, os.getloadavg()]
    results["servers"] = configs
    results["load"] = {name: {str(c): summarize(v) for c, v in per.items()} for name, per in cells.items()}
    results["ceiling"] = {
        f"{b}-{t}": {
            "measurements": ms,
            "best_img_s": statistics.median(m["best_img_s"] for m in ms),
            "batch1_ms": statistics.median(m["batch1_ms"] for m in ms),
        }
        for (b, t), ms in ceilings.items()
    }
    results["preprocess"] = preprocess_costs(bundle, photos)
    results["ratios"] = ratios(results, [n for n, _ in variants], levels)
    print_table(results, levels)
    path = write_results("serve", results, args.json)
    print(f"\nwrote {path}")
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def ratios(results: dict[str, Any], services: list[str], levels: list[int]) -> dict[str, Any]:
    """Per service configuration: the targets' ratios (ceiling = the better of the two measurements)."""
    out = {}
    top, low = str(max(levels)), str(min(levels))
    for name in services:
        cfg = results["servers"][name]
        ceil = results["ceiling"][f"{cfg['backend']}-{cfg['threads_per_worker']}"]
        best = ceil["best_img_s"] * cfg["workers"]
        b1 = ceil["batch1_ms"]
        load = results["load"][name]
        # If decoding + preprocessing (one core per request thread) and inference shared the cores
        # perfectly, the service could at best reach 1 / (1/ceiling + preprocess/cores) requests/s.
        pre_s = results["preprocess"]["mean_ms"] / 1e3
        bound = 1 / (1 / best + pre_s / results["cpu"]["cores"])
        entry = {
            "ceiling_img_s": best,
            "bound_with_preprocess_img_s": bound,
            f"service_over_bound_c{top}": load[top]["req_s"] / bound,
            "model_batch1_ms": b1,
            f"service_over_ceiling_c{top}": load[top]["req_s"] / best,
            f"p50_c{low}_over_model_batch1": load[low]["p50_ms"] / b1 if load[low]["p50_ms"] else None,
        }
        if "naive" in results["load"]:
            entry.update(
                {
                    f"service_over_naive_c{c}": load[str(c)]["req_s"] / results["load"]["naive"][str(c)]["req_s"]
                    for c in levels
                }
            )
        out[name] = entry
    return out


def print_table(results: dict[str, Any], levels: list[int]) -> None:
    print(f"\nload average before/after: {results['loadavg_before_after']}")
    for c in results["ceiling"].values():
        for i, m in enumerate(c["measurements"]):
            print(
                f"model only ({m['backend']}, {m['threads']} thread(s), #{i + 1}): best {m['best_img_s']:.1f} img/s "
                f"(batch {m['best_batch']}), batch 1 {m['batch1_ms']:.1f} ms"
            )
    pre = results["preprocess"]
    photos = ", ".join(f"{n} {ms:.1f}" for n, ms in pre["ms_per_photo"].items())
    print(f"decode + preprocess ms per photo (1 thread): {photos}; mean {pre['mean_ms']:.1f}")
    print("\n| server | clients | req/s (median of rounds) | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, per in results["load"].items():
        for c in levels:
            r = per[str(c)]
            p = [f"{r[f'p{q}_ms']:.1f}" if r[f"p{q}_ms"] else "-" for q in PERCENTILES]
            print(f"| {name} | {c} | {r['req_s']:.1f} | {' | '.join(p)} | {r['errors']} |")
    print("\nratios:")
    for name, r in results["ratios"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
