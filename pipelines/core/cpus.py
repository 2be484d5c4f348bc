"""How many CPU threads a job may use, and how to split them.

The budget is the smallest of: the CPUs this process may run on (affinity, which SLURM and
taskset set), the cgroup's CPU quota (containers, systemd slices), and an explicit
OMP_NUM_THREADS (which Snakemake sets to a job's `threads`). `os.cpu_count()` is none of
these: on a shared node it counts cores that belong to other jobs.

Split among Dask workers, the budget goes to single-threaded worker processes first: on a
busy machine an OpenMP team of several threads waits for its slowest member at every layer,
so one 2-thread model beside another job ran 4x slower than two 1-thread workers
(`benchmarks/saliency_threads.py`); single threads lose nothing on a quiet one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_LOCAL_WORKERS = 8  # each worker holds its own copy of the model
# OMP_NUM_THREADS as the job was started with: a Dask LocalCluster sets it to 1 in the
# process that starts it (for its workers), which must not shrink this process's budget.
OMP_AT_START = os.environ.get("OMP_NUM_THREADS", "")


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by a cgroup v2 `cpu.max` (quota / period), or v1's cfs files; None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPU threads this process should use at most (at least 1)."""
    budget = _affinity()
    quota = _cgroup_quota()
    if quota is not None:
        budget = min(budget, max(1, math.floor(quota)))
    omp = OMP_AT_START
    if omp.isdigit() and int(omp) > 0:
        budget = min(budget, int(omp))
    return max(1, budget)


def split(workers: int | None, threads: int | None, budget: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads each) for local Dask workers: what was given, and the
    rest from the budget, so that workers x threads never exceeds it unless both were given."""
    budget = budget or usable_cpus()
    if workers and threads:
        return workers, threads
    if workers:
        return workers, max(1, budget // workers)
    if threads:
        return max(1, budget // threads), threads
    return max(1, min(budget, MAX_LOCAL_WORKERS)), 1
