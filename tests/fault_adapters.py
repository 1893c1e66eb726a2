"""Adapters whose user code misbehaves on the worker side (tests/test_user_code_faults.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, field_validator

from tests.adapters import RAISED as RAISED_BY_TOOLS
from tests.adapters import LibraryStop as Boom
from trio_bridge.worker import Adapter, SessionContext, tool

#: what user code here raises, by name: an Exception, and some of what tests/adapters.py's
#: ``raise_*`` tools raise (``Boom``: a library's own BaseException)
RAISED = {"Exception": lambda: ValueError("bad"), **{name: RAISED_BY_TOOLS[name] for name in ("StopIteration", "GeneratorExit")},
          "BaseException": lambda: Boom("boom")}


def _list(name: str) -> list:
    class Broken(list):
        def __iter__(self):
            raise RAISED[name]()
    return Broken([object()])


def _dict(name: str) -> dict:
    class Broken(dict):
        def items(self):
            raise RAISED[name]()

        def keys(self):
            raise RAISED[name]()

        def __iter__(self):
            raise RAISED[name]()
    return Broken(a=object())


def _str(name: str) -> str:
    class Broken(str):
        def __str__(self):
            raise RAISED[name]()
    return Broken("x")


def _int(name: str) -> int:
    class Broken(int):
        def __int__(self):
            raise RAISED[name]()
    return Broken(1 << 60)


def _float(name: str) -> float:
    class Broken(float):
        def __float__(self):
            raise RAISED[name]()
    return Broken(1.5)


#: values whose own method that the codec calls raises RAISED[name], by kind
BROKEN_VALUES = {"list": _list, "dict": _dict, "str": _str, "int": _int, "float": _float}


class StrRaises(Exception):
    """An exception whose own ``__str__`` raises."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __str__(self):
        raise RAISED[self.name]()


def _refuse(value: int) -> int:
    raise RAISED[value]()


class Point(BaseModel):
    x: str

    @field_validator("x")
    @classmethod
    def _x(cls, value: str) -> str:
        raise RAISED[value]()


class ClosingFaults(Adapter):
    """Generators that raise as they are closed (their caller left, or cancelled)."""

    @tool
    def raises_when_closed(self, n: int):
        try:
            yield from range(n)
        finally:
            raise Boom("in finally")

    @tool
    async def async_raises_when_closed(self, n: int):
        try:
            for i in range(n):
                yield i
                await asyncio.sleep(0)
        finally:
            raise Boom("in finally")


class Faults(ClosingFaults):
    @tool
    def add(self, a: int) -> int:
        return a + 2

    # --- results and chunks the codec cannot walk
    @tool
    def result(self, kind: str, name: str) -> object:
        return {"r": BROKEN_VALUES[kind](name)}

    @tool
    async def async_result(self, kind: str, name: str) -> object:
        return BROKEN_VALUES[kind](name)

    @tool
    def chunks(self, kind: str, name: str):
        yield 1
        yield BROKEN_VALUES[kind](name)

    @tool
    async def async_chunks(self, kind: str, name: str):
        yield 1
        yield [BROKEN_VALUES[kind](name)]

    # --- an error that cannot say what it is
    @tool
    def str_raises(self, name: str) -> None:
        raise StrRaises(name)

    @tool
    async def async_str_raises(self, name: str) -> None:
        raise StrRaises(name)

    # --- argument checks that raise
    @tool
    def annotated(self, v: Annotated[str, AfterValidator(_refuse)]) -> str:
        return v

    @tool
    def model(self, p: Point) -> str:
        return p.x

    @tool
    def checked_chunks(self, v: Annotated[str, AfterValidator(_refuse)]):
        yield v

    # --- generators, well-behaved or that misbehave when closed
    @tool
    async def async_count(self, n: int, pause: float):
        for i in range(n):
            yield i
            if pause:
                await asyncio.sleep(pause)

    # --- generators that misbehave when closed
    @tool
    def yields_again(self, n: int):
        for i in range(n):
            try:
                yield i
            except GeneratorExit:
                yield -1

    @tool
    async def async_yields_again(self, n: int):
        for i in range(n):
            try:
                yield i
            except GeneratorExit:
                yield -1

    @tool
    async def async_goes_on_after_cancel(self, n: int):
        for i in range(n):
            try:
                yield i
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass


class Tasks(Adapter):
    """Tools that play with asyncio tasks."""

    @tool
    def add(self, a: int) -> int:
        return a + 2

    @tool
    async def cancel_itself(self) -> None:
        asyncio.current_task().cancel()
        await asyncio.sleep(0)

    @tool
    async def cancel_itself_in_chunks(self):
        yield 1
        asyncio.current_task().cancel()
        await asyncio.sleep(0)
        yield 2



class Process(ClosingFaults):
    """Tools that change their worker process's streams and signals."""

    @tool
    def add(self, a: int) -> int:
        return a + 2

    @tool
    def pid(self) -> int:
        return os.getpid()

    @tool
    def close_stream(self, fd: int) -> None:
        os.close(fd)

    @tool
    def drop_stream(self, name: str) -> None:
        setattr(sys, name, None)

    @tool
    def close_sys_stream(self, name: str) -> None:
        getattr(sys, name).close()

    @tool
    async def ignore_signal(self, name: str) -> None:  # (on the loop: the main thread)
        signal.signal(getattr(signal, name), signal.SIG_IGN)

    @tool
    def fail(self) -> None:
        raise ValueError("failed")


class _Odd:
    """A default value that cannot be encoded, whose own ``__repr__`` raises."""

    def __repr__(self) -> str:
        raise Boom("repr")


class OddDefault(Adapter):
    @tool
    def add(self, a: int, odd: object = _Odd()) -> int:
        return a + 2




class Watcher(Adapter):
    """A tool whose task, outliving its call, still reads the call's watch."""

    @tool
    def add(self, a: int) -> int:
        return a + 2

    @tool
    async def watch_in_a_task(self, ctx: SessionContext) -> int:
        first = asyncio.Event()

        async def read() -> None:
            async for _ in ctx.watch_variables(["v"]):
                first.set()  # (it goes on into the watch before this tool resumes)
        task = asyncio.get_running_loop().create_task(read())
        Watcher.tasks.add(task)
        task.add_done_callback(Watcher.tasks.discard)
        await first.wait()  # it has the initial value: it waits in the watch for the next update
        return 1

    tasks: ClassVar[set] = set()  # (kept: a task nobody refers to may be collected)


class Misuse(Adapter):
    @tool
    def add(self, a: int) -> int:
        return a + 2

    @tool
    def own_loop(self, ctx: SessionContext) -> object:
        return asyncio.run(ctx.acall_host_tool("double", x=2))

    @tool
    def own_loop_variable(self, ctx: SessionContext) -> object:
        return asyncio.run(ctx.aget_variable("v")).value
