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


def noop(x: int = 0) -> int:
    return x
