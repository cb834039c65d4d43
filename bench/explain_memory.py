"""What explanations cost the service in memory: PSS of the whole server with lean workers, after every
worker has explained, and its peak under the pod's worst case with explanations loaded.

    python -m bench.explain_memory [--workers 2] [--rounds 6] [--json PATH]

Serves models/default.pth (and its export) as `make run` does with ``--workers`` workers, and reads the
proportional set size of every process of the server (bench.common.tree_memory) at three points: after
20 predictions (lean workers: no torch), after each of ``--rounds`` rounds of 6 concurrent explanations
of chelsea.png (the first loads torch, Captum and the network into each worker that answers one; the rest
show whether memory keeps growing), and at the highest point while 6 worst-case inputs (deploy/smoke.py's
40 MP 16-bit PNG, as many as the admission limit lets decode at once) and 6 explanations are sent
together. deploy/k8s/deployment.yaml's memory limit is sized from that peak (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import tree_memory, write_results
from bench.serve import multipart
from serving.launcher import GunicornServer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import smoke  # noqa: E402  (deploy/smoke.py: the worst-case PNG and the photo it sends)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The service's memory with explanations loaded in every worker.")
    p.add_argument("--bundle", default="models/default.pth", help="the model served (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers (default: %(default)s, the pod's)")
    p.add_argument("--rounds", type=int, default=6, help="rounds of 6 concurrent explanations (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/explain_memory-<time>.json)")
    return p


def post(port: int, path: str, body: tuple[bytes, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body=body[0], headers={"Content-Type": body[1]})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def concurrently(port: int, requests: list[tuple[str, tuple[bytes, str]]]) -> list[int]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: post(port, *r), requests))


def main(args: argparse.Namespace) -> dict[str, Any]:
    photo = multipart("chelsea.png", smoke.chelsea_png().read_bytes(), "image/png")
    worst = multipart("worst.png", smoke.worst_case_png(), "image/png")
    result: dict[str, Any] = {"args": vars(args), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        bundle = Path(args.bundle)
        shutil.copy(bundle, folder)
        if bundle.with_suffix(".onnx").is_file():
            shutil.copy(bundle.with_suffix(".onnx"), folder)
        with GunicornServer(folder, Path(tmp) / "service.log", env={"WEB_CONCURRENCY": str(args.workers)}) as server:
            assert server.proc is not None
            pid = server.proc.pid
            statuses = [post(server.port, "/predict", photo) for _ in range(20)]
            result["lean"] = {**tree_memory(pid), "statuses": sorted(set(statuses))}
            print(f"lean workers, after 20 predictions: {result['lean']['pss_mib']:.0f} MiB PSS")
            for i in range(args.rounds):
                got = concurrently(server.port, [("/explain", photo)] * 6)
                row = {**tree_memory(pid), "statuses": got}
                result["rounds"].append(row)
                print(f"after explanation round {i + 1}: {row['pss_mib']:.0f} MiB PSS, statuses {got}")
            peak = {"pss_mib": 0.0}
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    now = tree_memory(pid)
                    if now["pss_mib"] > peak["pss_mib"]:
                        peak.update(now)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                got = concurrently(server.port, [("/predict", worst)] * 6 + [("/explain", photo)] * 6)
            finally:
                stop.set()
                sampler.join()
            result["worst_case"] = {"peak": peak, "statuses": got}
            print(f"6 worst-case inputs + 6 explanations at once: peak {peak['pss_mib']:.0f} MiB PSS, statuses {got}")
    print(f"\nwrote {write_results('explain_memory', result, args.json)}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
