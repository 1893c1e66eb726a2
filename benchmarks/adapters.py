"""Trivial tools for the benchmark harness."""

from __future__ import annotations

import time

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
