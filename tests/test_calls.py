"""Calls, errors, streams and cancellation through a pool, against the real worker side and the
real wire, with workers in threads (``trio_bridge.testing.open_pool_in_threads``); what needs
worker processes is in ``test_pool.py``."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import trio

from tests.adapters import RAISED, LibraryStop
from tests.helpers import marks, wait_for
from trio_bridge import (
    EncodeError,
    InvalidArgumentError,
    Lifecycle,
    LocalWorkers,
    ToolError,
    ToolNotFoundError,
    WorkerStartError,
)
from trio_bridge._host._calls import Calls
from trio_bridge._wire.contract import timeout_to_wire
from trio_bridge.testing import open_pool_in_threads

ECHO = "tests.adapters:Echo"


async def test_execute_round_trips_values_including_arrays():
    value = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "nested": [b"\x00raw", {"n": 2**70}], "f": float("-inf")}
    async with open_pool_in_threads(ECHO, size=1) as pool:
        assert await pool.execute("add", {"a": 40}) == 42
        result = await pool.execute("echo", {"value": value})
    assert result["x"].dtype == np.float32 and result["x"].shape == (3, 4)
    assert np.array_equal(result["x"], value["x"])
    assert result["nested"] == [b"\x00raw", {"n": 2**70}] and result["f"] == float("-inf")


async def test_each_kind_of_bad_call_has_its_own_clear_error():
    async with open_pool_in_threads(ECHO, size=1) as pool:
        with pytest.raises(ToolNotFoundError) as not_found:
            await pool.execute("nope")
        assert "add" in not_found.value.available and "echo" in str(not_found.value)
        with pytest.raises(InvalidArgumentError, match="missing required argument"):
            await pool.execute("add", {})
        with pytest.raises(InvalidArgumentError, match="unknown argument"):
            await pool.execute("add", {"a": 1, "bogus": 2})
        with pytest.raises(ToolError) as raised:
            await pool.execute("fail", {"message": "boom"})
        assert raised.value.remote_type == "ValueError" and raised.value.remote_message == "boom"
        assert "in fail" in raised.value.remote_traceback and "raise ValueError(message)" in raised.value.remote_traceback
        with pytest.raises(EncodeError, match=r'result\["items"\]\[3\]: object of type Unencodable'):
            await pool.execute("unencodable")
        with pytest.raises(EncodeError, match=r'arguments\["value"\]: object of type object'):
            await pool.execute("echo", {"value": object()})
        with pytest.raises(InvalidArgumentError, match="is a streaming tool"):
            await pool.execute("count", {"n": 1})
        # none of that hurt the worker
        assert pool.statistics().restarts == 0
        assert await pool.execute("add", {"a": 1}) == 3


async def test_stream_yields_chunks_in_order_then_ends():
    async with open_pool_in_threads(ECHO, size=1) as pool:
        async with pool.stream("count", {"n": 1000}) as chunks:
            assert [c async for c in chunks] == list(range(1000))
        async with pool.stream("async_count", {"n": 3}) as chunks:
            assert [c async for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_stream_error_arrives_after_the_chunks_before_it():
    async with open_pool_in_threads(ECHO, size=1) as pool:
        got = []
        with pytest.raises(ToolError, match="broke after 5"):
            async with pool.stream("fail_midway", {"n": 5}) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert got == [0, 1, 2, 3, 4]


async def test_an_async_generators_error_right_after_its_chunks_still_ends_the_stream():
    # its chunks and its end come in one batch: the error is raised by the next one (this hung)
    async with open_pool_in_threads(ECHO, size=1) as pool:
        for n in (1, 5, 300):
            got = []
            with trio.fail_after(10), pytest.raises(ToolError, match=f"broke after {n}"):
                async with pool.stream("async_fail_midway", {"n": n}) as chunks:
                    async for chunk in chunks:
                        got.append(chunk)
            assert got == list(range(n))


#: tools of each kind that raise RAISED[name]: whether each streams
_RAISING_TOOLS = {
    "raise_sync": False, "raise_inline": False, "raise_async": False, "raise_generator": True,
    "raise_async_generator": True,
}


async def _raised_by(pool, tool: str, name: str) -> ToolError:
    with trio.fail_after(10), pytest.raises(ToolError) as raised:
        if _RAISING_TOOLS[tool]:
            async with pool.stream(tool, {"name": name}) as chunks:
                async for chunk in chunks:
                    assert chunk == 1
        else:
            await pool.execute(tool, {"name": name})
    return raised.value


async def test_a_tool_raising_any_exception_fails_only_its_call_in_every_kind_of_tool():
    """StopIteration, GeneratorExit, a bare or a library's own BaseException, a CancelledError
    that is no cancel of the call and exception groups fail the call with a ToolError naming
    them, as an Exception does (they hung the call: a sync tool's StopIteration cannot cross
    asyncio.wrap_future, the rest escaped `except Exception`). The worker serves on, its slot free."""
    async with open_pool_in_threads(ECHO, size=1) as pool:
        for tool in _RAISING_TOOLS:
            for name in RAISED:
                error = await _raised_by(pool, tool, name)
                # Python itself turns a StopIteration leaving a coroutine or a generator into a RuntimeError
                converted = name == "StopIteration" and tool not in ("raise_sync", "raise_inline")
                assert error.remote_type == ("RuntimeError" if converted else name), (tool, name, error)
        assert await pool.execute("add", {"a": 1}) == 3
        assert pool.statistics().restarts == 0
        assert [w.in_flight for w in pool.workers()] == [0]


async def test_a_host_tool_raising_any_exception_fails_only_the_call_of_it():
    """The same for host tools: a BaseException there failed the whole pool (PoolInternalError)."""
    def host_raise() -> None:
        raise LibraryStop("library")

    async def async_host_raise() -> None:
        raise GeneratorExit("exit")

    def host_stream_raise():
        yield 1
        raise BaseException("base")

    async with open_pool_in_threads(ECHO, size=1) as pool:
        for function in (host_raise, async_host_raise, host_stream_raise):
            pool.host_tool(function)
        for tool, host_tool, name in [
            ("call_host_tool", "host_raise", "LibraryStop"), ("call_host_tool", "async_host_raise", "GeneratorExit"),
            ("stream_host_tool", "host_stream_raise", "BaseException"),
        ]:
            with trio.fail_after(10), pytest.raises(ToolError) as raised:
                await pool.execute(tool, {"name": host_tool})
            assert raised.value.remote_type == name, raised.value
        assert await pool.execute("add", {"a": 1}) == 3


async def test_a_chunk_the_codec_refuses_ends_the_stream_after_the_chunks_before_it_naming_it():
    async with open_pool_in_threads(ECHO, size=1) as pool:
        got = []
        with pytest.raises(EncodeError, match=r"chunk\[300\]: object of type Unencodable"):
            async with pool.stream("unencodable_after", {"n": 300}) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert got == list(range(300))


async def test_leaving_a_stream_early_stops_the_generator(marker_dir):
    async with open_pool_in_threads(ECHO, size=1) as pool:
        async with pool.stream("count", {"n": 10_000_000, "delay": 0.001}) as chunks:
            async for chunk in chunks:
                if chunk == 20:
                    break
        await wait_for(lambda: marks(marker_dir, "count"))
        stopped_at = int(marks(marker_dir, "count")[0])
        assert 20 < stopped_at < 5000  # its finally ran: it was closed at a yield, not run to the end
        assert await pool.execute("add", {"a": 1}) == 3


async def test_cancel_scope_around_a_stream_stops_the_generator(marker_dir):
    async with open_pool_in_threads(ECHO, size=1) as pool:
        worker = pool.workers()[0].id
        received = 0
        with trio.move_on_after(0.5) as scope:
            async with pool.stream("count", {"n": 10_000_000, "delay": 0.001}) as chunks:
                async for _ in chunks:
                    received += 1
        assert scope.cancelled_caught and received > 0
        await wait_for(lambda: marks(marker_dir, "count"))
        stopped_at = int(marks(marker_dir, "count")[0])
        await trio.sleep(0.2)
        assert int(marks(marker_dir, "count")[0]) == stopped_at < 5000  # no more side effects
        assert await pool.execute("add", {"a": 1}) == 3
        assert [w.id for w in pool.workers()] == [worker]  # the same worker serves the next call


async def test_slow_consumer_pauses_the_generator():
    # concurrency 2: the stream holds one slot, produced_so_far uses the other on the same worker
    async with open_pool_in_threads(ECHO, size=1, concurrency=2) as pool:
        async with pool.stream("count", {"n": 1_000_000}) as chunks:
            consumed = 0
            async for _ in chunks:
                consumed += 1
                if consumed % 100 == 0:
                    await trio.sleep(0.01)
                if consumed == 2000:
                    break
            await trio.sleep(0.3)  # time for a generator without backpressure to run far ahead
            produced = await pool.execute("produced_so_far")
        assert produced - consumed < 50_000, (produced, consumed)


async def test_cancelling_a_sync_tool_sets_ctx_cancelled_and_frees_the_worker(marker_dir):
    async with open_pool_in_threads(ECHO, size=1) as pool:
        worker = pool.workers()[0].id
        with trio.move_on_after(0.3) as scope:
            await pool.execute("cooperative_sleep", {"seconds": 60})
        assert scope.cancelled_caught
        await wait_for(lambda: marks(marker_dir, "cooperative_sleep"))
        assert marks(marker_dir, "cooperative_sleep") == ["cancelled"]
        assert await pool.execute("add", {"a": 1}) == 3
        assert [w.id for w in pool.workers()] == [worker]  # same worker, serving again
        assert pool.statistics().calls_cancelled == 1


async def test_cancelling_an_async_tool_cancels_it_in_the_worker(marker_dir):
    async with open_pool_in_threads(ECHO, size=1) as pool:
        with trio.move_on_after(0.3):
            await pool.execute("async_sleep", {"seconds": 60})
        await wait_for(lambda: marks(marker_dir, "async_sleep"))
        assert marks(marker_dir, "async_sleep") == ["cancelled"]
        assert await pool.execute("add", {"a": 1}) == 3


async def test_calls_in_flight_together_on_one_worker_each_get_their_own_answer_and_cancel_alone(marker_dir):
    # They share the worker's one call stream: replies come back in the order calls finish.
    async with open_pool_in_threads(ECHO, size=1, concurrency=16) as pool:
        results: dict[int, float] = {}

        async def call(i: int) -> None:
            results[i] = await pool.execute("async_sleep", {"seconds": (15 - i) * 0.01})

        async with trio.open_nursery() as nursery:
            for i in range(15):
                nursery.start_soon(call, i)
            with trio.move_on_after(0.05) as scope:
                await pool.execute("async_sleep", {"seconds": 60})
        assert scope.cancelled_caught
        assert results == {i: (15 - i) * 0.01 for i in range(15)}
        await wait_for(lambda: marks(marker_dir, "async_sleep"))
        assert marks(marker_dir, "async_sleep") == ["cancelled"]  # only the cancelled call
        assert pool.statistics().calls_cancelled == 1


async def test_deadline_of_the_callers_cancel_scope_reaches_the_worker():
    async with open_pool_in_threads(ECHO, size=1) as pool:
        with trio.fail_after(5):
            remaining = await pool.execute("echo", {"value": trio.current_effective_deadline() - trio.current_time()})
        assert 4 < remaining <= 5


async def test_a_call_made_in_an_already_cancelled_scope_carries_a_passed_deadline_not_none():
    # Trio says -inf for the deadline of a cancelled scope: on the wire it must not read as "none".
    calls = Calls(
        supervisor=SimpleNamespace(closing=False), router=None, metrics=None, state=None,  # type: ignore[arg-type]
        plane=None, lifecycle=Lifecycle(cancel_grace=5, no_worker_timeout=5),
    )
    with trio.CancelScope() as scope:
        scope.cancel()
        request = await calls._request("echo", {}, None)  # no checkpoint: a call this early reaches the worker
    assert request.timeout_seconds == timeout_to_wire(0.0) > 0
    with trio.CancelScope(deadline=trio.current_time() + 5):
        assert 4 < (await calls._request("echo", {}, None)).timeout_seconds <= 5
    assert (await calls._request("echo", {}, None)).timeout_seconds == 0  # no deadline


async def test_an_inline_tool_runs_on_the_workers_loop_and_a_plain_sync_tool_in_a_thread():
    async with open_pool_in_threads(ECHO, size=1, concurrency=2) as pool:
        inline = await pool.execute("where_inline", {"x": 7})
        threaded = await pool.execute("where", {"x": 8})
        # The refusal names the cause: a blocking SessionContext method would deadlock the loop.
        with pytest.raises(ToolError, match="inline") as refused:
            await pool.execute("ask_host_inline")
    assert inline["x"] == 7 and inline["on_loop"] and inline["thread"].startswith("trio-bridge worker")
    assert threaded["x"] == 8 and not threaded["on_loop"] and threaded["thread"].startswith("tool")
    assert refused.value.remote_type == "RuntimeError"


async def test_tcp_transport_and_statistics():
    async with open_pool_in_threads(ECHO, size=2, transport="tcp") as pool:
        assert all(w.address.startswith("tcp:127.0.0.1:") for w in pool.workers())
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(pool.execute, "add", {"a": i})
        stats = pool.statistics()
        assert stats.calls_completed == 20 and stats.in_flight == 0 and stats.queued == 0
        assert 0 < stats.latency_p50 <= stats.latency_p90 <= stats.latency_p99
        assert sum(w.calls_served for w in pool.workers()) == 20
        assert all(w.calls_served > 0 for w in pool.workers())  # the burst was spread over both


async def test_tcp_pools_send_large_arrays_in_band():
    big = np.ones(300_000)
    async with open_pool_in_threads(ECHO, size=1, transport="tcp") as pool:
        assert pool._plane is None
        assert np.array_equal(await pool.execute("echo", {"value": big}), big)


async def test_a_thread_worker_the_pool_recycles_is_replaced_and_options_threads_lack_are_refused():
    # A sync tool that ignores cancellation past cancel_grace gets its worker recycled: the
    # thread worker's server is cancelled (exit code -9, as SIGKILL), and a new one starts.
    async with open_pool_in_threads(ECHO, size=1, lifecycle=Lifecycle(cancel_grace=0.1, restart_backoff=(0.01, 0.01))) as pool:
        first = pool.workers()[0].id
        with trio.move_on_after(0.2):
            await pool.execute("sleep", {"seconds": 1})
        await wait_for(lambda: [w.id for w in pool.workers() if w.state == "ready"] not in ([], [first]))
        assert await pool.execute("add", {"a": 1}) == 3
        assert pool.statistics().calls_cancelled == 1
    for option in ({"local": LocalWorkers(python="python3")}, {"local": LocalWorkers(shared_memory_threshold=1024)}):
        with pytest.raises(InvalidArgumentError, match="workers in threads take no"):
            open_pool_in_threads(ECHO, **option)


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("trio-bridge worker ")]


async def test_thread_workers_end_with_their_pool_and_one_that_fails_to_start_says_why():
    async with open_pool_in_threads(ECHO, size=2) as pool:
        assert [w.pid for w in pool.workers()] == [os.getpid()] * 2
        assert len(worker_threads()) == 2
    assert worker_threads() == []
    with pytest.raises(WorkerStartError, match="exited before it was ready") as info:
        async with open_pool_in_threads("tests.adapters:BrokenSetup", size=1):
            pass
    assert info.value.exit_code == 4  # EXIT_ADAPTER_SETUP
    assert worker_threads() == []


async def test_a_sync_tool_that_outlives_its_closed_worker_thread_ends_quietly(caplog):
    """A worker in a thread stops without waiting for a sync tool still running (a thread cannot
    be killed); when the tool returns, freeing its slot on the closed loop is a no-op, not an
    "exception calling callback" traceback."""
    lifecycle = Lifecycle(shutdown_timeout=0.1)
    before = set(threading.enumerate())
    async with open_pool_in_threads(ECHO, size=1, lifecycle=lifecycle) as pool:
        with trio.move_on_after(0.3):
            await pool.execute("sleep", {"seconds": 2.0})
    tool_threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("tool")]
    assert any(t.is_alive() for t in tool_threads)  # the tool outlived its worker
    with trio.fail_after(10):
        while any(t.is_alive() for t in tool_threads):
            await trio.sleep(0.05)
    assert "exception calling callback" not in caplog.text
    assert "Event loop is closed" not in caplog.text
