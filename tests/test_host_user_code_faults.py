"""User code the host runs misbehaving -- host tools, the values they return and raise, the
values callers pass -- fails only what it was part of: the caller gets a clear error, the pool
serves on and its state is unchanged. Workers in threads (``open_pool_in_threads``)."""

from __future__ import annotations

import sys
import threading
from typing import Annotated

import pytest
import trio
from pydantic import AfterValidator

from tests.helpers import wait_for
from tests.host_fault_adapters import StrFails
from trio_bridge import EncodeError, InvalidArgumentError, InvalidVariableError, Lifecycle, LocalWorkers, ToolError
from trio_bridge.testing import open_pool_in_threads

CALLER = "tests.host_fault_adapters:HostCaller"


class BaseIterList(list):
    """A list whose ``__iter__`` raises a bare BaseException (as a library's own may)."""

    def __iter__(self):
        raise BaseException("iter broke")


class StrRaises(str):
    def __str__(self) -> str:
        raise RuntimeError("str broke")


async def test_a_host_tool_value_whose_encoding_raises_a_base_exception_fails_only_its_call():
    """The codec turned an Exception raised in a value's methods into an EncodeError, but a
    BaseException escaped the host service and failed the whole pool (PoolInternalError)."""
    async with open_pool_in_threads(CALLER, size=1) as pool:
        @pool.host_tool
        def host_result() -> object:
            return BaseIterList([1])

        @pool.host_tool
        async def host_chunk():
            yield 1
            yield BaseIterList([2])

        with trio.fail_after(10):
            with pytest.raises(EncodeError, match="result: cannot be encoded: BaseException: iter broke"):
                await pool.execute("call_host_tool", {"name": "host_result"})
            got = await pool.execute("host_chunks_and_error", {"name": "host_chunk"})
            assert got == {"chunks": [1], "error": "EncodeError"}
            # the caller's own argument: an EncodeError too, not the bare BaseException
            with pytest.raises(EncodeError, match="arguments"):
                await pool.execute("add", {"a": BaseIterList([1])})
            assert await pool.execute("add", {"a": 1}) == 3
        assert pool.statistics().restarts == 0


async def test_a_host_tool_error_whose_str_raises_reaches_the_worker_as_a_tool_error_naming_it():
    """An error whose own __str__ raised ended the host tool's RPC with 'Internal Server Error'
    (a BaseException there failed the pool): now a ToolError naming its type."""
    async with open_pool_in_threads(CALLER, size=1) as pool:
        @pool.host_tool
        def host_raise() -> None:
            raise StrFails()

        with trio.fail_after(10), pytest.raises(ToolError) as raised:
            await pool.execute("call_host_tool", {"name": "host_raise"})
        assert "raised StrFails: <exception str() failed>" in str(raised.value)
        assert await pool.execute("add", {"a": 1}) == 3


async def test_the_chunks_before_a_streaming_host_tools_unencodable_chunk_reach_the_worker_with_the_error():
    """Taken in one batch with the chunks before it, a chunk the codec refused ended the stream
    as if complete, with none of them and no error: their send was cancelled with the producer."""
    async with open_pool_in_threads(CALLER, size=1) as pool:
        @pool.host_tool
        async def host_chunks():
            for i in range(5):
                yield i
            yield object()

        for _ in range(20):
            with trio.fail_after(10):
                got = await pool.execute("host_chunks_and_error", {"name": "host_chunks"})
            assert got == {"chunks": [0, 1, 2, 3, 4], "error": "EncodeError"}


async def test_a_sync_generator_host_tools_cleanup_runs_in_a_thread_not_on_the_hosts_loop():
    """Its chunks came from a thread, but closing it (a worker that stops reading) ran its
    ``finally`` on the Trio loop, stalling the whole host for as long as it took."""
    closed_on: list[threading.Thread] = []

    async with open_pool_in_threads(CALLER, size=1) as pool:
        @pool.host_tool
        def host_chunks():
            try:
                yield from range(1000)
            finally:
                closed_on.append(threading.current_thread())

        with trio.fail_after(10):
            assert await pool.execute("take_host_chunks", {"name": "host_chunks", "n": 3}) == [0, 1, 2]
            await wait_for(lambda: closed_on)
        assert closed_on[0] is not threading.current_thread()
        assert await pool.execute("add", {"a": 1}) == 3


async def test_a_variable_value_whose_methods_raise_is_refused_as_invalid_and_the_others_are_written():
    """A value's own __str__ raising escaped the type check bare: set_variables(atomic=False)
    had written the variables before it without notifying anyone, and raised."""
    async with open_pool_in_threads(CALLER, size=1) as pool, pool.session() as session:
        await session.register_variable("a", "integer", 0)
        await session.register_variable("b", "string", "x")
        async with session.watch_variables(["a"], include_initial=False) as updates:
            with trio.fail_after(10):
                with pytest.raises(InvalidVariableError, match="could not be checked: RuntimeError"):
                    await session.set_variable("b", StrRaises("y"))
                with pytest.raises(InvalidVariableError):
                    await session.set_variables({"a": 1, "b": StrRaises("y")})
                assert await session.get_variables(["a", "b"]) == {"a": 0, "b": "x"}
                results = await session.set_variables({"a": 2, "b": StrRaises("y")}, atomic=False)
                assert isinstance(results["b"], InvalidVariableError) and results["a"].value == 2
                update = await updates.__anext__()
        assert (update.name, update.new_value) == ("a", 2)
        assert await session.get_variables(["a", "b"]) == {"a": 2, "b": "x"}


async def test_leaving_an_async_generator_tools_stream_early_frees_its_worker_without_a_recycle():
    """A caller leaving the stream (``break``, or its cancel scope) while the generator awaited
    something had its worker killed and restarted every time: closing the generator re-raised
    its task's CancelledError in the worker's cancelled handler, which then never freed the slot."""
    async with open_pool_in_threads("tests.adapters:Echo", size=1, lifecycle=Lifecycle(cancel_grace=600)) as pool:
        with trio.fail_after(30):  # (without the fix, the slot stays taken until the grace's kill)
            for stop in range(3):
                async with pool.stream("async_count", {"n": 1000, "delay": 0.001}) as chunks:
                    async for chunk in chunks:
                        if chunk["i"] == stop:
                            break
                with trio.move_on_after(0.05):
                    async with pool.stream("async_count", {"n": 1000, "delay": 0.001}) as chunks:
                        async for _ in chunks:
                            pass
                await wait_for(lambda: [w.in_flight for w in pool.workers()] == [0], timeout=25)
                assert await pool.execute("add", {"a": 1}) == 3
        assert pool.statistics().restarts == 0


async def test_a_slot_env_raising_a_base_exception_is_refused_as_an_invalid_option():
    def slot_env(slot: int) -> dict[str, str]:
        raise GeneratorExit("no environment")

    with trio.fail_after(10), pytest.raises(InvalidArgumentError, match=r"slot_env\(0\) raised GeneratorExit: no environment"):
        async with open_pool_in_threads(CALLER, size=1, local=LocalWorkers(slot_env=slot_env)):
            pytest.fail("the pool opened")


def _refuse(value: int) -> int:
    raise GeneratorExit("refused")


async def test_a_host_tools_argument_validator_raising_a_base_exception_refuses_the_arguments():
    """A user's pydantic validator raising a BaseException escaped the argument check: from a
    worker's call it failed the whole pool. Now the arguments are refused, as for an Exception."""
    async with open_pool_in_threads(CALLER, size=1) as pool:
        @pool.host_tool
        def host_checked(x: Annotated[int, AfterValidator(_refuse)]) -> int:
            return x

        with trio.fail_after(10):
            for call in (lambda: pool.execute("call_host_tool", {"name": "host_checked", "arguments": {"x": 1}}),
                         lambda: pool.call_host_tool("host_checked", {"x": 1})):
                with pytest.raises(InvalidArgumentError, match="argument 'x': could not be checked: GeneratorExit"):
                    await call()
            assert await pool.execute("add", {"a": 1}) == 3


class ItemsRaise(dict):
    def items(self):
        raise RuntimeError("items broke")


async def test_an_idempotency_key_does_not_change_what_bad_arguments_give():
    """With a key, the arguments' canonical form was made before the codec saw them: a value's
    own __iter__ or items() raising, or nesting too deep, escaped bare instead of the EncodeError
    (or the result) the same call gives without a key."""
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    async with open_pool_in_threads("tests.adapters:Echo", size=1) as pool:
        with trio.fail_after(10):
            for value in (BaseIterList([1]), deep):
                for key in (None, "bad-arguments"):
                    with pytest.raises(EncodeError, match="arguments"):
                        await pool.execute("echo", {"value": value}, idempotency_key=key)
            for key in (None, "items"):
                assert await pool.execute("echo", ItemsRaise(value=1), idempotency_key=key) == 1


_EXITING_HOST = """
import sys, trio, trio_bridge

async def main():
    async with trio_bridge.open_pool("tests.host_fault_adapters:HostCaller", size=1) as pool:
        @pool.host_tool
        def host_exit() -> None:
            raise SystemExit(3)

        await pool.execute("call_host_tool", {"name": "host_exit"})

trio.run(main)
"""


@pytest.mark.real_process
async def test_a_host_tools_sys_exit_stops_the_program_as_itself():
    """SystemExit stops the program it runs in (as in a worker): from a host tool, that is the
    host's, so it leaves open_pool as itself, as KeyboardInterrupt does (it was a
    PoolInternalError, so the program exited 1 with a traceback instead of the code given). A
    program of its own: the pool it stops is torn down as a program's is, workers and all."""
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-c", _EXITING_HOST], capture_stderr=True, check=False)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    assert b"PoolInternalError" not in done.stderr


async def test_a_joined_session_block_ending_gives_the_block_still_open_its_settings_back():
    """The latest block's weight and max_in_flight apply; once it ended, the session kept them
    (and lost its route), though the block that had it open first still ran: its
    max_in_flight=1 let three calls run at once."""
    async with open_pool_in_threads("tests.adapters:Echo", size=3) as pool:
        async with pool.session("shared", weight=2, max_in_flight=1) as outer:
            async with pool.session("shared"):
                assert pool.statistics().sessions["shared"].max_in_flight is None
            figures = pool.statistics().sessions["shared"]
            assert (figures.weight, figures.max_in_flight) == (2.0, 1)
            peak = 0

            async def call() -> None:
                nonlocal peak
                await outer.execute("async_sleep", {"seconds": 0.1})
                peak = max(peak, pool.statistics().sessions["shared"].in_flight)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(call)
            assert peak == 1
        assert "shared" not in pool.statistics().sessions
