"""The CPUs a pool may use: its default ``size`` (a worker each) and each local worker's share
for its native libraries' threads (:mod:`trio_bridge._host._library_threads`).

Those the host may run on (``os.sched_getaffinity``: ``taskset``, a cpuset) and, in a container,
no more than its CPU quota (``docker --cpus``, a Kubernetes CPU limit: cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up), as loky's ``cpu_count()``
(``loky/backend/context.py``, ``_cpu_count_cgroup``) counts them; ``os.cpu_count()`` counts the
machine's.
"""

from __future__ import annotations

import math
import os

CGROUP = "/sys/fs/cgroup"


def usable_cpus(cgroup: str = CGROUP) -> int:
    """The CPUs this process may use, at least 1: those it may run on (``os.sched_getaffinity``;
    ``os.cpu_count()`` where that is missing), at most its cgroup's CPU quota
    (:func:`cgroup_cpus`, read under ``cgroup``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus(cgroup)
    return max(1, cpus if quota is None else min(cpus, quota))


def cgroup_cpus(cgroup: str = CGROUP) -> int | None:
    """The CPU quota in CPUs, rounded up (a container's ``--cpus``), of the cgroup mounted at
    ``cgroup``: v2's ``cpu.max``, else v1's ``cpu/cpu.cfs_quota_us`` over ``cpu/cpu.cfs_period_us``;
    ``None`` without one (``max``, a negative quota, no such files, anything else). That is the
    container's own cgroup where it has a cgroup namespace (Docker's and Kubernetes' default),
    as loky assumes; a quota set on a cgroup above the mount (systemd's ``CPUQuota``) is not seen."""
    parts = _read(os.path.join(cgroup, "cpu.max")).split()
    if len(parts) != 2:
        parts = [_read(os.path.join(cgroup, "cpu", name)) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")]
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:  # "max": no quota
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except (OSError, ValueError):  # none, or not text
        return ""
