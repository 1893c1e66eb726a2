"""Timing one call at a time, the same way for every path the benchmarks compare."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any


async def timed(call: Callable[[int], Awaitable[Any]], n: int) -> list[float]:
    """Seconds each of ``call(0)`` ... ``call(n - 1)`` took, awaited one after another."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        out.append(time.perf_counter() - t0)
    return out


async def timed_calls(pool: Any, tool: str, n: int) -> list[float]:
    """Seconds each of ``n`` calls ``pool.execute(tool, {"x": i})`` took, one at a time."""
    return await timed(lambda i: pool.execute(tool, {"x": i}), n)
