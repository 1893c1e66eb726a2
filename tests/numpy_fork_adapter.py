"""An adapter whose module imports numpy (and its legacy random state) before the fork server
forks: ``tests/test_fork_server.py``. Its own module, so that the others stay free of numpy's
threads."""

from __future__ import annotations

import os
import time

import numpy
import numpy.random  # at import: its global state exists before the fork

from tests.fork_adapters import Forked
from trio_bridge.worker import tool


class NumpyForked(Forked):
    """Imports numpy at module level (forkable with OPENBLAS_NUM_THREADS=1)."""

    @tool
    def legacy_random(self) -> list:
        time.sleep(0.2)  # holds its worker: the other call goes to the other worker
        return [os.getpid(), float(numpy.random.random())]
