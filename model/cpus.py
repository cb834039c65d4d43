"""How many CPUs this process may really use: its affinity, and the container's CPU quota.

A container limited with ``docker run --cpus 2``, a Kubernetes CPU limit or Cloud Run's ``--cpu`` still
sees every CPU of the host in ``os.cpu_count()`` and in its affinity; only the cgroup's quota
(``cpu.max``, or ``cpu.cfs_quota_us`` on cgroup v1) says it gets two. Sizing threads or worker processes
from the host's count would oversubscribe the quota and throttle every request.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (2.0 for ``--cpus 2``), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "200000 100000" or "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on (affinity), at most its cgroup's quota rounded down (at least 1)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus
