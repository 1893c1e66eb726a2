"""Adapters for the tools-in-both-directions tests."""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid

from trio_bridge._errors import TrioBridgeError
from trio_bridge.worker import Adapter, SessionContext, tool


class Agent(Adapter):
    @tool
    def ask_host(self, ctx: SessionContext, name: str, arguments: dict) -> object:
        return ctx.call_host_tool(name, **arguments)

    @tool
    async def loop_type(self) -> str:
        loop = type(asyncio.get_running_loop())
        return f"{loop.__module__}.{loop.__qualname__}"

    @tool
    async def ask_host_async(self, ctx: SessionContext, name: str, arguments: dict) -> object:
        return await ctx.acall_host_tool(name, **arguments)

    @tool
    def ask_host_safely(self, ctx: SessionContext, name: str, arguments: dict) -> dict:
        try:
            return {"result": ctx.call_host_tool(name, **arguments)}
        except TrioBridgeError as exc:
            return {"error": type(exc).__name__, "message": str(exc),
                    "remote_type": getattr(exc, "remote_type", None), "traceback": getattr(exc, "remote_traceback", None)}

    @tool
    def describe_proxy(self, ctx: SessionContext, name: str) -> dict:
        proxy = ctx.host_tools[name]
        return {"doc": proxy.__doc__, "signature": str(inspect.signature(proxy)), "names": dir(ctx.host_tools)}

    @tool
    def use_proxy(self, ctx: SessionContext, word: str) -> object:
        return ctx.host_tools.lookup(word=word)

    @tool
    def tail(self, ctx: SessionContext, n: int) -> list:
        return list(ctx.stream_host_tool("tail", n=n))

    @tool
    async def tail_async(self, ctx: SessionContext, n: int) -> list:
        return [chunk async for chunk in ctx.astream_host_tool("tail", n=n)]

    @tool
    def relay(self, ctx: SessionContext, x: float) -> dict:
        """Call another worker's tool through the host."""
        return {"me": self._instance(), "other": ctx.call_tool("where", x=x)}

    @tool
    def where(self, x: float) -> dict:
        return {"worker": self._instance(), "x": x}

    def _instance(self) -> str:
        """This worker's adapter instance (workers in threads share a pid)."""
        return self.__dict__.setdefault("_instance_id", uuid.uuid4().hex)

    @tool
    def pid(self) -> int:
        return os.getpid()
