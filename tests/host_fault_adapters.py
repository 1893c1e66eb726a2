"""Adapters for tests/test_host_user_code_faults.py: worker tools that call host tools in odd ways."""

from __future__ import annotations

import asyncio

from trio_bridge.worker import Adapter, SessionContext, tool


class StrFails(Exception):
    """An error whose own ``__str__`` raises a BaseException."""

    def __str__(self) -> str:
        raise BaseException("str broke")


class HostCaller(Adapter):
    @tool
    def call_host_tool(self, ctx: SessionContext, name: str, arguments: dict | None = None) -> object:
        return ctx.call_host_tool(name, **(arguments or {}))

    @tool
    async def acall_host_tool(self, ctx: SessionContext, name: str) -> object:
        return await ctx.acall_host_tool(name)

    @tool
    def take_host_chunks(self, ctx: SessionContext, name: str, n: int) -> list:
        """The first ``n`` chunks of a streaming host tool; the rest is left unread."""
        taken = []
        for chunk in ctx.stream_host_tool(name):
            taken.append(chunk)
            if len(taken) == n:
                break
        return taken

    @tool
    async def atake_host_chunks(self, ctx: SessionContext, name: str, n: int) -> list:
        taken = []
        async for chunk in ctx.astream_host_tool(name):
            taken.append(chunk)
            if len(taken) == n:
                break
        return taken

    @tool
    def host_chunks_and_error(self, ctx: SessionContext, name: str) -> dict:
        """Every chunk of a streaming host tool, and the error that ended it (its type's name)."""
        chunks = []
        try:
            for chunk in ctx.stream_host_tool(name):
                chunks.append(chunk)
        except Exception as exc:
            return {"chunks": chunks, "error": type(exc).__name__}
        return {"chunks": chunks, "error": None}

    @tool
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @tool
    def add(self, a: int, b: int = 2) -> int:
        return a + b
