"""Keeping freed memory in the process, so that batched inference does not fault its buffers back in.

glibc's malloc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB, growing dynamically to at most
32 MiB) with ``mmap`` and gives them back to the kernel on ``free``; a CNN's activations at batch
8-16 are such blocks, so every forward pass page-faults them in again and batching loses throughput
(bench/model.py measures it). Raising the mmap and trim thresholds keeps them in the heap. Whether
glibc took a value is checked, not assumed: ``mallopt`` returns 0 for a value it refuses (older
glibc caps the mmap threshold at 32 MiB on 64-bit; 2.36 here accepts more), and the environment
variables fail silently, so ``mmap_probe`` allocates a block and asks ``mallinfo2`` where it went.

A process that keeps what it frees must not also keep it many times over: glibc gives threads their own
arenas (up to eight per core), and each arena keeps its own peak. A worker's request threads decode
photos side by side, so with the thresholds raised every one of them would hold on to the memory of its
largest photos. ``arena_max`` caps the arenas (``M_ARENA_MAX``; ``MALLOC_ARENA_MAX`` in the environment,
when set, wins): the memory a worker keeps after a load of phone photos then stops growing with its
request threads (bench/serve.py's memory columns), at no cost in throughput measured there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: mallopt takes a C int, so 2**31 - 1 is the most it can pass
PROBE_BYTES = 48 << 20  # above glibc's 32 MiB dynamic ceiling, below the threshold we set


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def active_allocator() -> str:
    """'jemalloc' or 'tcmalloc' when preloaded into this process, else 'glibc' (or 'unknown')."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if _libc() is not None else "unknown"


def glibc_version() -> str | None:
    libc = _libc()
    return libc.gnu_get_libc_version().decode() if libc is not None else None


def mmap_probe(size: int = PROBE_BYTES) -> bool | None:
    """Whether malloc serves a ``size``-byte block with mmap now (None if glibc cannot tell us)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2") or active_allocator() != "glibc":
        return None
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd
    ptr = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd - before >= size
    finally:
        libc.free(ptr)


def tune_glibc_malloc(
    mmap_threshold: int = DEFAULT_THRESHOLD, trim_threshold: int = DEFAULT_THRESHOLD, arena_max: int | None = None
) -> dict[str, bool | None]:
    """Raise glibc's mmap and trim thresholds in this process, and cap its arenas at ``arena_max`` when
    given (unless ``MALLOC_ARENA_MAX`` is set); returns what glibc accepted.

    Call it early in each process that runs the model, before its threads start (e.g. gunicorn's
    ``post_fork``). A no-op (all None) under another allocator or another libc.
    """
    libc = _libc()
    keys = ("mmap_threshold", "trim_threshold", "probe_mmapped") + (("arena_max",) if arena_max else ())
    if libc is None or active_allocator() != "glibc":
        return dict.fromkeys(keys)
    result: dict[str, bool | None] = {
        "mmap_threshold": bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))),
        "trim_threshold": bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold))),
    }
    result["probe_mmapped"] = mmap_probe(min(PROBE_BYTES, max(1, int(mmap_threshold) - 1)))
    if arena_max:
        own = os.environ.get("MALLOC_ARENA_MAX")
        result["arena_max"] = None if own else bool(libc.mallopt(M_ARENA_MAX, int(arena_max)))
    if not all(result[k] for k in ("mmap_threshold", "trim_threshold")) or result.get("arena_max") is False:
        logger.warning("glibc %s refused a malloc setting: %s", glibc_version(), result)
    return result
