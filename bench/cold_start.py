"""Cold start: seconds from starting gunicorn to the first ``/readyz`` 200, split into imports and model load.

    python -m bench.cold_start [--quick] [--repeats N] [--json PATH]

For each backend (interleaved, ``--repeats`` times): start ``gunicorn --config gunicorn.conf.py
"app:create_app()"`` on a fresh port with the default model (its ONNX export made ahead of time, as
`make run` does), poll /readyz every 20 ms, read the model's load + warm-up seconds from /metrics
(``imgclf_model_load_seconds``), and stop it. Imports are timed separately in a fresh interpreter
(``import app``: torch, torchvision, ONNX Runtime, Flask...), in the same run. "After imports" is the
total minus the imports: gunicorn's own start, the fork, settings, model load and warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import cpu_info, write_results
from bench.serve import prepare_model_dir
from serving.launcher import REPO, GunicornServer, clean_env

IMPORT_PROBE = "import time; t = time.perf_counter(); import app; print(time.perf_counter() - t)"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Measure the service's cold start.")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: 1 repeat (default: off)")
    p.add_argument("--bundle", default="models/default.pth", help="model to serve (default: %(default)s)")
    p.add_argument("--backends", default="onnx,torch", help="backends to start (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="starts per backend (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/cold_start-<time>.json)")
    return p


def import_seconds() -> float:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=REPO, env=clean_env(), capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def load_seconds(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("imgclf_model_load_seconds{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("imgclf_model_load_seconds not in /metrics")


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.repeats = 1
    backends = [b for b in args.backends.split(",") if b]
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        folder = Path(tmp) / "models"
        prepare_model_dir(Path(args.bundle), "onnx" if "onnx" in backends else "torch", folder)
        for i in range(args.repeats):
            for backend in backends if i % 2 == 0 else backends[::-1]:
                imports = import_seconds()
                env = {"FLASK_BACKEND": backend, "GUNICORN_LOGLEVEL": "warning"}
                with GunicornServer(folder, Path(tmp) / f"{backend}-{i}.log", env=env, name=backend) as server:
                    model = load_seconds(server.get("/metrics"))
                    total = server.ready_s
                runs[backend].append(
                    {
                        "total_s": total,
                        "imports_s": imports,
                        "model_load_warmup_s": model,
                        "after_imports_s": total - imports,
                    }
                )
                print(f"... {backend}: ready in {total:.2f}s (imports {imports:.2f}s, model {model:.2f}s)", flush=True)
    summary = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in runs.items()}
    result = {
        "cpu": cpu_info(),
        "loadavg_before_after": [load_before, os.getloadavg()],
        "args": vars(args),
        "runs": runs,
        "median": summary,
    }
    print(f"\nload average before/after: {result['loadavg_before_after']}")
    print("| backend | to /readyz s | imports s | model load + warm-up s | after imports s |")
    print("|---|---|---|---|---|")
    for b, m in summary.items():
        cells = (m["total_s"], m["imports_s"], m["model_load_warmup_s"], m["after_imports_s"])
        print(f"| {b} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
    path = write_results("cold_start", result, args.json)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
