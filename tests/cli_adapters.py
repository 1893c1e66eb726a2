"""An adapter whose results JSON cannot hold as they are (for `trio-bridge run --json`)."""

from __future__ import annotations

import numpy as np

from trio_bridge.worker import Adapter, tool


class Awkward(Adapter):
    @tool
    def values(self) -> dict:
        """numpy arrays and scalars, a tuple, bytes, NaN and infinities."""
        return {
            "matrix": np.arange(6, dtype=np.int32).reshape(2, 3),
            "scores": np.array([0.5, np.nan]),
            "count": np.int64(7),
            "pair": (1, "b"),
            "raw": b"\x00\xffhi",
            "limits": [float("inf"), float("-inf")],
        }

    @tool
    def rows(self, n: int):
        """Streams ``n`` rows, each with an array."""
        for i in range(n):
            yield {"i": i, "row": np.full(2, i, dtype=np.float32)}
