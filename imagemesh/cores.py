"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

Sizing thread pools and model instances by `os.cpu_count()` counts the host's cores, not the
ones the process may run on: a container limited to 2 CPUs on a 64-core node would start 64
threads that share 2 CPUs' worth of time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cores"]

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: Path = _CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (`cpu.max`: "quota period"), rounded up; None if
    there is no quota or no such file.

    A container limited to 2 CPUs on a 64-core node still sees 64 cores in its affinity mask;
    sized by that, it would start 64 model instances on 2 CPUs' worth of time.
    """
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)
