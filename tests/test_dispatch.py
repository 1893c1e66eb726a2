"""The dispatcher: free slots first, then bounded queues, one per session, served fairly
(deficit round robin); cancellation loses no slot."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_bridge import PoolClosedError, PoolSaturatedError, WorkerBusyError
from trio_bridge._host import _dispatch as dispatch
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


def home_and_other(max_queue: int) -> tuple[Dispatcher[FakeWorker], FakeWorker, FakeWorker]:
    """A dispatcher with two free workers, ``home`` (a session's) and ``other``."""
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=max_queue)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)
    return d, home, other


async def one_busy_worker(max_queue: int) -> tuple[Dispatcher[FakeWorker], FakeWorker]:
    """A dispatcher with one worker, ``w``, whose one slot is taken: calls queue."""
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=max_queue)
    w = FakeWorker("w")
    d.add(w)
    await d.acquire()
    return d, w



async def test_free_slots_are_spread_over_workers():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=10)
    a, b = FakeWorker("a", 2), FakeWorker("b", 2)
    d.add(a)
    d.add(b)
    taken = [await d.acquire() for _ in range(4)]
    assert sorted(w.name for w in taken) == ["a", "a", "b", "b"]
    assert taken[0] is not taken[1]


async def test_waiters_are_served_in_fifo_order(autojump_clock):
    d, w = await one_busy_worker(10)
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
    d, w = await one_busy_worker(5)
    with trio.move_on_after(1):
        await d.acquire()
    assert d.queued == 0
    d.release(w)
    assert w.busy == 0
    assert await d.acquire() is w


async def test_slot_handed_to_a_just_cancelled_waiter_is_given_back():
    d, w = await one_busy_worker(5)
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
    d, home, other = home_and_other(5)
    assert await d.acquire(home, "prefer") is home
    assert await d.acquire(home, "prefer") is other  # home is busy: any free worker


async def test_strict_waits_for_its_worker_without_holding_up_others(autojump_clock):
    d, home, other = home_and_other(5)
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
    d, home, _ = home_and_other(5)
    await d.acquire(home, "strict_fail_fast")
    with pytest.raises(WorkerBusyError, match="busy"):
        await d.acquire(home, "strict_fail_fast")


async def test_calls_bound_to_a_worker_that_left_go_to_another(autojump_clock):
    d, home, other = home_and_other(5)
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


# ---- fair queueing between sessions ----
class Queued:
    """Calls started in a nursery, each recording (its name, the worker it got) once served."""

    def __init__(self, d: Dispatcher[FakeWorker], nursery: trio.Nursery) -> None:
        self.d = d
        self.nursery = nursery
        self.served: list[tuple[str, FakeWorker]] = []
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, name: str, key: str = "", worker: FakeWorker | None = None, affinity: Any = "prefer") -> None:
        scope = self.scopes[name] = trio.CancelScope()

        async def call() -> None:
            with scope:
                self.served.append((name, await self.d.acquire(worker, affinity, key=key)))

        self.nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()

    def names(self) -> list[str]:
        return [name for name, _ in self.served]

    async def release(self, worker: FakeWorker, key: str = "") -> None:
        self.d.release(worker, key)
        await trio.testing.wait_all_tasks_blocked()


async def test_sessions_are_served_round_robin(autojump_clock):
    d, w = await one_busy_worker(100)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for i in range(6):
            await q.start(f"a{i}", "a")  # a floods the queue first
        for i in range(3):
            await q.start(f"b{i}", "b")
        assert d.queued == 9
        await q.release(w)
        while len(q.served) < 9:
            await q.release(w, q.served[-1][0][0])
    assert q.names() == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4", "a5"]
    assert d.queued == 0 and w.busy == 1  # the last call holds it


async def test_weights_share_the_slots_in_proportion(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=1000)
    d.configure("heavy", weight=2)
    d.configure("light", weight=1)
    w = FakeWorker("w")
    d.add(w)
    await d.acquire()
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for i in range(100):
            await q.start(f"heavy{i}", "heavy")
            await q.start(f"light{i}", "light")
        await q.release(w)
        for _ in range(59):
            await q.release(w, q.served[-1][0].rstrip("0123456789"))
        counts = collections.Counter(name.rstrip("0123456789") for name in q.names())
        assert counts == {"heavy": 40, "light": 20}
        nursery.cancel_scope.cancel()
    stats = d.sessions()
    assert stats["heavy"].weight == 2 and stats["heavy"].calls == 40 and stats["light"].calls == 20
    assert stats["heavy"].queued == 0  # the cancelled calls left the queue


async def test_every_turn_serves_a_call_however_light_the_waiting_sessions_are(autojump_clock, monkeypatch):
    """O(1) work per call: a turn's quantum is a session's weight over the smallest waiting one,
    so no turn passes without serving a call, even with many light sessions of unequal weights
    (were the quanta below one call, turns would pass empty by the hundred)."""
    turns = collections.Counter[str]()
    pass_turn = dispatch._Rotation.pass_turn

    def counted(self: Any) -> None:
        turns["passed"] += 1
        pass_turn(self)

    monkeypatch.setattr(dispatch._Rotation, "pass_turn", counted)
    d, w = await one_busy_worker(1000)
    sessions = [(f"s{i}", 0.01 if i % 2 else 0.03) for i in range(40)]
    for key, weight in sessions:
        d.configure(key, weight=weight)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for key, _ in sessions:
            for i in range(5):
                await q.start(f"{key}-{i}", key)
        await q.release(w)
        for _ in range(119):
            await q.release(w, q.served[-1][0].split("-")[0])
        assert len(q.served) == 120
        assert turns["passed"] <= len(q.served) + len(sessions)  # at most one turn per call served
        # one round: each session's turn, 3 calls for weight 0.03, 1 for weight 0.01
        heavy = sum(int(name.split("-")[0][1:]) % 2 == 0 for name in q.names()[:80])
        assert heavy == 60
        nursery.cancel_scope.cancel()


async def test_a_session_that_starts_waiting_is_served_within_a_round(autojump_clock):
    """However many calls a flooding session has queued, another's next call waits for one of them."""
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=5000)
    w = FakeWorker("w", concurrency=2)
    d.add(w)
    await d.acquire()
    await d.acquire()
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for i in range(3000):
            await q.start(f"flood{i}", "flood")
        await q.release(w, "flood")  # the flood is being served
        await q.release(w, "flood")
        await q.start("late", "late")
        for _ in range(3):
            await q.release(w, "flood")
        assert "late" in q.names()
        assert q.names().index("late") <= 4
        nursery.cancel_scope.cancel()


async def test_max_in_flight_holds_even_with_free_workers(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=10)
    d.configure("capped", max_in_flight=1)
    workers = [FakeWorker(f"w{i}") for i in range(3)]
    for w in workers:
        d.add(w)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("c0", "capped")
        await q.start("c1", "capped")
        await q.start("other", "")
        assert q.names() == ["c0", "other"]  # a worker is free, but c1's session has one in flight
        assert d.queued == 1 and d.sessions()["capped"].in_flight == 1
        with pytest.raises(WorkerBusyError, match="max_in_flight"):
            await d.acquire(workers[2], "strict_fail_fast", key="capped")
        await q.release(q.served[0][1], "capped")
        assert q.names() == ["c0", "other", "c1"]
    assert d.sessions()["capped"].max_in_flight == 1


async def test_strict_calls_park_their_session_and_get_their_worker_when_it_frees(autojump_clock):
    d, home, other = home_and_other(100)
    await d.acquire(home)
    await d.acquire(other)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("s0", "s", home, "strict")
        await q.start("s1", "s", home, "strict")
        await q.start("s-any", "s")  # behind the session's strict calls, but not held up by them
        for i in range(20):
            await q.start(f"f{i}", "flood")
        await q.release(other)
        assert q.served == [("s-any", other)]  # behind the session's strict calls, not held up by them
        await q.release(other, "s")
        await q.release(other, "flood")
        assert q.names() == ["s-any", "f0", "f1"]  # never a call for home on another worker
        await q.release(home)  # the session was parked on home: the flood cannot keep it waiting
        assert q.served[-1] == ("s0", home)
        for _ in range(2):
            await q.release(home, q.served[-1][0].rstrip("0123456789-any"))
        assert ("s1", home) in q.served
        nursery.cancel_scope.cancel()


async def test_a_parked_session_s_next_call_for_any_worker_takes_a_free_one(autojump_clock):
    d, home, other = home_and_other(100)
    await d.acquire(home)
    await d.acquire(other)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("s0", "s", home, "strict")
        await q.release(other)  # the session is parked on home; other stays free
        await q.start("s1", "s")
        assert q.served == [("s1", other)]
        await q.release(home)
    assert q.served == [("s1", other), ("s0", home)]


async def test_strict_calls_of_a_worker_that_left_go_anywhere_in_order(autojump_clock):
    d, home, other = home_and_other(100)
    await d.acquire(home)
    await d.acquire(other)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("s0", "s", home, "strict")
        await q.start("s1", "s")
        await q.start("s2", "s", home, "strict")
        d.remove(home)
        for _ in range(3):
            await q.release(other, "s" if q.served else "")
    assert q.names() == ["s0", "s1", "s2"]
    assert [w for _, w in q.served] == [other] * 3


async def test_cancelled_waiters_of_several_sessions_leave_their_queues(autojump_clock):
    d, home, other = home_and_other(100)
    await d.acquire(home)
    await d.acquire(other)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for key in "abc":
            for i in range(3):
                await q.start(f"{key}{i}", key)
        await q.start("s0", "s", home, "strict")
        await q.start("s1", "s")
        for name in ("a0", "a1", "a2", "b1", "c2", "s0"):
            q.scopes[name].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert d.queued == 5
        assert {k: v.queued for k, v in d.sessions().items()} == {"": 0, "b": 2, "c": 2, "s": 1}
        await q.release(home)
        await q.release(other)
        while len(q.served) < 5:
            name, worker = q.served[-1]
            await q.release(worker, name[0])
    assert sorted(q.names()) == ["b0", "b2", "c0", "c1", "s1"]
    assert d.queued == 0
    assert "a" not in d.sessions()  # all its calls were cancelled: it is gone


async def test_max_queue_bounds_the_waiters_of_all_sessions(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=3)
    d.add(FakeWorker("w"))
    await d.acquire()
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("a0", "a")
        await q.start("a1", "a")
        await q.start("b0", "b")
        with pytest.raises(PoolSaturatedError, match="max_queue=3"):
            await d.acquire(key="c")
        assert "c" not in d.sessions()  # a refused call leaves nothing behind
        nursery.cancel_scope.cancel()


async def test_sessions_are_known_while_configured_or_busy():
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=3)
    w = FakeWorker("w", concurrency=2)
    d.add(w)
    d.configure("s", weight=3, max_in_flight=2)
    d.configure("s", weight=0.5)  # joined again: the latest block's settings
    assert d.sessions()["s"].weight == 0.5 and d.sessions()["s"].max_in_flight is None
    assert await d.acquire(key="s") is w
    assert await d.acquire(key="routed") is w  # a session's call routed by a worker: weight 1
    d.forget("s")
    assert set(d.sessions()) == {"", "s", "routed"}
    d.forget("s")
    d.release(w, "s")
    d.release(w, "routed")
    assert set(d.sessions()) == {""}
    figures = d.sessions()[""]
    assert (figures.queued, figures.in_flight, figures.calls, figures.weight) == (0, 0, 0, 1.0)


_KEYS = ("", "a", "b")
_step = st.one_of(
    st.tuples(
        st.just("acquire"), st.sampled_from(_KEYS), st.sampled_from([None, 0, 1]), st.sampled_from(["prefer", "strict"]),
        st.sampled_from(["", "", "nested", "readmitted"]),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("cancel_and_release"), st.integers(0, 50)),
    st.tuples(st.just("replace"), st.integers(0, 1)),
    st.tuples(st.just("configure"), st.sampled_from([None, 1, 2, 3]), st.sampled_from([0.01, 1.0, 3.0])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, max_size=60), st.integers(1, 2))
def test_no_slot_or_waiter_is_ever_lost(steps: list[tuple[Any, ...]], concurrency: int) -> None:
    """Random acquires (sessions, strict affinity, nested and readmitted calls), cancellations,
    releases and workers replaced: slots taken match the calls holding them, no free slot stays
    unused while a call it could take waits, max_in_flight holds (for calls not nested), and
    every call left is served in the end."""

    async def scenario() -> None:
        d: Dispatcher[FakeWorker] = Dispatcher(max_queue=20)
        cap: list[int | None] = [2]  # session a's max_in_flight, as last configured
        d.configure("a", weight=2, max_in_flight=cap[0])
        d.configure("b", weight=0.5)
        workers = [FakeWorker(f"w{i}", concurrency) for i in range(2)]
        everyone = list(workers)
        for w in workers:
            d.add(w)
        held: list[tuple[FakeWorker, str]] = []
        pending: dict[int, tuple[trio.CancelScope, str, FakeWorker | None, str]] = {}
        ids = iter(range(10**6))

        async def call(i: int, key: str, worker: FakeWorker | None, affinity: Any, kind: str, scope: trio.CancelScope) -> None:
            try:
                with scope:
                    got = await d.acquire(worker, affinity, key=key, nested=kind == "nested", readmitted=kind == "readmitted")
                    held.append((got, key))
            except PoolSaturatedError:
                pass
            finally:
                del pending[i]

        def check() -> None:
            assert sum(w.busy for w in everyone) == len(held)
            assert d.queued == len(pending)
            assert sum(kind != "readmitted" for *_, kind in pending.values()) <= d.max_queue
            stats = d.sessions()
            for key in _KEYS:
                in_flight = sum(k == key for _, k in held)
                assert stats[key].in_flight == in_flight if key in stats else in_flight == 0
            capped = cap[0] is not None and stats["a"].in_flight >= cap[0]
            for _, key, only, kind in pending.values():  # a free slot that could take a waiting call: none
                if key == "a" and capped and kind != "nested":
                    continue
                if only is not None and only in workers:
                    assert only.busy >= only.concurrency
                else:
                    assert all(w.busy >= w.concurrency for w in workers)

        async with trio.open_nursery() as nursery:
            for step in steps:
                if step[0] == "acquire":
                    _, key, index, affinity, kind = step
                    worker = None if index is None else workers[index]
                    i = next(ids)
                    scope = trio.CancelScope()
                    pending[i] = (scope, key, worker if affinity == "strict" else None, kind)
                    nursery.start_soon(call, i, key, worker, affinity, kind, scope)
                elif step[0] in ("cancel", "cancel_and_release") and pending:
                    victim = list(pending.values())[step[1] % len(pending)]
                    victim[0].cancel()
                    if step[0] == "cancel_and_release" and held:  # the freed slot may go to the cancelled call
                        w, key = held.pop(step[1] % len(held))
                        d.release(w, key)
                elif step[0] == "release" and held:
                    w, key = held.pop(step[1] % len(held))
                    d.release(w, key)
                elif step[0] == "replace":
                    old = workers[step[1]]
                    d.remove(old)
                    workers[step[1]] = FakeWorker(f"{old.name}'", concurrency)
                    everyone.append(workers[step[1]])
                    d.add(workers[step[1]])
                elif step[0] == "configure":  # session a joined again by another block
                    cap[0] = step[1]
                    d.configure("a", weight=step[2], max_in_flight=cap[0])
                await trio.testing.wait_all_tasks_blocked()
                check()
            for _ in range(200):  # give every slot back until all calls were served
                if not held:
                    break
                w, key = held.pop(0)
                d.release(w, key)
                await trio.testing.wait_all_tasks_blocked()
                check()
            assert not pending and not held and d.queued == 0
        assert set(d.sessions()) == {"", "a", "b"}

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_nested_call_passes_its_session_s_max_in_flight_and_waits_first(autojump_clock):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=10)
    d.configure("capped", max_in_flight=1)
    w, x = FakeWorker("w"), FakeWorker("x")
    d.add(w)
    d.add(x)
    assert await d.acquire(key="capped") is w  # the outer call: the session's one place
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("c1", "capped")  # from outside: held back by max_in_flight
        assert q.served == [] and d.queued == 1
        # made from inside the outer call (it waits for this one): a free worker takes it at once
        assert await d.acquire(key="capped", nested=True) is x
        assert d.sessions()["capped"].in_flight == 2 and q.served == []
        await q.release(x, "capped")
        assert q.served == [] and await d.acquire() is x  # c1 still held back; another class takes x

        async def nested() -> None:
            q.served.append(("nested", await d.acquire(key="capped", nested=True)))

        nursery.start_soon(nested)
        await trio.testing.wait_all_tasks_blocked()
        await q.release(x)
        assert q.served == [("nested", x)]  # at the front of its session's queue, past the cap
        await q.release(x, "capped")
        assert q.names() == ["nested"]  # c1 waits until the session's outer call ends
        await q.release(w, "capped")
        assert q.names() == ["nested", "c1"]


async def test_a_readmitted_call_is_not_refused_by_a_full_queue_and_waits_first(autojump_clock):
    d, w = await one_busy_worker(1)
    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        await q.start("fresh")
        with pytest.raises(PoolSaturatedError):
            await d.acquire()

        async def readmitted() -> None:  # a draining worker gave it back
            q.served.append(("readmitted", await d.acquire(readmitted=True)))

        nursery.start_soon(readmitted)
        await trio.testing.wait_all_tasks_blocked()
        assert d.queued == 2
        with pytest.raises(PoolSaturatedError, match="1 call"):  # it took none of max_queue's places
            await d.acquire()
        await q.release(w)
        assert q.names() == ["readmitted"]
        await q.release(w)
        assert q.names() == ["readmitted", "fresh"] and d.queued == 0
        await q.start("again")  # its place is free again
        assert d.queued == 1
        nursery.cancel_scope.cancel()


async def test_a_release_unparks_the_sessions_waiting_for_its_worker_one_at_a_time(autojump_clock, monkeypatch):
    d: Dispatcher[FakeWorker] = Dispatcher(max_queue=100)
    home, other = FakeWorker("home"), FakeWorker("other")
    d.add(home)
    d.add(other)  # free: the sessions' calls, all for home, park on it
    await d.acquire(home)
    unparked = collections.Counter[str]()
    unpark = Dispatcher._unpark

    def counting(self: Dispatcher[FakeWorker], queue: Any, *, front: bool = False) -> None:
        unparked[queue.key] += 1
        unpark(self, queue, front=front)

    async with trio.open_nursery() as nursery:
        q = Queued(d, nursery)
        for i in range(30):
            await q.start(f"s{i}", f"s{i}", home, "strict")
        monkeypatch.setattr(Dispatcher, "_unpark", counting)
        await q.release(home)
        assert q.names() == ["s0"] and sum(unparked.values()) == 1  # not all 30 sessions parked on it
        for i in range(1, 30):
            await q.release(home, f"s{i - 1}")
        assert q.names() == [f"s{i}" for i in range(30)]  # in the order they parked
        assert sum(unparked.values()) == 30
