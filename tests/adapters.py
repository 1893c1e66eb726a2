"""Adapters used by the real-process tests."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

from trio_bridge.worker import Adapter, SessionContext, tool


class Unencodable:
    pass


class LibraryStop(BaseException):
    """A library's own ``BaseException`` (as pytest's ``Failed`` and ``Skipped`` are)."""


#: what the ``raise_*`` tools raise, by name
RAISED = {
    "StopIteration": lambda: StopIteration("stop"),
    "GeneratorExit": lambda: GeneratorExit("exit"),
    "BaseException": lambda: BaseException("base"),
    "LibraryStop": lambda: LibraryStop("library"),
    "CancelledError": lambda: asyncio.CancelledError("not a cancel of the call"),
    "BaseExceptionGroup": lambda: BaseExceptionGroup("group", [BaseException("in a group")]),
}


class Echo(Adapter):
    def setup(self) -> None:
        self.produced = 0
        self.stopped_at: int | None = None
        self.marker_dir = os.environ.get("TEST_MARKER_DIR", "")

    @tool(description="Return the arguments as given")
    def echo(self, value: object = None) -> object:
        return value

    @tool
    def add(self, a: int, b: int = 2) -> int:
        """Add two integers.

        Args:
            a: the first term.
            b: the second term.
        """
        return a + b

    @tool
    def pid(self) -> int:
        return os.getpid()

    @tool
    def environment(self, name: str) -> str | None:
        return os.environ.get(name)

    @tool
    def leak(self, mib: int) -> int:
        """Keep ``mib`` MiB more (touched, so resident) for good, as a leaking tool does; the pid."""
        self.__dict__.setdefault("leaked", []).append(b"\x01" * (mib << 20))
        return os.getpid()

    @tool
    def fail(self, message: str) -> None:
        raise ValueError(message)

    @tool
    def unencodable(self) -> dict:
        return {"items": [1, 2, 3, Unencodable()]}

    @tool
    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @tool
    def cooperative_sleep(self, seconds: float, ctx: SessionContext) -> bool:
        """Sleep in a thread, returning early when the call is cancelled."""
        cancelled = ctx.wait_cancelled(seconds)
        self._mark("cooperative_sleep", "cancelled" if cancelled else "finished")
        return cancelled

    @tool
    async def async_sleep(self, seconds: float) -> float:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._mark("async_sleep", "cancelled")
            raise
        return seconds

    @tool
    def count(self, n: int, delay: float = 0.0):
        """Yield 0 .. n-1, recording how far it got."""
        self.produced = 0
        try:
            for i in range(n):
                if delay:
                    time.sleep(delay)
                self.produced = i + 1
                yield i
        finally:
            self._mark("count", str(self.produced))

    @tool
    def echo_chunks(self, value: object, times: int):
        for _ in range(times):
            yield value

    @tool
    def unencodable_after(self, n: int):
        """n chunks, then one the codec refuses (all ready at once: one message)."""
        yield from range(n)
        yield Unencodable()

    @tool
    def produced_so_far(self) -> int:
        return self.produced

    @tool
    async def async_count(self, n: int, delay: float = 0.0):
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            yield {"i": i}

    @tool
    def fail_midway(self, n: int):
        yield from range(n)
        raise RuntimeError(f"broke after {n}")

    @tool
    async def async_fail_midway(self, n: int):
        for i in range(n):
            yield i
        raise RuntimeError(f"broke after {n}")

    @tool
    def raise_sync(self, name: str) -> None:
        raise RAISED[name]()

    @tool(inline=True)
    def raise_inline(self, name: str) -> None:
        raise RAISED[name]()

    @tool
    async def raise_async(self, name: str) -> None:
        raise RAISED[name]()

    @tool
    def raise_generator(self, name: str):
        yield 1
        raise RAISED[name]()

    @tool
    async def raise_async_generator(self, name: str):
        yield 1
        raise RAISED[name]()

    @tool
    def call_host_tool(self, ctx: SessionContext, name: str) -> object:
        return ctx.call_host_tool(name)

    @tool
    def stream_host_tool(self, ctx: SessionContext, name: str) -> list:
        return list(ctx.stream_host_tool(name))

    @tool
    def where(self, x: int) -> dict:
        """Where a sync tool runs: ``x``, the thread's name, and whether it is the worker's loop's."""
        return _where(x)

    @tool(inline=True)
    def where_inline(self, x: int) -> dict:
        """The same, as an inline tool."""
        return _where(x)

    @tool(inline=True)
    def ask_host_inline(self, ctx: SessionContext) -> object:
        return ctx.call_host_tool("anything")

    @tool
    async def block_loop(self, seconds: float) -> None:
        """Misbehave: block the worker's event loop (it cannot answer health checks)."""
        time.sleep(seconds)

    @tool
    def exit_now(self, code: int) -> None:
        os._exit(code)

    @tool
    def sys_exit(self, code: int, grouped: bool = False) -> None:
        if grouped:  # (as a Trio nursery in the tool would raise it)
            raise BaseExceptionGroup("grouped", [SystemExit(code)])
        sys.exit(code)

    @tool
    async def async_sys_exit(self, code: int, grouped: bool = False) -> None:
        if grouped:
            raise BaseExceptionGroup("grouped", [SystemExit(code)])
        sys.exit(code)

    @tool
    def hold_gil(self, seconds: float) -> int:
        """Misbehave: one long C call that never releases the GIL (no other thread runs)."""
        import math
        import re

        # Catastrophic backtracking: one C call, ~1.7 s for 24 letters here, doubling per letter.
        letters = 24 + max(0, math.ceil(math.log2(max(seconds, 1.0) / 1.5)))
        return int(re.match(r"(a+)+$", "a" * letters + "b") is None)

    @tool
    def spawn_sleeper(self) -> int:
        """Start a child process that would outlive everything if nobody stopped it."""
        import subprocess

        return subprocess.Popen(["sleep", "1000"]).pid

    def _mark(self, name: str, text: str) -> None:
        if self.marker_dir:
            path = os.path.join(self.marker_dir, f"{name}.{os.getpid()}")
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)  # readers never see a half-written mark


def _where(x: int) -> dict:
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    return {"x": x, "thread": threading.current_thread().name, "on_loop": on_loop}


class SlowSetup(Adapter):
    def setup(self) -> None:
        time.sleep(60)


class BrokenSetup(Adapter):
    def setup(self) -> None:
        raise RuntimeError("the model file is missing")


class StopInSetup(Adapter):
    def setup(self) -> None:
        next(iter(()))  # a StopIteration: setup's failure


class Pid(Adapter):
    @tool
    def pid_after(self, seconds: float) -> int:
        """Sleep ``seconds``, then return the worker's pid (which process served a call)."""
        time.sleep(seconds)
        return os.getpid()
