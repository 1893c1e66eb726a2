"""An adapter whose module imports numpy (its OpenBLAS, and its legacy random state) before the
fork server forks: ``tests/test_fork_server.py``. Its own module, so that the others stay free of
numpy's threads."""

from __future__ import annotations

import os
import time

import numpy
import numpy.random  # at import: its global state exists before the fork
import threadpoolctl

from tests.fork_adapters import Forked
from trio_bridge.worker import tool


class NumpyForked(Forked):
    """Imports numpy at module level (the fork server holds OpenBLAS at one thread while it imports)."""

    @tool
    def legacy_random(self) -> list:
        time.sleep(0.2)  # holds its worker: the other call goes to the other worker
        return [os.getpid(), float(numpy.random.random())]

    @tool
    def blas_threads(self) -> list[int]:
        """Threads of each OpenBLAS loaded in this worker, as threadpoolctl sees them (from a thread
        of the worker's pool: a sync tool)."""
        return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["internal_api"] == "openblas"]
