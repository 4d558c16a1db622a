"""How many CPUs a training process may use, and the DataLoader workers that follows from it
(data.workers: auto). Read once per stage; the cgroup files are what a pod's CPU limit sets."""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_WORKERS = 8  # past this a rank's decoding rarely gains, and each worker holds a copy of the dataset object


def auto_workers(cpus: float, ranks: int) -> int:
    """Workers per rank: the rank's share of the CPUs, less one core for the training process
    itself (which also decodes when there are no workers), at most MAX_WORKERS."""
    return max(0, min(MAX_WORKERS, math.floor(cpus / max(ranks, 1)) - 1))


def cpu_quantity(q: str) -> float:
    """A Kubernetes CPU quantity ('2', '3500m', '0.5') in cores."""
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU limit of this process's cgroup in cores (v2 cpu.max, v1 cfs quota), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus(requested: str | None) -> float:
    """The CPUs this pod (or host) gives its ranks: the least of the CPUs it may be scheduled on,
    its cgroup's limit and spec.resources.cpu (a pod's request and limit; on a node that does
    not enforce it, still what the scheduler counted on)."""
    bounds = [float(len(os.sched_getaffinity(0)))]
    limit = cgroup_cpus()
    if limit is not None:
        bounds.append(limit)
    if requested:
        bounds.append(cpu_quantity(requested))
    return min(bounds)
