"""Trivial tools for the benchmark harness."""

from __future__ import annotations

from trio_bridge.worker import Adapter, tool


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


def noop(x: int = 0) -> int:
    return x
