"""Watching variables: every change in order while a watcher keeps up within its buffer, the
latest values with a count of what it skipped once it fell further behind, and writers that
never wait and pay nothing per watcher."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import trio
import trio.testing

from trio_bridge import InvalidArgumentError
from trio_bridge._state.backend import DEFAULT_WATCH_BUFFER, MemoryBackend
from trio_bridge._state.variables import VariableUpdate
from trio_bridge.worker._host_client import WatchBuffer


async def backend_with(*names: str) -> MemoryBackend:
    backend = MemoryBackend()
    await backend.create_session("s", ttl=None, metadata=None)
    for name in names:
        await backend.register_variable("s", name, "integer", 0, constraints=None, metadata=None, source="host")
    return backend


async def write(backend: MemoryBackend, name: str, value: int) -> None:
    await backend.set_variable("s", name, value, expected_version=None, source="host", optimizer_id=None, metadata=None)


def changes(updates: list[VariableUpdate]) -> list[tuple]:
    return [(u.kind, u.name, u.old_value, u.new_value, u.version, u.coalesced) for u in updates]


async def test_a_burst_of_writes_is_delivered_in_full_and_in_order():
    backend = await backend_with("t")
    seen = []
    async with backend.watch("s", ["t"], include_initial=True) as watcher, trio.open_nursery() as nursery:

        async def read() -> None:
            async for update in watcher:
                seen.append(update)
                if update.new_value == 6:
                    return

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        for value in range(1, 6):  # five quick writes: the reader does not run in between
            await write(backend, "t", value)
        await trio.testing.wait_all_tasks_blocked()
        await write(backend, "t", 6)
    assert [u.new_value for u in seen] == [0, 1, 2, 3, 4, 5, 6]
    assert [u.kind for u in seen] == ["initial"] + ["change"] * 6
    assert [u.old_value for u in seen[1:]] == [0, 1, 2, 3, 4, 5]
    assert [u.version for u in seen] == [0, 1, 2, 3, 4, 5, 6]
    assert all(u.coalesced == 0 for u in seen) and watcher.coalesced == 0


async def test_changes_of_several_variables_come_in_the_order_they_were_made():
    backend = await backend_with("t", "u", "other")
    async with backend.watch("s", ["u", "t"], include_initial=False) as watcher:
        for name, value in [("t", 1), ("u", 1), ("other", 1), ("u", 2), ("t", 2), ("t", 3), ("u", 3)]:
            await write(backend, name, value)
        await backend.set_variables("s", {"u": 4, "t": 4}, atomic=True, source="host", optimizer_id=None)
        await backend.delete_variable("s", "t", source="host")
        batch = await watcher.next_batch()
    assert [(u.name, u.new_value) for u in batch] == [
        ("t", 1), ("u", 1), ("u", 2), ("t", 2), ("t", 3), ("u", 3), ("u", 4), ("t", 4), ("t", None),
    ]
    assert batch[-1].kind == "delete"


async def test_a_full_buffer_is_still_delivered_in_full():
    backend = await backend_with("t")
    async with backend.watch("s", ["t"], include_initial=False, buffer_size=8) as watcher:
        for value in range(1, 9):
            await write(backend, "t", value)
        assert watcher.pending == 8
        batch = await watcher.next_batch()
    assert [u.new_value for u in batch] == list(range(1, 9)) and watcher.coalesced == 0


async def test_a_watcher_that_fell_behind_its_buffer_gets_the_latest_values_and_what_it_skipped():
    backend = await backend_with("t", "u")
    async with backend.watch("s", ["t", "u"], include_initial=True, buffer_size=8) as watcher:
        for value in range(1, 11):
            await write(backend, "t", value)
        for value in range(1, 6):
            await write(backend, "u", value)
        assert watcher.pending == 2 + 15  # initial values, then 15 changes: over 8
        batch = await watcher.next_batch()
        assert changes(batch) == [
            ("initial", "t", None, 0, 0, 0), ("initial", "u", None, 0, 0, 0),  # never folded
            ("change", "t", 0, 10, 10, 9),  # old_value: what this watcher saw last
            ("change", "u", 0, 5, 5, 4),
        ]
        assert watcher.coalesced == 13
        # Caught up: every change again.
        await write(backend, "u", 6)
        await write(backend, "t", 11)
        assert changes(await watcher.next_batch()) == [("change", "u", 5, 6, 6, 0), ("change", "t", 10, 11, 11, 0)]
        # Far behind again, past what the backend keeps: still the latest, with the right counts.
        for value in range(12, 12 + 3 * DEFAULT_WATCH_BUFFER):
            await write(backend, "t", value)
        (update,) = await watcher.next_batch()
        assert (update.old_value, update.new_value, update.coalesced) == (11, 11 + 3 * DEFAULT_WATCH_BUFFER, 3 * DEFAULT_WATCH_BUFFER - 1)


async def test_buffers_are_per_watcher():
    backend = await backend_with("t")
    async with backend.watch("s", ["t"], include_initial=False, buffer_size=2) as small:
        async with backend.watch("s", ["t"], include_initial=False, buffer_size=100) as large:
            for value in range(1, 51):
                await write(backend, "t", value)
            assert [u.new_value for u in await large.next_batch()] == list(range(1, 51))
            assert changes(await small.next_batch()) == [("change", "t", 0, 50, 50, 49)]


async def test_a_slow_watcher_never_makes_the_writer_wait(autojump_clock):
    backend = await backend_with("t")
    got: list[VariableUpdate] = []
    async with backend.watch("s", ["t"], include_initial=False, buffer_size=5) as watcher, trio.open_nursery() as nursery:

        async def slow_reader() -> None:
            async for update in watcher:
                got.append(update)
                await trio.sleep(1.0)  # ten times slower than the writer

        nursery.start_soon(slow_reader)
        start = trio.current_time()
        for value in range(1, 101):
            await write(backend, "t", value)
            await trio.sleep(0.1)
        assert trio.current_time() - start == pytest.approx(10.0)  # on schedule: it never waited
        while not got or got[-1].new_value != 100:
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert sum(1 + u.coalesced for u in got) == 100  # every write accounted for
    assert [u.version for u in got] == sorted({u.version for u in got})
    assert any(u.coalesced for u in got) and watcher.coalesced == sum(u.coalesced for u in got)
    assert all(b.old_value == a.new_value for a, b in itertools.pairwise(got))


class CountScheduled(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_a_write_wakes_one_task_whatever_the_number_of_watchers():
    backend = await backend_with("t")
    received = [0] * 1000
    async with trio.open_nursery() as nursery:

        async def watch(index: int, task_status: trio.TaskStatus[None]) -> None:
            async with backend.watch("s", ["t"], include_initial=False) as watcher:
                task_status.started()
                async for _ in watcher:
                    received[index] += 1

        for index in range(1000):
            await nursery.start(watch, index)
        scheduled = CountScheduled()
        for value in range(1, 4):
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(scheduled)
            with trio.CancelScope() as scope:
                scope.cancel()  # a checkpoint in the write would raise Cancelled
                for burst in range(100):
                    await write(backend, "t", value * 1000 + burst)
            trio.lowlevel.remove_instrument(scheduled)
            assert not scope.cancelled_caught
            assert scheduled.count <= 1  # the watchers' leader; it wakes the others
            scheduled.count = 0
        await trio.testing.wait_all_tasks_blocked()
        assert received == [300] * 1000
        nursery.cancel_scope.cancel()


class Crowd:
    """``count`` watchers of ``t``, each in a task of its own that one can cancel by index."""

    def __init__(self) -> None:
        self.received: dict[int, list[int]] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.watchers: dict[int, Any] = {}

    async def start(self, nursery: trio.Nursery, backend: MemoryBackend, count: int) -> None:
        for index in range(count):
            self.received[index] = []
            await nursery.start(self._watch, backend, index)

    async def _watch(self, backend: MemoryBackend, index: int, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self.scopes[index]:
            async with backend.watch("s", ["t"], include_initial=False) as self.watchers[index]:
                task_status.started()
                async for update in self.watchers[index]:
                    self.received[index].append(update.new_value)


async def test_watchers_keep_getting_updates_when_their_leader_leaves():
    backend = await backend_with("t")
    crowd = Crowd()
    async with trio.open_nursery() as nursery:
        await crowd.start(nursery, backend, 4)
        feed = backend._feeds["s"]
        for value in range(1, 4):
            await trio.testing.wait_all_tasks_blocked()
            leader = next(i for i, w in crowd.watchers.items() if w is feed.leader)
            crowd.scopes[leader].cancel()
            await trio.testing.wait_all_tasks_blocked()
            await write(backend, "t", value)
            await trio.testing.wait_all_tasks_blocked()
            del crowd.watchers[leader]
            assert all(crowd.received[i][-1] == value for i in crowd.watchers)
        (last,) = crowd.watchers
        assert crowd.received[last] == [1, 2, 3]
        nursery.cancel_scope.cancel()
    assert "s" not in backend._feeds  # all gone: nothing kept for nobody


async def test_watchers_that_leave_while_asleep_are_not_woken_and_the_rest_still_are():
    backend = await backend_with("t")
    crowd = Crowd()
    async with trio.open_nursery() as nursery:
        await crowd.start(nursery, backend, 5)
        await trio.testing.wait_all_tasks_blocked()
        feed = backend._feeds["s"]
        followers = [i for i, w in crowd.watchers.items() if w is not feed.leader]
        for index in followers[:2]:  # asleep, and not the leader
            crowd.scopes[index].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert len(feed.watchers) == 3
        await write(backend, "t", 1)
        await write(backend, "t", 2)
        await trio.testing.wait_all_tasks_blocked()
        stayed = {i for i in crowd.watchers if i not in followers[:2]}
        assert {i: v for i, v in crowd.received.items() if v} == {i: [1, 2] for i in stayed}
        nursery.cancel_scope.cancel()
    assert "s" not in backend._feeds


async def test_closing_a_watcher_ends_an_iteration_waiting_in_another_task():
    backend = await backend_with("t")
    async with backend.watch("s", ["t"], include_initial=False) as first, backend.watch("s", ["t"], include_initial=False) as second:
        ended = []
        async with trio.open_nursery() as nursery:

            async def read(watcher) -> None:
                ended.append([u.new_value async for u in watcher])

            nursery.start_soon(read, first)
            nursery.start_soon(read, second)
            await trio.testing.wait_all_tasks_blocked()
            first.close()
            second.close()
    assert ended == [[], []]


async def test_what_was_pending_is_delivered_before_the_end_of_the_session_ends_the_watch():
    backend = await backend_with("t")
    async with backend.watch("s", ["t"], include_initial=True) as watcher:
        await write(backend, "t", 1)
        await write(backend, "t", 2)
        await backend.cleanup_session("s")
        assert [u.new_value async for u in watcher] == [0, 1, 2]
    assert backend._feeds == {}


async def test_buffer_size_must_be_a_positive_number_of_updates():
    backend = await backend_with("t")
    bad: Any
    for bad in (0, -1, 1.5):
        with pytest.raises(InvalidArgumentError, match="buffer_size"):
            async with backend.watch("s", ["t"], include_initial=True, buffer_size=bad):
                pass
    assert backend._feeds == {}


def test_the_worker_side_buffer_coalesces_like_the_host_once_full():
    def update(name: str, old: int | None, new: int, kind: str = "change", coalesced: int = 0) -> VariableUpdate:
        return VariableUpdate(name, old, new, new, "host", kind, 0.0, coalesced)

    async def main() -> None:
        buffer = WatchBuffer(3)
        buffer.add([update("t", None, 0, "initial"), update("t", 0, 1), update("u", 0, 1)])
        buffer.add([update("t", 1, 2)])
        assert [(u.name, u.new_value, u.coalesced) for u in await buffer.take()] == [
            ("t", 0, 0), ("t", 1, 0), ("u", 1, 0), ("t", 2, 0),  # three changes: within the buffer
        ]
        buffer.add([update("t", 2, 3), update("u", 1, 2), update("t", 3, 4)])
        buffer.add([update("u", 2, 9, coalesced=6)])  # the host folded six before this one
        buffer.add([update("t", 4, 5)])  # overflowed: folded too, until the reader takes them
        assert [(u.name, u.old_value, u.new_value, u.coalesced) for u in await buffer.take()] == [
            ("u", 1, 9, 7), ("t", 2, 5, 2),
        ]
        buffer.add([update("t", 5, 6)])
        buffer.finish(RuntimeError("stream broke"))
        assert [(u.new_value, u.coalesced) for u in await buffer.take()] == [(6, 0)]  # what was pending first
        with pytest.raises(RuntimeError, match="stream broke"):
            await buffer.take()

    asyncio.run(main())
