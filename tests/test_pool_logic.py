"""Pool logic against in-memory fake workers on Trio's autojump clock (``trio_bridge.testing``):
restarts and backoff, start failures, health checks, cancellation grace, saturation,
re-entrancy, session affinity and TTL, statistics. Times asserted are Trio clock times."""

from __future__ import annotations

import itertools
import logging

import pytest
import trio
import trio.testing

from tests.helpers import wait_for
from trio_bridge import (
    EncodeError,
    InvalidArgumentError,
    Lifecycle,
    PoolSaturatedError,
    SessionNotFoundError,
    ToolError,
    ToolNotFoundError,
    WorkerBusyError,
    WorkerCrashedError,
    WorkerStartError,
)
from trio_bridge.testing import FakeContext, open_fake_pool, stubborn


def add(a: int, b: int = 2) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


async def sleep(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


@stubborn
async def ignore_cancel(seconds: float) -> float:
    """Keeps running when cancelled, like a time.sleep in a real worker's thread."""
    await trio.sleep(seconds)
    return seconds


def whoami(ctx: FakeContext) -> str:
    return ctx.worker_id


def count(n: int):
    yield from range(n)


async def fail_midway(n: int):
    for i in range(n):
        yield i
    raise ValueError(f"broke after {n}")


TOOLS = {
    "add": add, "fail": fail, "sleep": sleep, "ignore_cancel": ignore_cancel, "whoami": whoami, "count": count,
    "fail_midway": fail_midway,
}


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# ---- restarts ----

async def test_restart_backoff_doubles_and_resets_after_a_stable_run(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with open_fake_pool(TOOLS, lifecycle=Lifecycle(restart_backoff=(1.0, 4.0))) as (pool, workers):
        for started in range(2, 7):  # five deaths in a row, each right after the start
            workers.kill(0)
            await workers.wait_started(started)
        times = [a.at for a in workers.attempts]
        # The first at once, then first, doubling, up to the longest.
        assert [b - a for a, b in itertools.pairwise(times)] == [0.0, 1.0, 2.0, 4.0, 4.0]
        await trio.sleep(11)  # a stable run (over 10 s) resets the backoff
        workers.kill(0)
        killed_at = trio.current_time()
        await workers.wait_started(7)
        assert workers.attempts[-1].at - killed_at == 0.0
        workers.kill(0)  # and dying again at once backs off again
        killed_at = trio.current_time()
        await workers.wait_started(8)
        assert workers.attempts[-1].at - killed_at == 1.0
        assert pool.statistics().restarts == 7
        assert await pool.execute("add", {"a": 1}) == 3
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 7  # each restart logged once
    assert all("exit code -9" in r.getMessage() for r in gone)


async def test_killed_worker_fails_only_its_call_and_the_pool_refills(autojump_clock):
    async with open_fake_pool(TOOLS, size=2, lifecycle=Lifecycle(restart_backoff=(0.5, 1.0))) as (pool, workers):
        results = {}

        async def doomed() -> None:
            with pytest.raises(WorkerCrashedError) as info:
                await pool.execute("sleep", {"seconds": 30})
            results["error"] = info.value

        async def other() -> None:
            results["other"] = await pool.execute("sleep", {"seconds": 2})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed)
            await settle()
            (slot,) = [w.slot for w in pool.workers() if w.in_flight]
            nursery.start_soon(other)
            await trio.sleep(1)
            victim = workers.kill(slot, stderr="Segmentation fault")
        error = results["error"]
        assert error.worker_id == victim.id and error.signal == "SIGKILL"
        assert "Segmentation fault" in error.stderr_tail
        assert results["other"] == 2  # the other worker's call was untouched
        assert pool.statistics().workers_ready == 2 and pool.statistics().restarts == 1
        assert victim.id not in {w.id for w in pool.workers()}


async def test_failing_starts_make_calls_fail_after_no_worker_timeout_then_the_pool_recovers(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with open_fake_pool(TOOLS, lifecycle=Lifecycle(restart_backoff=(1.0, 1.0), no_worker_timeout=5.0)) as (pool, workers):
        workers.fail_starts(message="ImportError: no module named 'weights'", exit_code=3)
        workers.kill(0)
        await trio.sleep(1.5)  # the first replacement failed
        assert workers.attempts[-1].failed
        started = trio.current_time()
        with pytest.raises(WorkerStartError, match="no_worker_timeout") as info:
            await pool.execute("add", {"a": 1})
        assert trio.current_time() - started == 5.0
        last = workers.attempts[-1]
        assert last.failed and info.value.worker_id == last.worker_id  # the last failure, not the first
        assert info.value.exit_code == 3 and "no module named 'weights'" in info.value.stderr_tail
        assert pool.statistics().calls_refused == 1
        workers.allow_starts()
        assert await pool.execute("add", {"a": 1}) == 3
    could_not = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert len(could_not) == sum(a.failed for a in workers.attempts)


async def test_a_pool_whose_workers_cannot_start_fails_to_open(autojump_clock):
    with pytest.raises(WorkerStartError, match="exited before it was ready") as info:
        async with open_fake_pool(TOOLS, size=2, start_failures=2):
            pass
    assert info.value.exit_code == 1 and "setup() failed" in info.value.stderr_tail
    assert "(2 of 2 workers failed to start)" in info.value.__notes__
    with pytest.raises(WorkerStartError, match=r"no ready line within 2 s"):
        async with open_fake_pool(TOOLS, start_delay=3, lifecycle=Lifecycle(startup_timeout=2)):
            pass
    assert trio.current_time() == 2


async def test_health_check_recycles_a_worker_that_stops_answering(autojump_clock):
    async with open_fake_pool(TOOLS, lifecycle=Lifecycle(health_check_interval=3.0, restart_backoff=(0.5, 1.0))) as (pool, workers):
        first = pool.workers()[0].id
        await trio.sleep(1)
        workers.hang(0)
        hung_at = trio.current_time()
        with pytest.raises(WorkerCrashedError, match="failed its health check"):
            await pool.execute("add", {"a": 1})
        # pinged at t=3, unanswered for 3 s: killed at t=6
        assert trio.current_time() - hung_at == 5.0
        assert await pool.execute("add", {"a": 1}) == 3
        assert pool.workers()[0].id != first and pool.statistics().restarts == 1


# ---- cancellation ----

async def test_a_cancelled_call_holds_its_slot_until_the_worker_lets_go(autojump_clock):
    async with open_fake_pool(TOOLS, lifecycle=Lifecycle(cancel_grace=5.0)) as (pool, workers):
        with trio.move_on_after(1):
            await pool.execute("sleep", {"seconds": 60})  # an async tool: cancelled at once
        await trio.sleep(0.1)
        assert pool.statistics().in_flight == 0
        with trio.move_on_after(1):
            await pool.execute("ignore_cancel", {"seconds": 3})  # lets go 2 s after the cancel
        assert pool.statistics().in_flight == 1  # the worker still runs it: the slot stays taken
        cancelled_at = trio.current_time()
        assert await pool.execute("add", {"a": 1}) == 3  # waits for the slot
        assert 2.0 <= trio.current_time() - cancelled_at < 2.5
        stats = pool.statistics()
        assert stats.restarts == 0 and stats.calls_cancelled == 2 and len(workers.made) == 1


async def test_a_worker_that_keeps_a_cancelled_call_is_recycled_after_cancel_grace(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with open_fake_pool(TOOLS, lifecycle=Lifecycle(cancel_grace=2.0, restart_backoff=(0.5, 1.0))) as (pool, workers):
        first = pool.workers()[0].id
        with trio.move_on_after(1):
            await pool.execute("ignore_cancel", {"seconds": 60})
        cancelled_at = trio.current_time()
        assert await pool.execute("whoami") != first  # the next call waited for a fresh worker
        assert trio.current_time() - cancelled_at == 2.0  # the grace; a first failure restarts at once
        assert pool.statistics().restarts == 1
        assert workers.made[0].death_reason.startswith("it did not free its slot within 2 s")
    assert any("did not free its slot" in r.getMessage() for r in caplog.records)


# ---- saturation and re-entrancy ----

async def test_full_queue_raises_pool_saturated_at_once(autojump_clock):
    async with open_fake_pool(TOOLS, max_queue=1) as (pool, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "sleep", {"seconds": 1})
            await settle()
            nursery.start_soon(pool.execute, "add", {"a": 1})
            await settle()
            assert (pool.statistics().in_flight, pool.statistics().queued) == (1, 1)
            with pytest.raises(PoolSaturatedError, match="max_queue=1"):
                await pool.execute("add", {"a": 2})
        assert pool.statistics().calls_refused == 1
    async with open_fake_pool(TOOLS, max_queue=0) as (pool, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "sleep", {"seconds": 1})
            await settle()
            with pytest.raises(PoolSaturatedError):
                await pool.execute("add", {"a": 2})


async def ask_host(ctx: FakeContext, word: str) -> str:
    return await ctx.call_host_tool("lookup", word=word)


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_host_tool_calling_the_pool_while_every_slot_waits_on_the_host_gets_pool_saturated(
    autojump_clock, concurrency
):
    async with open_fake_pool({**TOOLS, "ask_host": ask_host}, concurrency=concurrency) as (pool, _):

        @pool.host_tool
        async def lookup(word: str) -> str:
            return f"{word}:{await pool.execute('add', {'a': 1})}"

        if concurrency == 1:  # the only slot waits on the host: calling the pool could only deadlock
            with pytest.raises(ToolError) as info:
                await pool.execute("ask_host", {"word": "cat"})
            assert info.value.remote_type == "PoolSaturatedError" and "would deadlock" in info.value.remote_message
            assert trio.current_time() == 0  # at once, not after a hang
        else:  # a slot to spare: the same call works
            assert await pool.execute("ask_host", {"word": "cat"}) == "cat:3"
        assert not pool._calls._parked_calls


# ---- sessions ----

async def test_affinity_prefer_sticks_to_its_worker_and_spills_over_when_busy(autojump_clock):
    async with open_fake_pool(TOOLS, size=3) as (pool, _), pool.session() as session:
        homes = {await session.execute("whoami") for _ in range(5)}
        assert homes == {session.worker_id}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.execute, "sleep", {"seconds": 5})
            await settle()
            assert await session.execute("whoami") != session.worker_id  # busy: any worker
            assert trio.current_time() == 0
        assert session.moves == 0


async def test_affinity_strict_waits_for_its_worker(autojump_clock):
    async with open_fake_pool(TOOLS, size=2) as (pool, _), pool.session(affinity="strict") as session:
        home = await session.execute("whoami")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.execute, "sleep", {"seconds": 5})
            await settle()
            assert await pool.execute("whoami") != home  # others are not held up
            assert await session.execute("whoami") == home
            assert trio.current_time() == 5


async def test_affinity_strict_fail_fast_refuses_when_its_worker_is_busy(autojump_clock):
    async with open_fake_pool(TOOLS, size=2) as (pool, _), pool.session(affinity="strict_fail_fast") as session:
        home = await session.execute("whoami")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.execute, "sleep", {"seconds": 5})
            await settle()
            with pytest.raises(WorkerBusyError):
                await session.execute("whoami")
            assert await pool.execute("whoami") != home
        assert pool.statistics().calls_refused == 1


@pytest.mark.parametrize("affinity", ["prefer", "strict", "strict_fail_fast"])
async def test_a_session_whose_worker_died_moves_and_says_so(autojump_clock, caplog, affinity):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with open_fake_pool(TOOLS, size=2) as (pool, workers), pool.session(affinity=affinity) as session:
        first = await session.execute("whoami")
        (slot,) = [w.slot for w in pool.workers() if w.id == first]
        workers.kill(slot)
        second = await session.execute("whoami")
        assert second != first and session.worker_id == second and session.moves == 1
        assert await session.execute("whoami") == second
    (moved,) = [r.getMessage() for r in caplog.records if "moved from worker" in r.getMessage()]
    assert first in moved and second in moved and "exit code -9" in moved


async def test_workers_are_told_once_when_a_session_starts_and_when_it_ends(autojump_clock):
    async with open_fake_pool(TOOLS, size=2) as (pool, workers):
        async with pool.session("job-1", metadata={"user": "ada"}) as session:
            for _ in range(3):
                await session.execute("add", {"a": 1})
            (worker,) = [w for w in workers.made if w.id == session.worker_id]
            assert worker.started_sessions == [("job-1", {"user": "ada"})]
        await settle()
        assert worker.ended_sessions == ["job-1"]
        with pytest.raises(SessionNotFoundError):
            await session.execute("add", {"a": 1})


async def test_a_session_expires_after_its_ttl_unless_used(autojump_clock):
    async with open_fake_pool(TOOLS) as (pool, workers), pool.session(ttl=10) as session:
        await session.register_variable("t", "float", 0.5)
        for _ in range(3):  # each use keeps it alive
            await trio.sleep(8)
            await session.execute("add", {"a": 1})
        await trio.sleep(9.9)
        await session.execute("add", {"a": 1})  # still there after 9.9 s unused
        await trio.sleep(10.1)
        with pytest.raises(SessionNotFoundError):
            await session.execute("add", {"a": 1})
        with pytest.raises(SessionNotFoundError):
            await session.get_variable("t")
        await settle()
        assert workers.worker(0).ended_sessions == [session.id]  # the reaper told its worker


# ---- calls and statistics ----

async def test_an_exception_group_raised_by_the_users_block_leaves_the_pool_as_itself(autojump_clock):
    with pytest.raises(ExceptionGroup) as info:
        async with open_fake_pool(TOOLS) as (pool, _), trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "sleep", {"seconds": 1})
            raise ValueError("mine")
    assert [repr(e) for e in info.value.exceptions] == ["ValueError('mine')"]
    with pytest.raises(ExceptionGroup) as info:
        async with open_fake_pool(TOOLS) as (pool, _), pool.stream("count", {"n": 3}) as chunks:
            async for _ in chunks:
                async with trio.open_nursery():
                    raise KeyError("also mine")
    assert [repr(e) for e in info.value.exceptions] == ["KeyError('also mine')"]


async def test_streams_end_with_the_tools_error_after_its_chunks(autojump_clock):
    async with open_fake_pool(TOOLS) as (pool, _):
        async with pool.stream("count", {"n": 5}) as chunks:
            assert [c async for c in chunks] == [0, 1, 2, 3, 4]
        got = []
        with pytest.raises(ToolError, match="broke after 3"):
            async with pool.stream("fail_midway", {"n": 3}) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert got == [0, 1, 2]
        async with pool.stream("count", {"n": 10**9}) as chunks:  # leaving early stops it
            async for chunk in chunks:
                if chunk == 3:
                    break
        # The slot frees once the worker has let go of the call (the pool pings it until then).
        await wait_for(lambda: pool.statistics().in_flight == 0, timeout=1)
        stats = pool.statistics()
        assert (stats.calls_completed, stats.calls_failed, stats.calls_cancelled) == (1, 1, 1)


async def test_bad_calls_are_refused_with_their_own_errors(autojump_clock):
    async with open_fake_pool(TOOLS) as (pool, _):
        with pytest.raises(ToolNotFoundError):
            await pool.execute("nope")
        with pytest.raises(InvalidArgumentError, match="missing required argument"):
            await pool.execute("add", {})
        with pytest.raises(InvalidArgumentError, match="is a streaming tool"):
            await pool.execute("count", {"n": 1})
        assert await pool.execute("add", {"a": 1}) == 3


async def test_statistics_count_every_outcome_once_and_each_restart_is_logged_once(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with open_fake_pool(TOOLS, max_queue=1, lifecycle=Lifecycle(restart_backoff=(0.1, 0.1))) as (pool, workers):
        made = 0
        for a in range(3):
            assert await pool.execute("add", {"a": a}) == a + 2
            made += 1
        with pytest.raises(ToolError):
            await pool.execute("fail", {"message": "no"})
        made += 1
        with pytest.raises(EncodeError):
            await pool.execute("add", {"a": object()})  # refused by the host, nothing ran
        made += 1
        async with pool.stream("count", {"n": 3}) as chunks:
            assert [c async for c in chunks] == [0, 1, 2]
        made += 1
        with trio.move_on_after(1):
            await pool.execute("sleep", {"seconds": 5})  # cancelled while running
        made += 1
        await trio.sleep(0.1)  # the worker lets go of it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "sleep", {"seconds": 2})  # holds the only slot
            await settle()
            with trio.move_on_after(1):
                await pool.execute("add", {"a": 1})  # cancelled while queued
            nursery.start_soon(pool.execute, "add", {"a": 1})  # queued: fills max_queue=1
            await settle()
            with pytest.raises(PoolSaturatedError):
                await pool.execute("add", {"a": 1})
        made += 4
        async with trio.open_nursery() as nursery:

            async def crashes() -> None:
                with pytest.raises(WorkerCrashedError):
                    await pool.execute("sleep", {"seconds": 5})

            nursery.start_soon(crashes)
            await settle()
            workers.kill(0, exit_code=3)
        made += 1
        await workers.wait_started(2)
        stats = pool.statistics()
    assert (stats.calls_completed, stats.calls_failed, stats.calls_cancelled) == (6, 1, 1)
    assert (stats.calls_cancelled_queued, stats.calls_refused, stats.calls_crashed) == (1, 2, 1)
    assert stats.calls == made and stats.in_flight == 0 and stats.queued == 0
    assert stats.latency_p50 is not None and stats.restarts == 1
    assert sum(w.calls_served for w in workers.made) == stats.calls_completed + stats.calls_failed  # answered
    (gone,) = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert "exit code 3" in gone
