"""Recycling: a worker past ``Recycling.max_calls``, ``max_age`` or
``max_memory`` is replaced without failing a call and without lowering capacity (its
replacement starts first, then it drains). Pool logic on fake workers and Trio's autojump
clock; then the same promise with real processes."""

from __future__ import annotations

import collections
import contextlib
import logging

import pytest
import trio
import trio.testing

from tests.helpers import FAKE_TOOLS, wait_for
from trio_bridge import InvalidArgumentError, Lifecycle, Recycling, open_pool
from trio_bridge.testing import open_fake_pool


async def run_load(
    pool, *, callers: int, calls: int, size: int, tool: str = "", arguments: dict | None = None, call=None,
) -> dict:
    """``calls`` calls (of ``tool`` with ``arguments``, or ``call()``) from ``callers`` concurrent
    callers, while a watcher records the fewest slots with a ready worker taking calls
    (``workers_ready``, at every Trio clock step). Returns failures and that minimum."""
    failures: list[BaseException] = []
    fewest_ready = [size]
    remaining = [calls]
    done = trio.Event()

    async def caller() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            try:
                await (call() if call is not None else pool.execute(tool, arguments))
            except Exception as exc:
                failures.append(exc)
            fewest_ready[0] = min(fewest_ready[0], pool.statistics().workers_ready)

    async def watch() -> None:
        while not done.is_set():
            fewest_ready[0] = min(fewest_ready[0], pool.statistics().workers_ready)
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as callers_nursery:
            for _ in range(callers):
                callers_nursery.start_soon(caller)
        done.set()
    return {"failures": failures, "fewest_ready": fewest_ready[0]}


async def test_max_calls_holds_without_failing_a_call_and_capacity_stays_at_size_minus_one(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    async with open_fake_pool(FAKE_TOOLS, size=2, concurrency=2, start_delay=0.05, recycling=Recycling(max_calls=100)) as fake:
        pool = fake.pool
        result = await run_load(pool, callers=50, calls=1000, tool="sleep", arguments={"seconds": 0.01}, size=2)
        assert result["failures"] == []
        # a worker given its 100th call takes no other while its replacement starts (started at
        # 90 calls, it needs 0.05 s here: 5 rounds of 0.01 s calls, 2 at a time): one slot may be
        # without a ready worker then, never both
        assert result["fewest_ready"] >= 1
        stats = pool.statistics()
        assert stats.calls_completed == 1000
        made = fake.workers.made
        served = [w.calls_given for w in made]
        assert max(served) <= 100 and sum(served) == 1000  # the limit holds
        assert len([w for w in made if w.calls_given]) >= 10
        assert 9 <= stats.recycles["calls"] <= 11
        assert stats.restarts == 0
        recycled = [w for w in made if w.exit_code is not None]
        assert recycled and all(w.exit_code == 0 for w in recycled)  # drained and exited, not killed
        current = pool.workers()[:2]  # the slots' workers (a replacement started ahead may follow)
        assert [(w.slot, w.state) for w in current] == [(0, "ready"), (1, "ready")]
        assert all("Recycling.max_calls=100" in (w.last_recycle_reason or "") for w in current)
    said = [r.getMessage() for r in caplog.records if "recycled" in r.getMessage()]
    assert len(said) == stats.recycles["calls"]  # once per recycle
    assert not [r for r in caplog.records if "is gone" in r.getMessage()]


async def test_a_replacement_started_ahead_is_listed_while_it_takes_calls(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=1, start_delay=0.05, recycling=Recycling(max_calls=10)) as fake:
        pool = fake.pool
        first = pool.workers()[0]
        for _ in range(9):  # 90 % of the limit: its replacement starts
            assert await pool.execute("whoami") == first.id
        await wait_for(lambda: len(pool.workers()) >= 2)
        await wait_for(lambda: pool.workers()[1].state == "ready")
        workers = pool.workers()
        # (calls this fast against a 0.05 s start may have a second one started ahead too)
        assert workers[0].id == first.id and [w.slot for w in workers] == [0] * len(workers) and len(workers) <= 3
        answered = {await pool.execute("whoami") for _ in range(4)}
        assert answered <= {w.id for w in pool.workers()} | {w.id for w in workers}
        assert workers[1].id in answered  # it serves, and is shown


async def test_a_recycled_worker_finishes_its_long_call_while_its_replacement_serves(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=1, recycling=Recycling(max_age=10.0)) as fake:
        pool = fake.pool
        first = pool.workers()[0]
        async with trio.open_nursery() as nursery:
            long_call: list[float] = []

            async def call_long() -> None:
                long_call.append(await pool.execute("sleep", {"seconds": 30.0}))

            nursery.start_soon(call_long)
            await trio.sleep(12.0)  # past the age limit, mid-call
            workers = pool.workers()
            assert [(w.id, w.state) for w in workers] == [(workers[0].id, "ready"), (first.id, "draining")]
            assert "Recycling.max_age=10" in (workers[1].last_recycle_reason or "")
            # the replacement serves new calls while the old one finishes
            assert await pool.execute("whoami") == workers[0].id
            assert pool.statistics().workers_ready == 1
        assert long_call == [30.0]
        await wait_for(lambda: len(pool.workers()) == 1)
        assert fake.workers.made[0].exit_code == 0
        assert pool.statistics().recycles == {"age": pool.statistics().recycles["age"]}
        assert pool.statistics().calls_failed == pool.statistics().calls_crashed == 0


async def test_max_worker_memory_recycles_a_worker_whose_rss_grew(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2, recycling=Recycling(max_memory=500 * 2**20)) as fake:
        pool = fake.pool
        lean, fat = fake.workers.made
        fat.rss = 600 * 2**20
        lean.rss = 100 * 2**20
        await trio.sleep(1.5)  # RSS is sampled every second
        ids = [w.id for w in pool.workers()]
        assert lean.id in ids and fat.id not in ids and len(ids) == 2
        assert pool.statistics().recycles == {"memory": 1}
        assert "RSS is 600 MiB" in (pool.workers()[1 if ids[0] == lean.id else 0].last_recycle_reason or "")


async def test_when_the_replacement_cannot_start_calls_wait_for_it_and_the_limit_holds(autojump_clock, caplog):
    async with open_fake_pool(FAKE_TOOLS, size=1, recycling=Recycling(max_calls=3), lifecycle=Lifecycle(restart_backoff=(1.0, 1.0))) as fake:
        pool = fake.pool
        old = pool.workers()[0].id
        fake.workers.fail_starts(2)
        for _ in range(3):  # its replacement fails to start from the second call on (90 %)
            assert await pool.execute("whoami") == old
        started = trio.current_time()
        answered = await pool.execute("whoami")  # past the limit: it waits for a worker that starts
        assert answered != old and trio.current_time() - started >= 1.0  # after a backoff
        assert sum("could not start" in r.getMessage() for r in caplog.records) == 2
        assert fake.workers.made[0].calls_given == 3
        assert pool.workers()[0].id == answered
        assert pool.statistics().recycles == {"calls": 1}
        assert pool.statistics().calls_completed == 4


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_calls", 0), ("max_calls", -1), ("max_calls", True), ("max_calls", 2.5), ("max_calls", "10"),
        ("max_age", 0), ("max_age", float("nan")), ("max_age", float("inf")), ("max_memory", -5),
    ],
)
async def test_bad_recycling_limits_are_refused_before_anything_starts(option, value):
    with pytest.raises(InvalidArgumentError, match=f"Recycling.{option}"):
        async with open_pool("tests.adapters:Echo", size=1, recycling=Recycling(**{option: value})):
            pytest.fail("the pool opened")


@pytest.mark.real_process
async def test_real_workers_are_recycled_by_calls_and_by_memory_without_a_failed_call():
    size = 2
    async with open_pool("tests.adapters:Pid", size=size, concurrency=2, recycling=Recycling(max_calls=100)) as pool:
        first_pids = {w.pid for w in pool.workers()}
        pids: collections.Counter[int] = collections.Counter()

        async def pid() -> int:
            # calls of 5 ms: a worker starts (~0.1 s forked) before the other slot has served
            # 50 calls (what the capacity promise needs, see _supervisor._max_calls)
            answered = await pool.execute("pid_after", {"seconds": 0.005})
            pids[answered] += 1
            return answered

        result = await run_load(pool, callers=50, calls=1000, call=pid, size=size)
        assert result["failures"] == []
        # a worker given its 100th call takes no other while its replacement starts: one slot
        # at a time (see _supervisor._max_calls), never both
        assert result["fewest_ready"] >= size - 1
        assert len(pids) >= 10 and max(pids.values()) <= 100 and sum(pids.values()) == 1000
        stats = pool.statistics()
        assert stats.calls_completed == 1000 and stats.restarts == 0
        assert 9 <= stats.recycles["calls"] <= 11
        await wait_for(lambda: all(w.state != "draining" for w in pool.workers()))  # the recycled ones are gone
        assert not first_pids & {w.pid for w in pool.workers()}
        assert all(w.calls_served <= 100 for w in pool.workers())

    async with open_pool("tests.adapters:Echo", size=1, recycling=Recycling(max_memory=200 * 2**20)) as pool:
        pids = [await pool.execute("leak", {"mib": 64}) for _ in range(3)]  # RSS ~30 MiB + 192 MiB kept
        assert len(set(pids)) == 1  # under the limit until the third
        await wait_for(lambda: pool.statistics().recycles.get("memory") == 1 and len(pool.workers()) == 1, timeout=20)
        info = pool.workers()[0]
        assert info.pid != pids[0] and "Recycling.max_memory=200 MiB" in (info.last_recycle_reason or "")
        assert await pool.execute("add", {"a": 1}) == 3


@pytest.mark.real_process
async def test_recycling_under_random_sigkills_fails_only_the_killed_workers_calls_and_leaves_nothing():
    import os
    import random
    import signal

    import psutil

    from trio_bridge import WorkerCrashedError

    rng = random.Random(7)
    seen_pids: set[int] = set()
    killed: set[int] = set()
    outcomes = {"ok": 0, "crashed": 0}
    async with open_pool("tests.adapters:Echo", size=2, concurrency=2, recycling=Recycling(max_calls=15)) as pool:

        async def caller() -> None:
            for _ in range(60):
                try:
                    assert await pool.execute("add", {"a": 1}) == 3
                    outcomes["ok"] += 1
                except WorkerCrashedError:
                    outcomes["crashed"] += 1  # its worker was killed mid-call: only such calls fail
                await trio.sleep(rng.random() * 0.01)

        async def killer() -> None:
            for _ in range(12):
                await trio.sleep(rng.random() * 0.3)
                workers = [w for w in pool.workers() if w.pid is not None and w.state in ("ready", "draining")]
                seen_pids.update(w.pid for w in pool.workers() if w.pid)
                if workers:
                    victim = rng.choice(workers).pid
                    killed.add(victim)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            for _ in range(10):
                nursery.start_soon(caller)
        assert outcomes["ok"] + outcomes["crashed"] == 600
        assert outcomes["ok"] > outcomes["crashed"]
        # every killed worker noticed (a replacement started ahead may have been one) and 2 ready
        await wait_for(lambda: pool.statistics().workers_ready == 2 and not killed & {w.pid for w in pool.workers()}, timeout=30)
        assert await pool.execute("add", {"a": 2}) == 4
        seen_pids.update(w.pid for w in pool.workers() if w.pid)
    stats = pool.statistics()
    assert stats.calls_crashed == outcomes["crashed"] and stats.calls_failed == 0
    assert stats.recycles.get("calls", 0) > 0 and stats.restarts > 0  # both happened, interleaved
    assert not [pid for pid in seen_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
