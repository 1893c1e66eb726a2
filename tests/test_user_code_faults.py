"""User code misbehaving on the worker side -- a result whose own methods raise, an error that
cannot say what it is, an argument check or a default's repr that raises, a generator that raises
or yields again when it is closed, a tool that cancels its own task, leaves a task reading its
watch, or awaits the context in a loop of its own: each fails only its call (or the call ends as
asked), within a bound; the worker serves on and frees the call's slot."""

from __future__ import annotations

import pytest
import trio

import trio_bridge
from tests.fault_adapters import BROKEN_VALUES, RAISED, Boom
from tests.helpers import wait_for
from trio_bridge import EncodeError, InvalidArgumentError, Lifecycle, ToolError
from trio_bridge._wire.codec import encode
from trio_bridge.testing import open_pool_in_threads

FAULTS = "tests.fault_adapters:Faults"
TASKS = "tests.fault_adapters:Tasks"
PROCESS = "tests.fault_adapters:Process"
ODD_DEFAULT = "tests.fault_adapters:OddDefault"
WATCHER = "tests.fault_adapters:Watcher"
MISUSE = "tests.fault_adapters:Misuse"
#: a leaked slot shows as in_flight, not as the pool killing the worker (cancel_grace)
PATIENT = Lifecycle(cancel_grace=120)


async def _served_on(pool) -> None:
    """The worker serves on: its slots free, no restart, a later call runs."""
    await wait_for(lambda: [w.in_flight for w in pool.workers()] == [0])
    with trio.fail_after(10):
        assert await pool.execute("add", {"a": 1}) == 3
    assert pool.statistics().restarts == 0


def test_encoding_a_value_whose_own_method_raises_anything_is_an_encode_error():
    # a BaseException, StopIteration or GeneratorExit escaped encode() bare (the call hung)
    for value in BROKEN_VALUES.values():
        for name in RAISED:
            with pytest.raises(EncodeError, match=r'result\["r"\]: cannot be encoded: '):
                encode({"r": value(name)}, path="result")


def test_encoding_lets_what_stops_the_program_through():
    class Stop(list):
        def __iter__(self):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        encode([Stop([1])])


async def test_a_result_or_chunk_whose_own_method_raises_anything_fails_only_its_call():
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        for kind in BROKEN_VALUES:
            for name in RAISED:
                arguments = {"kind": kind, "name": name}
                for tool in ("result", "async_result"):
                    with trio.fail_after(10), pytest.raises(EncodeError, match=f"{tool!r}: result.*: cannot be encoded"):
                        await pool.execute(tool, arguments)
                for tool in ("chunks", "async_chunks"):
                    got = []
                    with trio.fail_after(10), pytest.raises(EncodeError, match=r"chunk\[1\].*: cannot be encoded"):
                        async with pool.stream(tool, arguments) as chunks:
                            async for chunk in chunks:
                                got.append(chunk)
                    assert got == [1]
        await _served_on(pool)


async def test_an_error_whose_str_raises_fails_its_call_naming_its_type():
    # str(exc) raising a BaseException hung the call; raising an Exception named that one instead
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        for tool in ("str_raises", "async_str_raises"):
            for name in RAISED:
                with trio.fail_after(10), pytest.raises(ToolError) as raised:
                    await pool.execute(tool, {"name": name})
                assert raised.value.remote_type == "StrRaises", raised.value
                assert raised.value.remote_message == "<exception str() failed>"
        await _served_on(pool)


async def test_an_argument_check_raising_anything_refuses_the_call():
    # a validator's BaseException or GeneratorExit escaped the check: the call hung
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        for name in RAISED:
            for tool, arguments in (("annotated", {"v": name}), ("model", {"p": {"x": name}})):
                with trio.fail_after(10), pytest.raises(InvalidArgumentError, match=f"tool {tool!r}: argument"):
                    await pool.execute(tool, arguments)
            with trio.fail_after(10), pytest.raises(InvalidArgumentError, match="tool 'checked_chunks': argument 'v'"):
                async with pool.stream("checked_chunks", {"v": name}) as chunks:
                    async for _ in chunks:
                        pass
        await _served_on(pool)


async def test_a_cancelled_async_generator_frees_its_slot_at_once():
    """Its stream's handler, cancelled, took the producer's end for its own cancel and left before
    freeing the slot: every async generator whose caller left or cancelled kept its slot until
    cancel_grace killed the worker."""
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        for pause in (0.01, 0):  # awaiting between chunks, or never
            async with pool.stream("async_count", {"n": 10**8, "pause": pause}) as chunks:
                async for chunk in chunks:
                    if chunk == 2:
                        break
            await _served_on(pool)
            with trio.move_on_after(0.3):
                async with pool.stream("async_count", {"n": 10**8, "pause": pause}) as chunks:
                    async for _ in chunks:
                        pass
            await _served_on(pool)


_CLOSE_FAULTS = [
    "yields_again", "async_yields_again", "raises_when_closed", "async_raises_when_closed", "async_goes_on_after_cancel",
]


@pytest.mark.parametrize("tool", _CLOSE_FAULTS)
async def test_a_generator_misbehaving_as_it_is_closed_still_frees_its_slot(tool, capfd):
    """A generator that yields again or raises when its caller leaves (or cancels) is stopped and
    its slot freed (the call's slot stayed taken until cancel_grace killed the worker); what it
    raised goes to stderr, as asyncio reports an async generator's."""
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        async with pool.stream(tool, {"n": 10**6}) as chunks:  # the caller leaves early
            async for chunk in chunks:
                if chunk == 2:
                    break
        await _served_on(pool)
        with trio.move_on_after(0.5) as scope:  # the caller's cancel
            async with pool.stream(tool, {"n": 10**6}) as chunks:
                async for _ in chunks:
                    await trio.sleep(0.01)
        assert scope.cancelled_caught
        await _served_on(pool)
    if tool != "async_goes_on_after_cancel":
        assert "a streaming tool's generator raised as it was closed" in capfd.readouterr().err


async def test_a_generator_raising_a_base_exception_as_it_ends_fails_its_call():
    async with open_pool_in_threads(FAULTS, size=1, lifecycle=PATIENT) as pool:
        for tool in ("raises_when_closed", "async_raises_when_closed"):
            got = []
            with trio.fail_after(10), pytest.raises(ToolError) as raised:
                async with pool.stream(tool, {"n": 3}) as chunks:
                    async for chunk in chunks:
                        got.append(chunk)
            assert got == [0, 1, 2]
            assert raised.value.remote_type == Boom.__name__
        await _served_on(pool)


async def test_a_tool_cancelling_its_own_task_fails_its_call():
    """A CancelledError that no cancel of the call caused is the tool's failure (the rule of
    test_calls.py): a tool cancelling its own task -- a home-made timeout, say -- hung its call,
    the call stream (or the stream's producer) taking it for the host's cancel."""
    async with open_pool_in_threads(TASKS, size=1, lifecycle=PATIENT) as pool:
        with trio.fail_after(10), pytest.raises(ToolError) as raised:
            await pool.execute("cancel_itself")
        assert raised.value.remote_type == "CancelledError"
        got = []
        with trio.fail_after(10), pytest.raises(ToolError) as raised:
            async with pool.stream("cancel_itself_in_chunks") as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert got == [1]
        assert raised.value.remote_type == "CancelledError"
        await _served_on(pool)


@pytest.mark.real_process
@pytest.mark.parametrize("closes", [("close_stream", {"fd": 2}), ("close_sys_stream", {"name": "stderr"})])
async def test_a_generator_raising_as_it_is_closed_after_its_tool_closed_stderr_still_frees_its_slot(closes):
    # the report of what it raised failed on the closed stream, and that failure kept the slot
    async with trio_bridge.open_pool(PROCESS, size=1, lifecycle=PATIENT) as pool:
        pid = await pool.execute("pid")
        await pool.execute(*closes)
        for tool in ("raises_when_closed", "async_raises_when_closed"):
            with trio.fail_after(20):
                async with pool.stream(tool, {"n": 10**6}) as chunks:
                    async for chunk in chunks:
                        if chunk == 2:
                            break
            await _served_on(pool)
        assert await pool.execute("pid") == pid


async def test_a_default_whose_repr_raises_is_described_by_its_type():
    # the worker's Describe failed with it (a BaseException: no answer until the startup timeout)
    with trio.fail_after(30):
        async with open_pool_in_threads(ODD_DEFAULT, size=1, lifecycle=Lifecycle(startup_timeout=60)) as pool:
            assert await pool.execute("add", {"a": 1}) == 3
            (add,) = [t for t in pool.tools() if t.name == "add"]
            (parameter,) = [p for p in add.parameters if p.name == "odd"]
            assert parameter.default == "<_Odd object>"


async def test_a_watch_that_a_task_of_the_tool_still_reads_as_its_call_ends_leaves_the_call_alone():
    """Closing the call's watches raised (aclose() of a generator another task runs): the call
    failed although its tool had returned, and the worker never freed its slot (Ping listed the
    call, a drain waited its whole grace). The watch is left to the task; it ends with the session."""
    async with open_pool_in_threads(WATCHER, size=1, lifecycle=PATIENT) as pool:
        async with pool.session() as session:
            await session.register_variable("v", "integer", 1)
            with trio.fail_after(10):
                assert await session.execute("watch_in_a_task") == 1
            await session.set_variable("v", 2)
            with trio.fail_after(10):
                assert await session.execute("add", {"a": 1}) == 3
        await _served_on(pool)


async def test_a_host_tools_result_whose_own_method_raises_anything_fails_only_the_call_of_it():
    # the codec let the BaseException out on the host too: it failed the whole pool (PoolInternalError)
    def broken_host() -> object:
        return BROKEN_VALUES["list"]("BaseException")

    async with open_pool_in_threads("tests.adapters:Echo", size=1) as pool:
        pool.host_tool(broken_host)
        with trio.fail_after(10), pytest.raises(EncodeError, match=f"tool 'broken_host': result: cannot be encoded: {Boom.__name__}"):
            await pool.execute("call_host_tool", {"name": "broken_host"})
        assert await pool.execute("add", {"a": 1}) == 3


async def test_an_awaitable_context_method_run_in_another_event_loop_is_a_clear_error():
    # asyncio.run(ctx.acall_host_tool(...)) in a sync tool's thread waited forever (the channel
    # belongs to the worker's loop); the call's slot stayed taken until cancel_grace killed it
    def double(x: int) -> int:
        return 2 * x

    async with open_pool_in_threads(MISUSE, size=1, lifecycle=PATIENT) as pool:
        pool.host_tool(double)
        async with pool.session() as session:
            await session.register_variable("v", "integer", 1)
            for tool in ("own_loop", "own_loop_variable"):
                with trio.fail_after(10), pytest.raises(ToolError, match="awaitable methods run on the worker's event loop"):
                    await session.execute(tool)
        await _served_on(pool)
