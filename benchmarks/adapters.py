"""Trivial tools for the benchmark harness.

This module must not import numpy (or anything else that starts threads at import): its adapter
``Bench`` is the harness's *trivial* adapter, whose workers the pool forks from its fork server.
``benchmarks/adapters_numpy.py`` is the same adapter on a module that imports numpy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from trio_bridge.worker import Adapter, SessionContext, tool


class Bench(Adapter):
    @tool
    def noop(self, x: int = 0) -> int:
        return x

    @tool
    async def anoop(self, x: int = 0) -> int:
        return x

    @tool(inline=True)
    def inline_noop(self, x: int = 0) -> int:
        return x

    @tool
    def echo(self, value: object) -> object:
        return value

    @tool
    def plus_one(self, a: Any, sample_sum: float) -> Any:
        """A new array ``a + 1``, after checking a sample of what arrived (see ``plus_one``)."""
        return plus_one(a, sample_sum)

    @tool
    def plus_one_into(self, a: Any, sample_sum: float, ctx: SessionContext) -> Any:
        """``plus_one`` into a result array of the pool's shared memory (``ctx.empty``): it
        travels back without a copy."""
        return plus_one(a, sample_sum, out=ctx.empty(a.shape, a.dtype))

    @tool
    async def event_loop(self) -> str:
        """The class of this worker's event loop, e.g. ``"uvloop.Loop"``."""
        loop = asyncio.get_running_loop()
        return f"{type(loop).__module__}.{type(loop).__qualname__}"

    @tool
    def count(self, n: int):
        yield from range(n)

    @tool
    async def acount(self, n: int):
        for i in range(n):
            yield i


    @tool
    def time_reads(self, ctx: SessionContext, name: str, n: int, fresh: bool) -> list[float]:
        """Seconds per ``ctx.get_variable`` from a sync tool: cached (as of the call's start)
        or fresh (a round trip to the host)."""
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            ctx.get_variable(name, fresh=fresh)
            samples.append(time.perf_counter() - t0)
        return samples


    @tool
    def time_host_tool_calls(self, ctx: SessionContext, n: int) -> list[float]:
        """Seconds per call of the host tool ``echo`` from a sync tool."""
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            ctx.call_host_tool("echo", x=i)
            samples.append(time.perf_counter() - t0)
        return samples

    @tool
    def time_worker_calls(self, ctx: SessionContext, n: int) -> list[float]:
        """Seconds per call of another worker's ``noop`` through the host."""
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            ctx.call_tool("noop", x=i)
            samples.append(time.perf_counter() - t0)
        return samples


def noop(x: int = 0) -> int:
    return x


#: every SAMPLE_STEP-th element is checked on arrival (a prime stride: it lands on every page offset)
SAMPLE_STEP = 4093


def sample_sum(a: Any) -> float:
    """The sum of every ``SAMPLE_STEP``-th element of ``a``, in float64: a cheap fingerprint."""
    return float(a[::SAMPLE_STEP].sum(dtype="float64"))


def plus_one(a: Any, expected_sample_sum: float, out: Any = None) -> Any:
    """``a + 1`` (a new array, or written into ``out``) once a sample of ``a`` matches what the
    sender computed: in a worker, proof that the bytes arrived; the harness times the same
    function in-process."""
    got = sample_sum(a)
    if got != expected_sample_sum:
        raise ValueError(f"the array arrived changed: sample sum {got}, sent {expected_sample_sum}")
    if out is None:
        return a + 1
    import numpy  # here: this module must not import it (see above); the codec has by now

    return numpy.add(a, 1, out=out)
