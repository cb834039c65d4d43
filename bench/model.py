"""The model alone: images/s and latency by batch, backend, threads and memory allocator.

    python -m bench.model [--quick] [--json PATH]

Phase 1 compares allocators (glibc defaults, glibc's MALLOC_* environment variables, mallopt in the
process, jemalloc through LD_PRELOAD) on eager torch and ONNX Runtime; phase 2 runs the whole grid
(eager, channels_last, ONNX Runtime fp32, ONNX Runtime int8-dynamic; 1 thread and all threads) under
the allocator that won. Each setting runs in a child process, since an allocator is chosen at start.
Throughput is also given as a share of the machine's theoretical FP32 peak (see bench.common.fp32_peak).
The default model is the real EfficientNet-Lite0 bundle; resnet18 is randomly initialised (speed does
not depend on the weights, and its ImageNet weights cannot be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import cpu_info, fp32_peak, median, time_call, write_results

REPO = Path(__file__).resolve().parent.parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
MALLOCS = ("glibc", "glibc-env", "mallopt", "jemalloc")
BACKENDS = ("eager", "channels_last", "onnx", "onnx-int8")
MALLOC_ENV_KEYS = ("LD_PRELOAD", *GLIBC_ENV)


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the model alone (no service).")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a CI-sized run: default model, batch 1 and 4, all threads, no int8, 2 allocators (default: off)",
    )
    p.add_argument("--models", default="default,resnet18", help="models to run (default: %(default)s)")
    p.add_argument("--bundle", default="models/default.pth", help="the default model's bundle (default: %(default)s)")
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes (default: %(default)s)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="phase 2 backends (default: %(default)s)")
    p.add_argument("--threads", default="1,all", help="thread counts, 'all' = CPUs available (default: %(default)s)")
    p.add_argument("--mallocs", default=",".join(MALLOCS), help="phase 1 allocators (default: %(default)s)")
    p.add_argument(
        "--malloc-backends", default="eager,onnx", help="phase 1 backends, all threads (default: %(default)s)"
    )
    p.add_argument(
        "--min-seconds", type=float, default=1.5, help="timed seconds per cell at least (default: %(default)s)"
    )
    p.add_argument("--min-iters", type=int, default=5, help="timed calls per cell at least (default: %(default)s)")
    p.add_argument("--json", default=None, help="results file (default: bench/results/model-<time>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def quick_defaults(args: argparse.Namespace) -> None:
    args.models, args.batches, args.threads = "default", "1,4", "all"
    args.mallocs, args.malloc_backends, args.backends = "glibc,mallopt", "onnx", "eager,channels_last,onnx"
    args.min_seconds, args.min_iters = 0.05, 2


# ---------------------------------------------------------------- child: one allocator, many cells


def run_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from serving.allocator import active_allocator, glibc_version, mmap_probe, tune_glibc_malloc

    setting: dict[str, Any] = {}
    if spec["malloc"] == "mallopt":
        setting = tune_glibc_malloc()
    allocator = {
        "name": spec["malloc"],
        "active": active_allocator(),
        "glibc": glibc_version(),
        "mallopt": setting,
        "env": {k: os.environ[k] for k in MALLOC_ENV_KEYS if k in os.environ},
        "48MiB_block_mmapped": mmap_probe(),
    }
    rows = []
    for m in spec["models"]:
        rows += _run_model(m, spec)
    result = {
        "allocator": allocator,
        "rows": rows,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(spec["out"]).write_text(json.dumps(result))


def _runner(m: dict[str, Any], backend: str, threads: int) -> Any:
    from model.bundle import load_bundle
    from model.onnx_runner import OnnxPredictor
    from model.torch_predictor import TorchPredictor

    if backend in ("onnx", "onnx-int8"):
        return OnnxPredictor(m["onnx" if backend == "onnx" else "onnx_int8"], device="cpu", num_threads=threads)
    bundle, model = load_bundle(m["bundle"])
    predictor = TorchPredictor(bundle, model, device="cpu", num_threads=threads, warmup=False)
    if backend == "channels_last":  # the weights channels-last; the batch is converted by the first conv
        predictor.model = predictor.model.to(memory_format=torch.channels_last)
    return predictor


def _run_model(m: dict[str, Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    c, size = m["input"][0], m["input"][1]
    for threads in spec["threads"]:
        for backend in spec["backends"]:
            runner = _runner(m, backend, threads)
            for batch in spec["batches"]:
                x = np.random.default_rng(0).integers(0, 256, (batch, c, size, size), dtype=np.uint8)

                def fn(x: np.ndarray = x, r: Any = runner) -> Any:
                    return r.infer(x)

                times = time_call(fn, min_seconds=spec["min_seconds"], min_iters=spec["min_iters"], warmup=2)
                latency = median(times)
                rows.append(
                    {
                        "model": m["name"],
                        "backend": backend,
                        "threads": threads,
                        "batch": batch,
                        "malloc": spec["malloc"],
                        "latency_ms": latency * 1e3,
                        "img_s": batch / latency,
                        "iters": len(times),
                    }
                )
            del runner
    return rows


# ---------------------------------------------------------------- parent


def prepare_models(args: argparse.Namespace, workdir: Path, backends: list[str]) -> list[dict[str, Any]]:
    """Bundles (and their ONNX exports) for the requested models, plus FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.bundle import load_bundle, make_bundle, save_bundle
    from model.default import build_default_bundle
    from model.export import export_onnx, quantize_onnx
    from model.registry import build_model, imagenet_categories, pretrained_preprocessing

    models = []
    for name in _csv(args.models):
        if name == "default":
            path = Path(args.bundle)
            if not path.is_file():
                path = workdir / "default.pth"
                save_bundle(build_default_bundle(), path)
        else:
            classes = imagenet_categories()
            net = build_model(name, num_classes=len(classes), pretrained="none")
            path = workdir / f"{name}.pth"
            bundle = make_bundle(
                arch=name,
                arch_kwargs={},
                class_names=classes,
                preprocessing=pretrained_preprocessing(name),
                state_dict=net.state_dict(),
            )
            save_bundle(bundle, path)
        bundle, net = load_bundle(path)
        prep = bundle.preprocessing
        entry: dict[str, Any] = {"name": name, "arch": bundle.arch, "bundle": str(path)}
        entry["input"] = [prep.channels, prep.crop]
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            net(torch.zeros(1, prep.channels, prep.crop, prep.crop))
        entry["flops_per_image"] = counter.get_total_flops()
        if any(b.startswith("onnx") for b in backends):
            entry["onnx"] = str(export_onnx(bundle, net, workdir / f"{name}.onnx"))
        if "onnx-int8" in backends:
            entry["onnx_int8"] = str(quantize_onnx(entry["onnx"], workdir / f"{name}.int8-dynamic.onnx", "dynamic"))
        models.append(entry)
    return models


def child_env(malloc: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV_KEYS}
    if malloc == "glibc-env":
        env.update(GLIBC_ENV)
    elif malloc == "jemalloc":
        if not Path(JEMALLOC).is_file():
            raise SystemExit(f"{JEMALLOC} is missing (Debian package libjemalloc2)")
        env["LD_PRELOAD"] = JEMALLOC
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_setting(
    malloc: str, models: list[dict[str, Any]], backends: list[str], threads: list[int], args: Any, workdir: Path
) -> dict[str, Any]:
    out = workdir / f"child-{malloc}-{len(backends)}-{len(threads)}.json"
    spec = {
        "malloc": malloc,
        "models": models,
        "backends": backends,
        "threads": threads,
        "batches": [int(b) for b in _csv(args.batches)],
        "min_seconds": args.min_seconds,
        "min_iters": args.min_iters,
        "out": str(out),
    }
    spec_path = workdir / f"spec-{malloc}.json"
    spec_path.write_text(json.dumps(spec))
    print(f"... {malloc}: {', '.join(backends)}; threads {threads}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "bench.model", "--child", str(spec_path)], env=child_env(malloc), cwd=REPO, check=True
    )
    return json.loads(out.read_text())


def sgemm_flops(threads: int) -> float:
    """Measured FP32 matmul FLOP/s: what the BLAS reaches on this machine now (a practical ceiling)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = median(time_call(lambda: a @ b, min_seconds=0.3, min_iters=5))
    return 2 * 1024**3 / t


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.child:
        run_child(args.child)
        return {}
    if args.quick:
        quick_defaults(args)
    from model.predictor import available_cpus

    cpus = available_cpus()
    threads = sorted({cpus if t == "all" else int(t) for t in _csv(args.threads)})
    backends = _csv(args.backends)
    malloc_backends = _csv(args.malloc_backends)
    mallocs = _csv(args.mallocs)
    info = cpu_info()
    peak = fp32_peak(info)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        models = prepare_models(args, workdir, backends + malloc_backends)
        phase1 = {m: run_setting(m, models, malloc_backends, [cpus], args, workdir) for m in mallocs}
        best = max(mallocs, key=lambda m: _mean_img_s(phase1[m]["rows"]))
        phase2 = run_setting(best, models, backends, threads, args, workdir)
    gemm = {str(t): sgemm_flops(t) for t in threads}
    for row in phase2["rows"]:
        flops = next(m["flops_per_image"] for m in models if m["name"] == row["model"])
        row["pct_peak"] = 100 * row["img_s"] * flops / (peak["per_core_flops"] * min(row["threads"], info["cores"]))
    result = {
        "cpu": info,
        "fp32_peak": peak,
        "sgemm_flops_measured": gemm,
        "torch": torch.__version__,
        "loadavg_before_after": [load_before, os.getloadavg()],
        "models": [{k: m[k] for k in ("name", "arch", "flops_per_image", "input")} for m in models],
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "malloc_comparison": phase1,
        "best_malloc": best,
        "grid": phase2,
    }
    print_tables(result, threads)
    path = write_results("model", result, args.json)
    print(f"\nwrote {path}")
    return result


def _mean_img_s(rows: list[dict[str, Any]]) -> float:
    return sum(r["img_s"] for r in rows) / len(rows)


def print_tables(result: dict[str, Any], threads: list[int]) -> None:
    peak = result["fp32_peak"]
    print(f"\nCPU: {result['cpu']['model']}; FP32 peak {peak['flops'] / 1e9:.0f} GFLOP/s = {peak['how']}")
    gemm = ", ".join(f"{t} thread(s) {f / 1e9:.0f}" for t, f in result["sgemm_flops_measured"].items())
    print(f"measured 1024x1024 sgemm GFLOP/s: {gemm}")
    print(f"load average before/after (shared machine): {result['loadavg_before_after']}")
    for m in result["models"]:
        print(f"{m['name']} ({m['arch']}): {m['flops_per_image'] / 1e9:.2f} GFLOP per image")
    batches = sorted({r["batch"] for r in result["grid"]["rows"]})
    print("\nAllocators (all threads), images/s by batch; max RSS of the child process")
    print("| model | backend | malloc | " + " | ".join(f"b{b}" for b in batches) + " | RSS MB | 48 MiB block mmapped |")
    print("|---" * (len(batches) + 5) + "|")
    for name, run in result["malloc_comparison"].items():
        keys = sorted({(r["model"], r["backend"]) for r in run["rows"]})
        for model, backend in keys:
            cells = {r["batch"]: r for r in run["rows"] if r["model"] == model and r["backend"] == backend}
            vals = " | ".join(f"{cells[b]['img_s']:.1f}" for b in batches)
            probe = run["allocator"]["48MiB_block_mmapped"]
            print(f"| {model} | {backend} | {name} | {vals} | {run['max_rss_mb']:.0f} | {probe} |")
    print(
        f"\nGrid under the best allocator ({result['best_malloc']}): images/s (median latency ms); "
        "% of FP32 peak at the best batch"
    )
    print("| model | backend | threads | " + " | ".join(f"b{b}" for b in batches) + " | % peak |")
    print("|---" * (len(batches) + 4) + "|")
    rows = result["grid"]["rows"]
    for key in dict.fromkeys((r["model"], r["backend"], r["threads"]) for r in rows):
        cells = {r["batch"]: r for r in rows if (r["model"], r["backend"], r["threads"]) == key}
        vals = " | ".join(f"{cells[b]['img_s']:.1f} ({cells[b]['latency_ms']:.0f})" for b in batches)
        best = max(c["pct_peak"] for c in cells.values())
        print(f"| {key[0]} | {key[1]} | {key[2]} | {vals} | {best:.1f} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
