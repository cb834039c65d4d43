"""Where a service worker's time goes under load: py-spy samples of the real worker, by stage.

    python -m bench.profile_serve [--clients 16] [--seconds 10] [--backend onnx] [--json PATH]

Starts the service as bench/serve.py does, drives it with the same photos, and samples the gunicorn
worker with ``py-spy record --format raw --nonblocking`` (active threads only, Python frames). Each sample's
stack is put in one bucket: inference (ONNX Runtime / torch forward), decode (Pillow), preprocess (the
eval transform), postprocess, HTTP (gunicorn, Werkzeug, Flask, multipart parsing), waiting (a thread
blocked on a lock, queue or socket that py-spy still counted as active), other. Needs py-spy
(requirements-dev.txt) and permission to ptrace the worker (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.common import write_results
from bench.serve import drive, load_photos, multipart, prepare_model_dir
from serving.launcher import GunicornServer

# a sample goes to the first bucket one of whose functions is anywhere on its stack
BUCKETS = (
    ("inference", ("_run_batch (", "infer (", "onnxruntime")),
    ("decode", ("decode_image (",)),
    ("preprocess", ("preprocess (",)),
    ("postprocess", ("postprocess (",)),
    ("http", ("gunicorn", "werkzeug", "flask")),
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Profile a service worker under load with py-spy.")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument("--backend", default="onnx", choices=("onnx", "torch"), help="backend (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seconds", type=int, default=10, help="sampling seconds (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/profile_serve-<time>.json)")
    return p


WAITS = ("Condition.wait", "select (selectors.py", "Event.wait", "Queue.get")


def bucket_of(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    if any(w in leaf for w in WAITS):  # blocked, not computing: py-spy cannot tell every such wait
        return "waiting"
    for name, needles in BUCKETS:
        if any(n in stack for n in needles):
            return name
    return "other"


def main(args: argparse.Namespace) -> dict[str, Any]:
    beside = Path(sys.executable).parent / "py-spy"
    pyspy = str(beside) if beside.is_file() else shutil.which("py-spy") or "py-spy"
    bodies = [multipart(*p) for p in load_photos(quick=False)]
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        folder = Path(tmp) / "models"
        prepare_model_dir(Path(args.bundle), args.backend, folder)
        server = GunicornServer(folder, Path(tmp) / "service.log", env={"FLASK_BACKEND": args.backend})
        with server:
            assert server.proc is not None
            worker = subprocess.check_output(["pgrep", "-P", str(server.proc.pid)], text=True).split()[0]
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    drive(server.port, bodies, args.clients, 4 * args.clients)

            driver = threading.Thread(target=load)
            driver.start()
            raw = Path(tmp) / "raw.txt"
            try:
                proc = subprocess.run(
                    [pyspy, "record", "--pid", worker, "--duration", str(args.seconds), "--rate", "200",
                     "--format", "raw", "--nonblocking", "--output", str(raw)],
                    capture_output=True, text=True,
                )  # fmt: skip
                if proc.returncode != 0:
                    raise SystemExit(f"py-spy failed: {proc.stderr[-2000:]}")
            finally:
                stop.set()
                driver.join()
            counts: dict[str, int] = {}
            leaves: dict[str, dict[str, int]] = {}
            for line in raw.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if stack:
                    b = bucket_of(stack)
                    counts[b] = counts.get(b, 0) + int(n)
                    leaf = stack.split(";")[-1]
                    leaves.setdefault(b, {})[leaf] = leaves.setdefault(b, {}).get(leaf, 0) + int(n)
    total = sum(counts.values())
    shares = {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    top = {b: sorted(v.items(), key=lambda kv: -kv[1])[:6] for b, v in leaves.items()}
    result = {"args": vars(args), "loadavg": os.getloadavg(), "samples": total, "shares": shares, "top_frames": top}
    print(f"load average {result['loadavg']}; {total} samples of active worker threads")
    print("| stage | share of samples |\n|---|---|")
    for k, v in shares.items():
        print(f"| {k} | {v:.0%} |")
    print(f"\nwrote {write_results('profile_serve', result, args.json)}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
