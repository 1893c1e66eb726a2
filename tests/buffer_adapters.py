"""An adapter for tests/test_array_buffers.py: tools that write into ``ctx.empty`` arrays."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from trio_bridge.worker import Adapter, SessionContext, tool


class Buffers(Adapter):
    def setup(self) -> None:
        self.kept: Any = None

    @tool
    def plus_one_into(self, a: Any, ctx: SessionContext) -> Any:
        return np.add(a, 1, out=ctx.empty(a.shape, a.dtype))

    @tool
    def sum_after(self, a: Any, seconds: float) -> float:
        """The float64 sum of ``a`` read ``seconds`` after the call started."""
        time.sleep(seconds)
        return float(a.sum(dtype=np.float64))

    @tool
    def filled(self, n: int, value: float, keep: str, ctx: SessionContext) -> Any:
        """A ``ctx.empty`` array of ``n`` float64 ``value``s, kept by the tool (``keep``:
        ``"array"`` the array itself, ``"view"`` a view of it made before returning it)."""
        out = ctx.empty(n, np.float64)
        out[:] = value
        self.kept = out if keep == "array" else out[:]
        return out

    @tool
    def write_kept(self, value: float, unseal: bool = False) -> str:
        """Write ``value`` over what ``filled`` kept (``unseal``: after setting its
        ``flags.writeable = True``); ``"refused: ..."`` if numpy refuses."""
        try:
            if unseal:
                self.kept.flags.writeable = True
            self.kept[:] = value
        except ValueError as exc:
            return f"refused: {exc}"
        return "written"

    @tool
    def empty_of(self, shape: Any, dtype: str, ctx: SessionContext) -> Any:
        out = ctx.empty(tuple(shape) if isinstance(shape, list) else shape, dtype)
        out[...] = 0
        return [out, bool(out.flags.writeable)]

    @tool
    def fill_then_crash(self, n: int, ctx: SessionContext) -> None:
        ctx.empty(n, np.uint8)[:] = 1
        os._exit(3)
