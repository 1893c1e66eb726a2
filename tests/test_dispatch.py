"""The dispatcher: free slots first, then a bounded FIFO queue; cancellation loses no slot."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_bridge import PoolClosedError, PoolSaturatedError, WorkerBusyError
from trio_bridge._host._dispatch import Dispatcher


class FakeWorker:
    def __init__(self, name: str, concurrency: int = 1) -> None:
        self.name = name
        self.concurrency = concurrency
        self.busy = 0
        self.accepting = True
        self.lifecycle = self  # its own slots (a pool's worker keeps them in its WorkerLifecycle)

    def admit(self) -> None:
        pass

    def __repr__(self) -> str:
        return self.name


async def test_free_slots_are_spread_over_workers():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=10)
    a, b = FakeWorker("a", 2), FakeWorker("b", 2)
    d.add(a)
    d.add(b)
    taken = [await d.acquire() for _ in range(4)]
    assert sorted(w.name for w in taken) == ["a", "a", "b", "b"]
    assert taken[0] is not taken[1]


async def test_waiters_are_served_in_fifo_order(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=10)
    w = FakeWorker("w")
    d.add(w)
    await d.acquire()
    order = []

    async def call(i: int) -> None:
        await d.acquire()
        order.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(call, i)
            await trio.testing.wait_all_tasks_blocked()
        assert d.queued == 5
        for _ in range(5):
            d.release(w)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]


async def test_full_queue_refuses_at_once():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=1)
    d.add(FakeWorker("w"))
    await d.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(d.acquire)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(PoolSaturatedError, match="max_queue=1"):
            await d.acquire()
        nursery.cancel_scope.cancel()


async def test_cancelled_waiter_leaves_the_queue(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    w = FakeWorker("w")
    d.add(w)
    await d.acquire()
    with trio.move_on_after(1):
        await d.acquire()
    assert d.queued == 0
    d.release(w)
    assert w.busy == 0
    assert await d.acquire() is w


async def test_slot_handed_to_a_just_cancelled_waiter_is_given_back():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    w = FakeWorker("w")
    d.add(w)
    await d.acquire()
    async with trio.open_nursery() as nursery:
        cancel_scope = trio.CancelScope()

        async def waiter() -> None:
            with cancel_scope:
                await d.acquire()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        cancel_scope.cancel()  # the waiter is cancelled, but before it runs ...
        d.release(w)           # ... the freed slot is handed to it
    assert w.busy == 0         # it gave the slot back
    assert d.queued == 0


async def test_new_worker_serves_queued_calls(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    async with trio.open_nursery() as nursery:
        got = []

        async def call() -> None:
            got.append(await d.acquire())

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        w = FakeWorker("late")
        d.add(w)
    assert got == [w]


async def test_workers_not_accepting_get_no_calls(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    stopping, fresh = FakeWorker("stopping"), FakeWorker("fresh")
    d.add(stopping)
    stopping.accepting = False
    with trio.move_on_after(1):
        await d.acquire()
    d.add(fresh)
    assert await d.acquire() is fresh


async def test_close_fails_queued_and_new_calls():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    d.add(FakeWorker("w"))
    await d.acquire()
    with pytest.RaisesGroup(PoolClosedError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.acquire)
            await trio.testing.wait_all_tasks_blocked()
            d.close("closing for the test")
    with pytest.raises(PoolClosedError, match="closing for the test"):
        await d.acquire()


async def test_prefer_takes_the_session_worker_when_free_else_any():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)
    assert await d.acquire(home, "prefer") is home
    assert await d.acquire(home, "prefer") is other  # home is busy: any free worker


async def test_strict_waits_for_its_worker_without_holding_up_others(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)
    await d.acquire(home, "strict")
    await d.acquire(other)
    got = []

    async def call(name: str, worker: FakeWorker | None, affinity: str) -> None:
        got.append((name, await d.acquire(worker, affinity)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "strict", home, "strict")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "any", None, "prefer")
        await trio.testing.wait_all_tasks_blocked()
        d.release(other)  # the call behind the strict one gets it
        await trio.testing.wait_all_tasks_blocked()
        assert got == [("any", other)]
        d.release(home)
    assert got == [("any", other), ("strict", home)]


async def test_strict_fail_fast_raises_when_its_worker_is_busy():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)
    await d.acquire(home, "strict_fail_fast")
    with pytest.raises(WorkerBusyError, match="busy"):
        await d.acquire(home, "strict_fail_fast")


async def test_calls_bound_to_a_worker_that_left_go_to_another(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)
    await d.acquire(home)
    await d.acquire(other)
    got = []

    async def call() -> None:
        got.append(await d.acquire(home, "strict"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        d.remove(home)  # it died while the call waited for it
        d.release(other)
    assert got == [other]
    d.release(other)
    assert await d.acquire(home, "strict_fail_fast") is other  # home is gone: no busy error
