"""Soak: a bounded run of mixed valid and hostile requests against a real gunicorn on 127.0.0.1.

    python bench/soak.py                 # 5,000 requests, 16 concurrent clients
    python bench/soak.py --quick         # 300 requests: what CI runs (tests/test_soak_quick.py)

Half the requests are real photos, half the hostile corpus of tests/support/hostile.py (bombs, truncated
files, wrong types, oversized bodies, bad parameters...), in a fixed shuffled order. Reports the
requests whose status or error code was not the expected one (target 0; a request the server sheds with
503 busy is sent again after its Retry-After, as a well-behaved client does, and counted), latency
percentiles (from the first try to the answer), and the
workers' resident memory after request 1,000 and at the end (target: growth at most 10 %), as JSON
and a table. Exits 1 when any status was unexpected or a worker died.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
MAX_BUSY_RETRIES = 30  # a request the server sheds (503 busy) is sent again after its Retry-After, this often
sys.path.insert(0, str(ROOT))  # run as a script (python bench/soak.py): the repository's packages

from serving.launcher import GunicornServer, worker_pids  # noqa: E402
from tests.support.hostile import Case, build_cases, upload  # noqa: E402
from tests.support.photos import CAT_LABELS, photo_paths  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--requests", type=int, default=5000, help="requests in total")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--quick", action="store_true", help="300 requests (CI)")
    p.add_argument("--hostile-share", type=float, default=0.5, help="fraction of hostile requests")
    p.add_argument("--rss-at", type=int, default=1000, help="measure the workers' RSS after this many requests")
    p.add_argument("--workers", type=int, default=1, help="gunicorn workers (WEB_CONCURRENCY)")
    p.add_argument("--threads", type=int, default=8, help="request threads per worker (GUNICORN_THREADS)")
    p.add_argument("--model", default=str(ROOT / "models" / "default.pth"), help="bundle to serve (built if missing)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"), help="JSON report")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    return p


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def valid_cases(photos: dict[str, Path]) -> list[Case]:
    cases = [Case(f"valid_{name}", 200, None, upload(path.name, path.read_bytes())) for name, path in photos.items()]
    cases[0].cat = True
    cases.append(Case("valid_raw_body", 200, None, {"data": photos["chelsea"].read_bytes(),
                                                    "headers": {"Content-Type": "image/png"}}, cat=True))  # fmt: skip
    return cases


def plan(n: int, hostile_share: float, seed: int) -> list[Case]:
    photos = photo_paths()
    valid, hostile = valid_cases(photos), build_cases(photos)
    rng = random.Random(seed)
    n_hostile = int(n * hostile_share)
    order = [hostile[i % len(hostile)] for i in range(n_hostile)] + [
        valid[i % len(valid)] for i in range(n - n_hostile)
    ]
    rng.shuffle(order)
    return order


def busy_retry_after(r: requests.Response) -> float | None:
    """Seconds to wait before sending the request again when the server shed it (503 busy), else None."""
    if r.status_code != 503 or not r.headers.get("Retry-After", "").isdigit():
        return None
    try:
        code = r.json().get("error", {}).get("code")
    except ValueError:
        return None
    return float(r.headers["Retry-After"]) if code == "busy" else None


def check(case: Case, r: requests.Response) -> str | None:
    """None when the answer is the expected one, else what was wrong."""
    if r.status_code != case.status:
        return f"status {r.status_code}"
    try:
        body = r.json()
    except ValueError:
        return "not JSON"
    if case.code is not None and body.get("error", {}).get("code") != case.code:
        return f"code {body.get('error', {}).get('code')}"
    if case.cat and body["predictions"][0]["label"] not in CAT_LABELS:
        return f"not a cat: {body['predictions'][0]['label']}"
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict:
    total = 300 if args.quick else args.requests
    rss_at = min(args.rss_at, total // 3) if args.quick else args.rss_at
    order = plan(total, args.hostile_share, args.seed)
    model = Path(args.model)
    if not model.exists():
        from model.default import ensure_default_model

        ensure_default_model(model)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        (folder / "default.pth").symlink_to(model.resolve())
        server = GunicornServer(folder, Path(tmp) / "gunicorn.log", workers=args.workers, threads=args.threads)
        server.start()
        try:
            assert server.proc is not None
            pids = worker_pids(server.proc.pid)
            report = drive(server, order, args.concurrency, rss_at, pids)
            report["worker_pids_unchanged"] = worker_pids(server.proc.pid) == pids
            log = server.log()
            report["tracebacks_in_log"] = log.count("Traceback")
        finally:
            server.stop()
    report.update(requests=total, concurrency=args.concurrency, workers=args.workers, threads=args.threads,
                  hostile_share=args.hostile_share)  # fmt: skip
    return report


def drive(server: GunicornServer, order: list[Case], concurrency: int, rss_at: int, pids: set[int]) -> dict:
    local = threading.local()
    lock = threading.Lock()
    done = {"n": 0}
    busy = {"n": 0}  # 503 busy answers (admission control), each retried after its Retry-After
    rss: dict[str, dict[int, int]] = {}
    trace: dict[int, float] = {}  # RSS every 1,000 requests: a leak keeps climbing, a warming heap levels off
    latencies: dict[str, list[float]] = {}
    unexpected: list[dict] = []

    def one(case: Case) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        started = time.perf_counter()
        try:
            for _ in range(MAX_BUSY_RETRIES + 1):
                r = session.request(case.method, server.url(case.path), timeout=120, **case.request_kwargs())
                wait = busy_retry_after(r)
                if wait is None:
                    break
                with lock:
                    busy["n"] += 1
                time.sleep(wait)
            problem = check(case, r)
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {exc}"[:200]
            session.close()
            local.session = None
        seconds = time.perf_counter() - started
        with lock:
            latencies.setdefault(case.name, []).append(seconds)
            if problem:
                unexpected.append({"case": case.name, "problem": problem, "after": getattr(local, "last", None)})
            local.last = case.name
            done["n"] += 1
            if done["n"] == rss_at:
                rss["at_rss_point"] = {pid: rss_bytes(pid) for pid in pids}
            if done["n"] % 1000 == 0:
                trace[done["n"]] = mib(sum(rss_bytes(pid) for pid in pids))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, order))
    wall = time.perf_counter() - started
    rss["end"] = {pid: rss_bytes(pid) for pid in pids}
    every = [s for values in latencies.values() for s in values]
    valid = [s for name, values in latencies.items() if name.startswith("valid_") for s in values]
    at, end = sum(rss["at_rss_point"].values()), sum(rss["end"].values())
    return {
        "unexpected": len(unexpected),
        "busy_retried": busy["n"],
        "unexpected_examples": unexpected[:20],
        "wall_s": round(wall, 1),
        "throughput_rps": round(len(order) / wall, 1),
        "latency_ms": {
            "all": {"p50": ms(statistics.median(every)), "p99": ms(percentile(every, 99)), "max": ms(max(every))},
            "valid": {"p50": ms(statistics.median(valid)), "p99": ms(percentile(valid, 99)), "max": ms(max(valid))},
        },
        "slowest_cases_p99_ms": dict(
            sorted(((n, ms(percentile(v, 99))) for n, v in latencies.items()), key=lambda kv: -kv[1])[:5]
        ),
        "rss_mib": {
            "at_request": rss_at,
            "at": mib(at),
            "end": mib(end),
            "growth_pct": round(100 * (end - at) / at, 2),
            "every_1000_requests": trace,
        },
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def table(report: dict) -> str:
    lat, rss = report["latency_ms"], report["rss_mib"]
    rows = [
        ("requests / concurrency", f"{report['requests']} / {report['concurrency']}"),
        ("workers x threads", f"{report['workers']} x {report['threads']}"),
        ("unexpected statuses (target 0)", str(report["unexpected"])),
        ("503 busy, sent again after Retry-After", str(report["busy_retried"])),
        ("worker PIDs unchanged", str(report["worker_pids_unchanged"])),
        ("tracebacks in the log", str(report["tracebacks_in_log"])),
        ("wall time, throughput", f"{report['wall_s']} s, {report['throughput_rps']} req/s"),
        ("latency all p50 / p99 / max", f"{lat['all']['p50']} / {lat['all']['p99']} / {lat['all']['max']} ms"),
        ("latency valid p50 / p99 / max", f"{lat['valid']['p50']} / {lat['valid']['p99']} / {lat['valid']['max']} ms"),
        (f"worker RSS at request {rss['at_request']} -> end", f"{rss['at']} -> {rss['end']} MiB"),
        ("RSS growth (target <= 10 %)", f"{rss['growth_pct']} %"),
        ("RSS every 1,000 requests", " ".join(f"{v:.0f}" for v in rss["every_1000_requests"].values()) + " MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nJSON: {out}")
    ok = report["unexpected"] == 0 and report["worker_pids_unchanged"] and report["tracebacks_in_log"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
