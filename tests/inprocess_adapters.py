"""Adapters for tests/test_testing_helpers.py (run in process by ``open_adapter_pool``, and by
real worker processes through the ``trio_bridge_pool`` fixture)."""

from __future__ import annotations

import threading
import time
from typing import Any

import trio

from trio_bridge.worker import Adapter, SessionContext, tool

#: ``Calculator``'s setups in this process, across instances (what open_adapter_pool ran)
SETUPS: list[dict[str, Any]] = []
#: call ids of ``spin`` calls whose tool saw ``ctx.cancelled``
CANCELLED_SEEN: list[str] = []


class Calculator(Adapter):
    """One tool of each kind, session variables, host tools and ``self.options``."""

    def setup(self) -> None:
        self.scale = self.options.get("scale", 1)
        self.sessions: list[tuple[str, str, Any]] = []
        SETUPS.append(dict(self.options))

    def on_session_start(self, session_id: str, metadata: dict[str, Any]) -> None:
        self.sessions.append(("start", session_id, metadata))

    def on_session_end(self, session_id: str) -> None:
        self.sessions.append(("end", session_id, None))

    @tool
    def multiply(self, x: float) -> float:
        """Multiply by the ``scale`` option (a sync tool: it runs in a thread)."""
        return x * self.scale

    @tool
    def where(self) -> dict[str, Any]:
        """Which thread a sync tool runs in."""
        return {"main": threading.current_thread() is threading.main_thread(), "name": threading.current_thread().name}

    @tool
    async def slow_add(self, a: int, b: int, seconds: float = 3600.0) -> int:
        """Sleep ``seconds`` on the Trio clock, then add (an async tool)."""
        await trio.sleep(seconds)
        return a + b

    @tool
    async def sleep_until_cancelled(self, ctx: SessionContext, seconds: float) -> str:
        """Sleep; report in the session's variable ``outcome`` whether the sleep was cancelled."""
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await ctx.aset_variable("outcome", "cancelled")
            raise
        await ctx.aset_variable("outcome", "finished")
        return "finished"

    @tool
    def count(self, n: int, ctx: SessionContext):
        """Yield 0..n-1, each times the scale (a streaming tool, stepped in a thread)."""
        for i in range(n):
            if ctx.cancelled:
                return
            yield i * self.scale

    @tool
    async def ticks(self, n: int, every: float = 60.0):
        """Yield n ticks, one every ``every`` seconds of the Trio clock (an async streaming tool)."""
        for i in range(n):
            await trio.sleep(every)
            yield {"tick": i, "at": trio.current_time()}

    @tool
    def bump(self, ctx: SessionContext, by: int = 1) -> dict[str, Any]:
        """Read the session's ``counter`` (as of the call's start), add ``by`` to it (sync)."""
        before = ctx.variables["counter"]
        variable = ctx.set_variable("counter", before + by)
        return {"before": before, "after": variable.value, "version": variable.version, "source": variable.source}

    @tool
    async def abump(self, ctx: SessionContext, by: int = 1) -> dict[str, Any]:
        """:meth:`bump`, async."""
        before = ctx.variables["counter"]
        variable = await ctx.aset_variable("counter", before + by)
        return {"before": before, "after": variable.value, "version": variable.version}

    @tool
    def register(self, ctx: SessionContext, name: str, value: float) -> list[str]:
        """Register a float variable; the names the call sees now."""
        ctx.register_variable(name, "float", value, constraints={"min": 0})
        return ctx.list_variables()

    @tool
    def ask_host(self, ctx: SessionContext, text: str) -> Any:
        """Call the host tool ``shout`` (sync, blocking form)."""
        return ctx.call_host_tool("shout", text=text)

    @tool
    async def aask_host(self, ctx: SessionContext, text: str) -> Any:
        """Call the host tool ``shout`` through ``ctx.ahost_tools()`` (async)."""
        tools = await ctx.ahost_tools()
        return await tools.shout(text=text)

    @tool
    def host_words(self, ctx: SessionContext, text: str) -> list[str]:
        """Collect a streaming host tool's chunks (sync)."""
        return list(ctx.stream_host_tool("words", text=text))

    @tool
    async def blocking_in_async(self, ctx: SessionContext) -> Any:
        """Misuse: a blocking ctx method in an async tool."""
        return ctx.call_host_tool("shout", text="x")

    @tool
    def via_worker(self, ctx: SessionContext, x: float) -> Any:
        """Call another tool of the pool through the host."""
        return ctx.call_tool("multiply", x=x)

    @tool
    async def watch(self, ctx: SessionContext, changes: int) -> list[Any]:
        """The values of ``counter`` seen while watching for ``changes`` changes."""
        seen = []
        async for update in ctx.watch_variables(["counter"]):
            seen.append(update.new_value)
            if len(seen) > changes:
                break
        return seen

    @tool
    def spin(self, ctx: SessionContext, limit: float = 30.0) -> str:
        """Busy in a thread until the call is cancelled (``ctx.wait_cancelled``) or ``limit`` s pass."""
        if ctx.wait_cancelled(limit):
            CANCELLED_SEEN.append(ctx.call_id)
            return "saw cancelled"
        return "timed out"

    @tool
    async def deadline_left(self, ctx: SessionContext) -> list[Any]:
        """The call's deadline and the seconds left until it, on the Trio clock."""
        return [ctx.deadline, ctx.time_remaining()]

    @tool
    async def optimize(self, ctx: SessionContext, seconds: float) -> list[Any]:
        """Hold ``counter``'s optimization lock for ``seconds``, writing through it (async)."""
        async with ctx.aoptimizing("counter", optimizer_id="opt-a") as opt:
            first = await opt.aset(10)
            await trio.sleep(seconds)
            second = await opt.aset(11)
        return [first.value, second.value]

    @tool
    def optimize_sync(self, ctx: SessionContext) -> Any:
        """Write ``counter`` through its optimization lock (sync); then ``history``."""
        with ctx.optimizing("counter", optimizer_id="opt-s") as opt:
            opt.set(7)
            with ctx.batch_updates() as batch:
                batch["counter"] = 8  # refused: only the holder's handle passes the lock
        return None

    @tool
    def history(self, ctx: SessionContext) -> list[Any]:
        """``counter``'s values, oldest first (sync, a round trip)."""
        return [entry.value for entry in ctx.variable_history("counter")]

    @tool
    def show_options(self) -> dict[str, Any]:
        """The options the adapter got."""
        return dict(self.options)

    @tool
    def session_log(self) -> list[Any]:
        """The session hooks this worker's adapter saw."""
        return [list(entry) for entry in self.sessions]

    @tool
    def fail(self, message: str) -> None:
        """Raise ValueError(message)."""
        raise ValueError(message)

    @tool
    def unencodable(self) -> Any:
        """Return what the wire cannot carry."""
        return object()

    @tool
    def sleep_wall(self, seconds: float) -> float:
        """Sleep in real time (a sync tool)."""
        time.sleep(seconds)
        return seconds


class AsyncSetup(Adapter):
    """``setup()`` may be ``async def``: it runs on the Trio clock here."""

    async def setup(self) -> None:
        started = trio.current_time()
        await trio.sleep(30)  # within the startup_timeout (60 s)
        self.took = trio.current_time() - started

    @tool
    def setup_took(self) -> float:
        return self.took


class BrokenSetup(Adapter):
    def setup(self) -> None:
        raise RuntimeError("no model file")

    @tool
    def never(self) -> None: ...


class NotAnAdapter:
    pass
