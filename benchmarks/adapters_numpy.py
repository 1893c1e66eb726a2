"""The harness's adapter ``Bench`` on a module that imports numpy, with a ``setup()`` that runs
BLAS: what most real adapters look like at start-up (numpy's OpenBLAS starts its threads when
numpy is imported, so the pool may not fork these workers from its fork server)."""

from __future__ import annotations

import numpy as np

from benchmarks.adapters import Bench


class BenchNumpy(Bench):
    def setup(self) -> None:
        a = np.ones((256, 256))
        self.check = float((a @ a)[0, 0])  # a small matmul: BLAS is loaded and has run
