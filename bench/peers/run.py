"""LitServe and BentoML beside the service, on the same ONNX export, photos and load, in one run.

    python -m bench.peers.run [--quick] [--workload small,phone] [--peers litserve,bentoml]
                              [--config KIND:NAME:KEY=V,KEY=V ...] [--json PATH]

Each peer runs from its own virtual environment under bench/peers/.venvs/<kind>, made on first use with
pip (LitServe 0.2.19 + python-multipart, or BentoML 1.4.40; with this environment's versions of ONNX
Runtime, Pillow and numpy, so every server runs the same inference library and JPEG decoder), never in
the project's requirements. Every peer serves the same export as the service (the bundle's ``.onnx``)
through plain.py: Pillow + numpy preprocessing, ONNX Runtime, class names from the file's metadata.

By default each peer runs in its best configuration measured on a 2-core machine (2 worker processes
with 1 ONNX Runtime thread each; LitServe batching up to 8 requests within 5 ms, BentoML's adaptive
batching up to 4); ``--config`` adds others (KEYs: workers, threads, batch, batch_ms). The service runs
with its defaults. bench/serve.py's load (closed-loop clients, interleaved servers, each workload's
photos), the machine's limit (bench/limit.py) and the PSS of all of each server's processes are
measured alike. Everything listens on 127.0.0.1 and is stopped at the end, process group and all.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import cpu_info, process_tree, write_results
from bench.limit import measure as measure_limit
from bench.serve import (
    _ints,
    multipart,
    prepare_model_dir,
    print_table,
    quick_defaults,
    ratios,
    run_load,
    service_threads,
    summarize,
    summarize_limits,
)
from bench.workloads import describe, load_workload, parse_workloads
from serving.launcher import GunicornServer, free_port

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
KINDS = ("litserve", "bentoml")
# What each peer's environment installs besides this environment's onnxruntime, pillow and numpy.
PACKAGES = {"litserve": ["litserve==0.2.19", "python-multipart"], "bentoml": ["bentoml==1.4.40"]}
SHARED = ("onnxruntime", "pillow", "numpy")
# The best configurations measured on the 2-core machine (workers x ORT threads, batching).
BEST = {
    "litserve": {"workers": 2, "threads": 1, "batch": 8, "batch_ms": 5},
    "bentoml": {"workers": 2, "threads": 1, "batch": 4},
}
SETTING_KEYS = ("workers", "threads", "batch", "batch_ms")
READY_PATH = {"litserve": "/health", "bentoml": "/readyz"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark LitServe and BentoML beside the service on the same model.")
    p.add_argument("--quick", action="store_true", help="a short smoke run (default: off)")
    p.add_argument(
        "--bundle", default="models/default.pth", help="model to serve, and its .onnx (default: %(default)s)"
    )
    p.add_argument("--workload", default="small,phone", help="photos to send: small, phone (default: %(default)s)")
    p.add_argument("--peers", default=",".join(KINDS), help="peers in their best configuration (default: %(default)s)")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        help="another peer configuration, KIND:NAME:KEY=V,KEY=V with KEYs workers, threads, batch, batch_ms "
        "(e.g. litserve:w1t2:workers=1,threads=2); repeatable (default: none)",
    )
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default: %(default)s)")
    p.add_argument(
        "--requests", type=int, default=96, help="requests per server, level and round (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (default: %(default)s)")
    p.add_argument(
        "--limit-batches", default="1,2,4,8,16", help="model batches for the machine's limit (default: %(default)s)"
    )
    p.add_argument(
        "--limit-seconds", type=float, default=3.0, help="timed seconds per decode rate (default: %(default)s)"
    )
    p.add_argument("--json", default=None, help="results file (default: bench/results/peers-<time>.json)")
    return p


# ---------------------------------------------------------------- the peers' environments


def wanted_packages(kind: str) -> list[str]:
    return [*PACKAGES[kind], *(f"{p}=={importlib.metadata.version(p)}" for p in SHARED)]


def ensure_venv(kind: str) -> Path:
    """The peer's own interpreter, its environment made (or remade, when the wanted packages changed) first."""
    folder = VENVS / kind
    python = folder / "bin" / "python"
    marker = folder / "bench-packages.txt"
    wanted = "\n".join(wanted_packages(kind))
    if python.is_file() and marker.is_file() and marker.read_text() == wanted:
        return python
    print(f"... making {folder} (pip install {' '.join(wanted_packages(kind))})", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(folder)], check=True)  # noqa: S603 - our interpreter
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted_packages(kind)], check=True)  # noqa: S603
    marker.write_text(wanted)
    return python


def installed_versions(python: Path, kind: str) -> dict[str, str]:
    names = [p.split("==")[0] for p in (*PACKAGES[kind], *SHARED)]
    code = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    out = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True)  # noqa: S603
    return json.loads(out.stdout)


# ---------------------------------------------------------------- a peer server


class PeerServer:
    """One peer on a free 127.0.0.1 port, in its own session (process group); ``stop`` ends every
    process it started, also the workers that put themselves in groups of their own."""

    def __init__(self, kind: str, name: str, settings: dict[str, int], onnx: Path, python: Path, log: Path) -> None:
        self.kind, self.name, self.settings = kind, name, settings
        self.port = free_port()
        self.log_path = log
        if kind == "litserve":
            self.cmd = [str(python), str(HERE / "litserve_app.py")]
        else:
            bentoml = python.parent / "bentoml"
            self.cmd = [str(bentoml), "serve", "bentoml_service:Classifier", "--host", "127.0.0.1",
                        "--port", str(self.port)]  # fmt: skip
        self.env = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR") if k in os.environ}
        self.env.update({
            "PATH": f"{python.parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "PEER_ONNX": str(onnx),
            "PEER_PORT": str(self.port),
            "BENTOML_DO_NOT_TRACK": "True",
            "BENTOML_HOME": str(log.parent / "bentoml-home"),
            **{f"PEER_{k.upper()}": str(v) for k, v in settings.items()},
        })  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = 0.0
        self._tree: set[int] = set()

    def start(self, timeout: float = 180.0) -> PeerServer:
        started = time.perf_counter()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - the peer's own interpreter and our script
            self.cmd, cwd=HERE, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{self.port}{READY_PATH[self.kind]}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our http URL
                        if r.status == 200:
                            self.ready_s = time.perf_counter() - started
                            self._tree = set(process_tree(self.proc.pid))
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.1)
            raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever of the tree is left. Safe to call twice."""
        if self.proc is None:
            return
        tree = self._tree | set(process_tree(self.proc.pid))
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
        for pid in tree:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (whose parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def top1_labels(port: int, photos: list[Any]) -> list[str | None]:
    """Each photo sent once: the top label of each answer (BentoML wraps a batchable API's answer in a list)."""
    labels: list[str | None] = []
    for photo in photos:
        body, ctype = multipart(*photo)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310 - our http URL
                answer = json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            labels.append(None)
            continue
        answer = answer[0] if isinstance(answer, list) and answer else answer
        labels.append(answer["predictions"][0]["label"] if isinstance(answer, dict) else None)
    return labels


def parse_config(text: str) -> tuple[str, str, dict[str, int]]:
    """'litserve:w1t2:workers=1,threads=2' -> (kind, name, settings over the kind's best ones)."""
    kind, name, spec = (text.split(":", 2) + ["", ""])[:3]
    if kind not in KINDS or not name:
        raise SystemExit(f"--config {text!r}: KIND:NAME:KEY=V,... with KIND one of {', '.join(KINDS)}")
    settings = dict(BEST[kind])
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTING_KEYS:
            raise SystemExit(f"--config {text!r}: unknown key {key!r} (known: {', '.join(SETTING_KEYS)})")
        settings[key] = int(value)
    return kind, name, settings


# ---------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        quick_defaults(args)
    levels = _ints(args.concurrency)
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise SystemExit(f"{bundle} is missing: python -m model.default --out {bundle}")
    unknown = [k for k in filter(None, args.peers.split(",")) if k not in KINDS]
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (known: {', '.join(KINDS)})")
    peers = [(k, k, dict(BEST[k])) for k in filter(None, args.peers.split(","))]
    peers += [parse_config(c) for c in args.config]
    pythons = {kind: ensure_venv(kind) for kind in {k for k, _, _ in peers}}
    workloads = {w: load_workload(w) for w in parse_workloads(args.workload)}
    load_before = os.getloadavg()
    results: dict[str, Any] = {"cpu": cpu_info(), "args": vars(args)}
    limit_settings = {"batches": _ints(args.limit_batches), "seconds": args.limit_seconds}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        workdir = Path(tmp)
        onnx = prepare_model_dir(bundle, "onnx", workdir / "models")  # the one export every server serves
        servers: list[Any] = [GunicornServer(workdir / "models", workdir / "service.log", name="service")]
        workers, threads = service_threads({})
        configs: dict[str, Any] = {
            "service": {"kind": "this service, defaults", "workers": workers, "threads_per_worker": threads}
        }
        for kind, name, settings in peers:
            servers.append(PeerServer(kind, name, settings, onnx, pythons[kind], workdir / f"{name}.log"))
            configs[name] = {"kind": kind, "settings": settings, "versions": installed_versions(pythons[kind], kind)}
        print("... the machine's limit (before the servers start)", flush=True)
        limit_runs = [measure_limit(workloads, onnx, **limit_settings)]
        try:
            for s in servers:
                s.start()
                configs[s.name]["ready_s"] = s.ready_s
            # the same model and preprocessing: every server's top-1 on every photo, against the service's
            top1 = {s.name: [label for w in workloads.values() for label in top1_labels(s.port, w)] for s in servers}
            for name, labels in top1.items():
                same = sum(a == b for a, b in zip(labels, top1["service"], strict=True))
                configs[name]["top1_same_as_service"] = f"{same}/{len(labels)}"
            cells, memory = run_load(servers, workloads, levels, args.rounds, args.requests)
        finally:
            for s in servers:
                s.stop()
        if not args.quick:
            print("... the machine's limit (after the servers stopped)", flush=True)
            limit_runs.append(measure_limit(workloads, onnx, **limit_settings))

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
    results["versus_best_peer"] = versus_best_peer(results, levels)
    print_table(results, levels)
    for w, v in results["versus_best_peer"].items():
        if v:
            p50 = "-" if v["p50_ratio"] is None else f"{v['p50_ratio']:.2f}"
            print(f"{w}: best peer {v['best_peer']}; service ÷ it: req/s at {max(levels)} {v['req_s_ratio']:.2f}, "
                  f"p50 at {min(levels)} {p50}, PSS after load {v['pss_ratio']:.2f}")  # fmt: skip
    path = write_results("peers", results, args.json)
    print(f"\nwrote {path}")
    return results


def versus_best_peer(results: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    """Per workload: the peer with the most req/s at the top level, and the service's ratios to it."""
    top, low = max(levels), min(levels)
    out: dict[str, Any] = {}
    for w, per in results["ratios"].items():
        peers = [n for n in per if n != "service"]
        if not peers or "service" not in per:
            out[w] = None
            continue
        best = max(peers, key=lambda n: per[n][f"req_s_c{top}"])
        s, b = per["service"], per[best]
        mem = results["memory_mib"]
        out[w] = {
            "best_peer": best,
            "req_s_ratio": s[f"req_s_c{top}"] / b[f"req_s_c{top}"],
            "p50_ratio": s[f"p50_c{low}_ms"] / b[f"p50_c{low}_ms"] if b[f"p50_c{low}_ms"] else None,
            "pss_ratio": mem["service"]["after_load"]["pss_mib"] / mem[best]["after_load"]["pss_mib"],
        }
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
