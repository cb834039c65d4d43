"""Shared by the bench scripts: timing, machine facts, FP32 peak, results files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], Any], *, min_seconds: float, min_iters: int, warmup: int = 1) -> list[float]:
    """Per-call wall seconds: ``warmup`` untimed calls, then at least ``min_iters`` and ``min_seconds``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_info() -> dict[str, Any]:
    """Model, vendor/family, cores this process may use, SIMD width and clock from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", platform.processor()),
        "vendor": fields.get("vendor_id", ""),
        "family": int(fields.get("cpu family", "0") or 0),
        "cores": len(os.sched_getaffinity(0)),
        "mhz": float(fields.get("cpu MHz", "0") or 0),
        "avx512f": "avx512f" in flags,
        "fma": "fma" in flags,
    }


def fp32_peak(info: dict[str, Any], fma_units: int = 2) -> dict[str, Any]:
    """Theoretical FP32 FLOP/s = cores x FMA units x SIMD lanes x 2 (mul+add) x clock.

    Lanes: 16 with AVX-512, 8 with AVX2+FMA, 4 otherwise; AMD Zen 4 (family 25) runs AVX-512 on
    256-bit units, so 8 there. The clock is /proc/cpuinfo's "cpu MHz" (under KVM the host's nominal
    clock; boost is not visible), and 2 FMA units per core is an assumption true of Zen 2-5 and of
    Intel's server cores.
    """
    lanes = 16 if info["avx512f"] else 8 if info["fma"] else 4
    if info["vendor"] == "AuthenticAMD" and info["family"] == 25 and lanes == 16:
        lanes = 8
    per_core = fma_units * lanes * 2 * info["mhz"] * 1e6
    return {
        "per_core_flops": per_core,
        "flops": per_core * info["cores"],
        "how": f"{info['cores']} cores x {fma_units} FMA units x {lanes} fp32 lanes x 2 x {info['mhz']:.0f} MHz "
        "(clock: 'cpu MHz' in /proc/cpuinfo)",
    }


def write_results(name: str, data: dict[str, Any] | list[Any], path: str | None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it, or in its process group (a server and its workers)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        parents[int(entry.name)] = int(fields[1])
        groups[int(entry.name)] = int(fields[2])
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return []
    found = {pid} | ({p for p, g in groups.items() if g == group} if group == pid else set())
    grew = True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def pss_mib(pids: list[int]) -> float:
    """Proportional set size summed over ``pids`` (shared pages split between the processes sharing
    them, so a sum over processes counts each page once), from /proc/PID/smaps_rollup."""
    total_kib = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # exited meanwhile
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total_kib += int(line.split()[1])
                break
    return total_kib / 1024


def tree_memory(pid: int) -> dict[str, Any]:
    """PSS of a server's whole process tree, and how many processes it has."""
    pids = process_tree(pid)
    return {"pss_mib": pss_mib(pids), "processes": len(pids)}
