"""Overload: goodput, shed share, latency, memory and probe latency at 6x the normal concurrency.

    python -m bench.overload [--quick] [--clients 16] [--factor 6] [--seconds 45] [--ignore-retry-after] [--out PATH]

One real gunicorn serves the default model with the service's defaults (as `make run` does, its ONNX
export made ahead of time). Closed-loop clients on 127.0.0.1 (each sends its next request when the
last answer arrived, on a keep-alive connection, with a client timeout) send the real photos
bench/serve.py uses: first ``--clients`` of them (the normal load) for ``--seconds``, then ``--factor``
times as many for as long. A client told ``503`` with ``Retry-After`` waits that long (at most 5 s)
before its next request, as urllib3's ``Retry`` and well-behaved clients do; ``--ignore-retry-after``
makes every client retry at once instead (a retry storm: the clients and the service share the CPUs).
Throughout, a prober asks /healthz and /readyz every 250 ms on a new connection with a 1 s timeout, as
Kubernetes' probes do, and a sampler adds up the resident memory of gunicorn's master and workers from
/proc every 250 ms.

Reported per phase: goodput (successful predictions completed inside the phase, per second), the
shares of 503s and of other errors or timeouts, p50/p99 latency of answered requests, the service's
peak RSS (sampled sum over its processes; also the sum of each process's VmHWM), probe latency
p50/p99/max and the share answered (200) within 1 s; and goodput under overload over the normal one.
"""

from __future__ import annotations

import argparse
import http.client
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import cpu_info, write_results
from bench.serve import load_photos, multipart, prepare_model_dir
from serving.launcher import GunicornServer

PROBE_PERIOD_S = 0.25
PROBE_TIMEOUT_S = 1.0
MAX_RETRY_AFTER_S = 5.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Drive the service at 6x its normal concurrency and watch what it does.")
    p.add_argument("--quick", action="store_true", help="10 s phases (default: off)")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="normal concurrency (default: %(default)s)")
    p.add_argument("--factor", type=int, default=6, help="overload = factor x clients (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=45.0, help="length of each phase, s (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, s (default: %(default)s)")
    p.add_argument(
        "--ignore-retry-after",
        action="store_true",
        help="send the next request at once after a 503 (default: wait its Retry-After, at most 5 s)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service, e.g. FLASK_MAX_INFLIGHT=4 or GUNICORN_THREADS=12 (repeatable)",
    )
    p.add_argument("--out", "--json", dest="out", default=None, help="results file (default: bench/results/...)")
    return p


# ---------------------------------------------------------------- /proc


def service_pids(server: GunicornServer) -> list[int]:
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- load, probes, memory


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_clients(
    port: int,
    bodies: list[tuple[bytes, str]],
    clients: int,
    seconds: float,
    timeout: float,
    honour_retry_after: bool = True,
) -> dict:
    """``clients`` closed-loop clients for ``seconds``; every answer's (end time, status, latency)."""
    lock = threading.Lock()
    done: list[tuple[float, str, float]] = []
    started = time.perf_counter()
    deadline = started + seconds

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        i = offset
        while time.perf_counter() < deadline:
            retry_after = None
            body, ctype = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                outcome = "ok" if resp.status == 200 and b'"predictions"' in payload else str(resp.status)
                retry_after = resp.getheader("Retry-After") if resp.status == 503 and honour_retry_after else None
                if resp.will_close:
                    conn.close()
            except TimeoutError:
                outcome = "timeout"
                conn.close()
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                conn.close()
            t1 = time.perf_counter()
            with lock:
                done.append((t1, outcome, t1 - t0))
            if outcome not in ("ok", "503") and not outcome.isdigit():
                time.sleep(0.05)  # a refused connection answers at once: do not spin
            elif retry_after is not None and retry_after.isdigit():
                time.sleep(min(float(retry_after), MAX_RETRY_AFTER_S))  # as urllib3's Retry does
        conn.close()

    cpu0 = time.process_time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"started": started, "deadline": deadline, "done": done, "client_cpu_s": time.process_time() - cpu0}


class Prober(threading.Thread):
    """GET /healthz and /readyz every 250 ms on a new connection each, 1 s timeout: (time, path, status, s)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, str, str, float]] = []
        self.stopping = threading.Event()

    def probe(self, path: str) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PROBE_TIMEOUT_S)
        try:
            conn.request("GET", path)
            status = str(conn.getresponse().status)
        except TimeoutError:
            status = "timeout"
        except (OSError, http.client.HTTPException) as exc:
            status = type(exc).__name__
        finally:
            conn.close()
        self.samples.append((t0, path, status, time.perf_counter() - t0))

    def run(self) -> None:
        while not self.stopping.is_set():
            tick = time.perf_counter()
            for path in ("/healthz", "/readyz"):
                threading.Thread(target=self.probe, args=(path,), daemon=True).start()
            self.stopping.wait(max(0.0, PROBE_PERIOD_S - (time.perf_counter() - tick)))


class MemorySampler(threading.Thread):
    """Sum of VmRSS over the service's processes every 250 ms (workers looked up again each time)."""

    def __init__(self, server: GunicornServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            pids = service_pids(self.server)
            self.samples.append((time.perf_counter(), sum(status_kib(p, "VmRSS") for p in pids)))
            self.stopping.wait(PROBE_PERIOD_S)


def summarize(
    name: str, clients: int, load: dict, probes: list[tuple[float, str, str, float]], memory: list[tuple[float, int]]
) -> dict[str, Any]:
    start, end = load["started"], load["deadline"]
    inside = [d for d in load["done"] if d[0] <= end]
    outcomes = Counter(o for _, o, _ in inside)
    answered = [lat for _, o, lat in inside if o.isdigit() or o == "ok"]
    ok_lat = [lat for _, o, lat in inside if o == "ok"]
    total = len(inside)
    phase_probes = [p for p in probes if start <= p[0] <= end]
    probe_lat = [p[3] for p in phase_probes]
    in_time = [p for p in phase_probes if p[2] == "200" and p[3] <= PROBE_TIMEOUT_S]
    rss = [kib for t, kib in memory if start <= t <= end + 1]
    return {
        "phase": name,
        "clients": clients,
        "seconds": end - start,
        "completed": total,
        "outcomes": dict(outcomes),
        "goodput_per_s": outcomes["ok"] / (end - start),
        "share_503": outcomes["503"] / total if total else None,
        "share_other_errors_or_timeouts": (total - outcomes["ok"] - outcomes["503"]) / total if total else None,
        "p50_answered_ms": 1e3 * (percentile(answered, 50) or 0) if answered else None,
        "p99_answered_ms": 1e3 * (percentile(answered, 99) or 0) if answered else None,
        "p50_ok_ms": 1e3 * (percentile(ok_lat, 50) or 0) if ok_lat else None,
        "p99_ok_ms": 1e3 * (percentile(ok_lat, 99) or 0) if ok_lat else None,
        "in_flight_at_end": sum(1 for d in load["done"] if d[0] > end),
        "client_cpu_s": load["client_cpu_s"],
        "peak_rss_sum_mib": max(rss) / 1024 if rss else None,
        "probes": len(phase_probes),
        "probe_statuses": dict(Counter(p[2] for p in phase_probes)),
        "probe_p50_ms": 1e3 * (percentile(probe_lat, 50) or 0) if probe_lat else None,
        "probe_p99_ms": 1e3 * (percentile(probe_lat, 99) or 0) if probe_lat else None,
        "probe_max_ms": 1e3 * max(probe_lat) if probe_lat else None,
        "probes_ok_within_1s": len(in_time) / len(phase_probes) if phase_probes else None,
    }


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(result: dict[str, Any]) -> None:
    print(f"\nload average before/after: {result['loadavg_before']} / {result['loadavg_after']}")
    print(
        "\n| phase | clients | goodput/s | 503 share | other errors/timeouts | p50 ms | p99 ms | peak RSS MiB "
        "| probe p50 ms | probe p99 ms | probe max ms | probes 200 within 1 s | service CPU s | client CPU s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["phases"]:
        print(
            f"| {r['phase']} | {r['clients']} | {r['goodput_per_s']:.1f} | {fmt(r['share_503'], '.1%')} | "
            f"{fmt(r['share_other_errors_or_timeouts'], '.1%')} | {fmt(r['p50_answered_ms'], '.0f')} | "
            f"{fmt(r['p99_answered_ms'], '.0f')} | {fmt(r['peak_rss_sum_mib'], '.0f')} | "
            f"{fmt(r['probe_p50_ms'], '.0f')} | {fmt(r['probe_p99_ms'], '.0f')} | {fmt(r['probe_max_ms'], '.0f')} | "
            f"{fmt(r['probes_ok_within_1s'], '.1%')} | {r['service_cpu_s']:.1f} | {r['client_cpu_s']:.1f} |"
        )
    for r in result["phases"]:
        print(f"{r['phase']}: outcomes {r['outcomes']}, probes {r['probe_statuses']}")
    print(f"goodput under overload / normal goodput: {result['goodput_ratio']:.2f}")
    print(
        "successful predictions per service CPU second: "
        + ", ".join(f"{r['phase']} {r['ok_per_service_cpu_s']:.1f}" for r in result["phases"])
        + f" (ratio {result['ok_per_cpu_s_ratio']:.2f})"
    )
    print(f"service peak RSS, sum of each process's VmHWM: {result['sum_vmhwm_mib']:.0f} MiB")


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.seconds = min(args.seconds, 10.0)
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise SystemExit(f"{bundle} is missing: python -m model.default --out {bundle}")
    photos = load_photos(args.quick)
    bodies = [multipart(*p) for p in photos]
    result: dict[str, Any] = {
        "cpu": cpu_info(),
        "args": vars(args),
        "photos": [n for n, _, _ in photos],
        "loadavg_before": os.getloadavg(),
        "phases": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        workdir = Path(tmp)
        prepare_model_dir(bundle, "onnx", workdir / "models")
        env = dict(item.split("=", 1) for item in args.env)
        server = GunicornServer(workdir / "models", workdir / "gunicorn.log", env=env, name="overload")
        server.start()
        try:
            result["ready_s"] = server.ready_s
            run_clients(server.port, bodies, args.clients, 3.0 if args.quick else 5.0, args.timeout)  # warm-up
            prober, sampler = Prober(server.port), MemorySampler(server)
            prober.start()
            sampler.start()
            for name, clients in (("normal", args.clients), ("overload", args.clients * args.factor)):
                print(f"... {name}: {clients} clients for {args.seconds:.0f} s", flush=True)
                cpu0 = cpu_s(service_pids(server))
                load = run_clients(
                    server.port, bodies, clients, args.seconds, args.timeout, not args.ignore_retry_after
                )
                row = summarize(name, clients, load, prober.samples, sampler.samples)
                row["service_cpu_s"] = cpu_s(service_pids(server)) - cpu0
                # the shared machine's other load changes what CPU the service gets: goodput per CPU second
                # tells a slower service from a starved one
                row["ok_per_service_cpu_s"] = row["outcomes"].get("ok", 0) / max(row["service_cpu_s"], 1e-9)
                row["loadavg_after"] = os.getloadavg()
                result["phases"].append(row)
                time.sleep(2.0)  # let answers in flight at the end drain before the next phase
            prober.stopping.set()
            sampler.stopping.set()
            prober.join()
            sampler.join()
            pids = service_pids(server)
            result["sum_vmhwm_mib"] = sum(status_kib(p, "VmHWM") for p in pids) / 1024
            result["processes"] = len(pids)
        finally:
            server.stop()
        log = server.log()
        result["worker_restarts"] = log.count("Booting worker") - 1
        result["worker_timeouts"] = log.count("WORKER TIMEOUT")
    result["loadavg_after"] = os.getloadavg()
    normal, over = result["phases"]
    result["goodput_ratio"] = over["goodput_per_s"] / normal["goodput_per_s"] if normal["goodput_per_s"] else None
    result["ok_per_cpu_s_ratio"] = over["ok_per_service_cpu_s"] / normal["ok_per_service_cpu_s"]
    print_table(result)
    path = write_results("overload", result, args.out)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
