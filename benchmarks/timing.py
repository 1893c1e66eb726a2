"""Timing one call at a time, the same way for every path the benchmarks compare."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil


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


def thread_cpu() -> dict[str, float]:
    """CPU seconds each thread of this process has used so far, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return {names.get(t.id, str(t.id)): t.user_time + t.system_time for t in psutil.Process().threads()}


async def cpu_split(measure: Callable[[int], Awaitable[Any]], worker_pid: int, n: int) -> dict[str, float]:
    """CPU µs per call of ``measure(n)``'s ``n`` calls (after ``measure(200)`` to warm up):
    each thread of this process that used at least 1 µs per call (``"host NAME"``), and the
    process ``worker_pid`` (``"worker"``)."""
    worker = psutil.Process(worker_pid)
    await measure(200)
    host0, worker0 = thread_cpu(), worker.cpu_times()
    await measure(n)
    host1, worker1 = thread_cpu(), worker.cpu_times()
    split = {f"host {name}": (host1[name] - host0.get(name, 0.0)) / n * 1e6 for name in host1}
    split = {k: v for k, v in split.items() if v >= 1}
    split["worker"] = ((worker1.user + worker1.system) - (worker0.user + worker0.system)) / n * 1e6
    return split
