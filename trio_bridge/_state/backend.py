"""The state backend interface, and the in-memory backend (the default).

Callers -- the host's :class:`Session` objects and the HostService handlers that workers call
-- talk only to :class:`StateBackend`, so a shared backend (Redis, with pub/sub for watches)
can replace :class:`MemoryBackend` without touching them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, final

import trio

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._state.calls import DEFAULT_IDEMPOTENCY_TTL, DEFAULT_MAX_IDEMPOTENCY_RECORDS, Claim, MemoryCalls
from trio_bridge._state.sessions import SessionInfo, SessionRecord, SessionStore
from trio_bridge._state.variables import HistoryEntry, Variable, VariableUpdate
from trio_bridge._util import public_module
from trio_bridge._wire.contract import DEFAULT_WATCH_BUFFER

__all__ = ["DEFAULT_WATCH_BUFFER", "MemoryBackend", "MemoryWatcher", "SessionInfo", "StateBackend", "VariableUpdate", "Watcher"]


class _Log:
    """The recent updates of one watched variable: a ring of the last ``len(ring)`` of them,
    numbered from 0 in the order they were made (``count`` so far). Appending is O(1)."""

    __slots__ = ("count", "ring", "watchers")

    def __init__(self, capacity: int) -> None:
        self.ring: list[tuple[int, VariableUpdate] | None] = [None] * capacity
        self.count = 0
        self.watchers = 0

    def append(self, seq: int, update: VariableUpdate) -> None:
        self.ring[self.count % len(self.ring)] = (seq, update)
        self.count += 1

    def __getitem__(self, n: int) -> tuple[int, VariableUpdate]:
        """Update number ``n`` and its session-wide sequence number; only the last
        ``len(ring)`` are kept (callers check)."""
        entry = self.ring[n % len(self.ring)]
        assert entry is not None
        return entry

    def reserve(self, capacity: int) -> None:
        """Keep at least the last ``capacity`` updates from now on."""
        old = self.ring
        if capacity <= len(old):
            return
        self.ring = [None] * capacity
        for n in range(max(0, self.count - len(old)), self.count):
            self.ring[n % capacity] = old[n % len(old)]


class _Feed:
    """A session's updates as its watchers read them.

    The writer's side is O(1) however many watchers there are: :meth:`publish` appends each
    update once to its variable's :class:`_Log` (only variables someone watches have one) and
    sets :attr:`kick`, an event that at most one task -- the *leader*, one of the sleeping
    watchers -- waits on. The leader, once woken, wakes the others (:attr:`sleepers`, parked
    tasks) from its own task, off the writer's path. Each watcher holds a cursor into
    each of its logs and reads lazily; one that fell more than its buffer behind gets the
    latest value of each variable instead (see :class:`Watcher`).
    """

    def __init__(self) -> None:
        self.seq = 0  # updates published, session-wide: their order across variables
        self.logs: dict[str, _Log] = {}
        self.watchers: set[MemoryWatcher] = set()
        self.closed = False
        self.kick = trio.Event()  # set by writers; the leader waits on it
        # the other sleeping watchers' tasks, woken by the leader: parked by hand rather than on
        # an Event, whose ParkingLot costs about a microsecond more per watcher woken
        self.sleepers: dict[trio.lowlevel.Task, None] = {}
        self.leader: MemoryWatcher | None = None

    def publish(self, updates: list[VariableUpdate]) -> None:
        published = False
        for update in updates:
            log = self.logs.get(update.name)
            if log is not None:
                self.seq += 1
                log.append(self.seq, update)
                published = True
        if published:
            self.kick.set()  # wakes one task at most

    def broadcast(self) -> None:
        sleepers, self.sleepers = self.sleepers, {}
        for task in sleepers:
            trio.lowlevel.reschedule(task)

    async def sleep(self, watcher: MemoryWatcher) -> None:
        """Until something was published (or, rarely, for no reason: callers check)."""
        if self.leader is not None:
            task = trio.lowlevel.current_task()
            sleepers = self.sleepers
            sleepers[task] = None

            def abort(_: Any) -> trio.lowlevel.Abort:
                del sleepers[task]  # still there: a woken task is no longer abortable
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            return
        self.leader = watcher
        try:
            await self.kick.wait()
        finally:  # woken, or cancelled: either way the others must not sleep with no leader
            self.leader = None
            self.kick = trio.Event()
            self.broadcast()

    def close(self) -> None:
        self.closed = True
        self.kick.set()
        self.broadcast()


class Watcher(abc.ABC):
    """What :meth:`StateBackend.watch` yields: an async iterator of :class:`VariableUpdate`
    (initial values first when asked for, then every change, in the order they were made).

    Writers never wait for a watcher. While it is at most ``buffer_size`` updates behind, it
    gets every one of them; once it fell further behind, its next batch holds only the latest
    update of each variable that changed, with ``coalesced`` saying how many earlier ones that
    variable's update stands for (and ``old_value`` the value this watcher last saw).
    Iteration ends when the session ends (after what was pending) or the watch is left.

    Attributes:
        names: the watched variables' names.
        buffer_size: how many updates it may fall behind by before it coalesces.
        coalesced: how many updates it skipped in all.
    """

    def __init__(self, names: list[str], buffer_size: int) -> None:
        self.names: frozenset[str] = frozenset(names)
        self.buffer_size: int = buffer_size
        self.coalesced: int = 0
        self._batch: list[VariableUpdate] = []  # taken by next_batch, not yet iterated over
        self._next = 0

    @abc.abstractmethod
    def close(self) -> None:
        """Stop: the iteration ends (also for a task waiting in it)."""

    @abc.abstractmethod
    async def next_batch(self) -> list[VariableUpdate]:
        """Wait for updates and take all that are pending, oldest first; ``[]`` once the watch
        was left, or the session ended and nothing is pending. (Iterate, or call this: an
        iteration's batch taken and not yet iterated over is not seen here.)"""

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> VariableUpdate:
        # a plain iterator rather than an async generator: one frame less per update, which
        # counts when a write wakes a thousand watchers
        if self._next == len(self._batch):
            batch = await self.next_batch()
            if not batch:
                raise StopAsyncIteration
            self._batch, self._next = batch, 0
        update = self._batch[self._next]
        self._next += 1
        return update


@final
class MemoryWatcher(Watcher):
    """:class:`MemoryBackend`'s watcher. It keeps a cursor into the session's recent updates
    rather than a queue of its own, so writers pay nothing per watcher."""

    def __init__(
        self, feed: _Feed, names: list[str], buffer_size: int, seen: dict[str, Any], initial: list[VariableUpdate]
    ) -> None:
        super().__init__(names, buffer_size)
        self._feed = feed
        self._logs = {name: feed.logs[name] for name in names}
        self._only = next(iter(self._logs.items())) if len(self._logs) == 1 else None
        self._cursors = {name: log.count for name, log in self._logs.items()}
        self._seen = seen  # name -> the value this watcher last saw (for a coalesced old_value)
        self._initial = initial
        self._checked = feed.seq  # the feed's seq when this watcher last read it
        self._closed = False
        self._sleeping = False

    def __repr__(self) -> str:
        state = "closed" if self._closed or self._feed.closed else f"{self.pending} pending"
        return f"<Watcher {sorted(self.names)} buffer_size={self.buffer_size} {state}>"

    @property
    def pending(self) -> int:
        """Updates published and not read yet (before any coalescing)."""
        return len(self._batch) - self._next + len(self._initial) + sum(log.count - self._cursors[name] for name, log in self._logs.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sleeping:
            if self._feed.leader is self:
                self._feed.kick.set()
            else:
                self._feed.broadcast()

    async def next_batch(self) -> list[VariableUpdate]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._closed:
            batch = self._take()
            if batch:
                return batch
            if self._feed.closed:
                break
            self._sleeping = True
            try:
                await self._feed.sleep(self)
            finally:
                self._sleeping = False
        return []

    def _take(self) -> list[VariableUpdate]:
        batch, self._initial = self._initial, []
        if self._feed.seq == self._checked:
            return batch
        self._checked = self._feed.seq
        if self._only is not None:  # one variable, not too far behind: the common case, kept short
            name, log = self._only
            cursor = self._cursors[name]
            if log.count - cursor <= self.buffer_size:
                if log.count != cursor:
                    for n in range(cursor, log.count):
                        batch.append(log[n][1])
                    self._cursors[name] = log.count
                    self._seen[name] = batch[-1].new_value
                return batch
        behind = [(name, log, self._cursors[name]) for name, log in self._logs.items() if log.count != self._cursors[name]]
        if not behind:
            return batch
        if sum(log.count - cursor for _, log, cursor in behind) <= self.buffer_size:
            if len(behind) == 1:
                _, log, cursor = behind[0]
                batch.extend(log[n][1] for n in range(cursor, log.count))
            else:
                entries = [log[n] for _, log, cursor in behind for n in range(cursor, log.count)]
                entries.sort(key=_seq)
                batch.extend(update for _, update in entries)
        else:  # fell too far behind: the latest of each, with what it stands for
            latest = []
            for name, log, cursor in behind:
                seq, update = log[log.count - 1]
                skipped = log.count - cursor - 1
                self.coalesced += skipped
                latest.append((seq, dataclasses.replace(update, old_value=self._seen[name], coalesced=skipped)))
            latest.sort(key=_seq)
            batch.extend(update for _, update in latest)
        for name, log, _ in behind:
            self._cursors[name] = log.count
            self._seen[name] = log[log.count - 1][1].new_value
        return batch

def _seq(entry: tuple[int, VariableUpdate]) -> int:
    return entry[0]


@public_module
class StateBackend(abc.ABC):
    """Sessions and their variables. All methods raise :class:`SessionNotFoundError` for an
    unknown session; variable methods raise the :class:`VariableError` subclasses of the
    operation (see :class:`~trio_bridge._state.variables.VariableStore`). Writes return the
    session's new ``state_version`` with their result."""

    on_session_end: list[Callable[[str], None]]
    #: seconds an optimization lock lasts unless its holder takes it again (holders renew it
    #: while their ``optimizing`` block runs); ``None``: held until released.
    lock_lease: float | None = None

    @abc.abstractmethod
    async def create_session(self, session_id: str | None, *, ttl: float | None, metadata: dict[str, Any] | None) -> SessionInfo: ...
    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionInfo: ...
    @abc.abstractmethod
    async def touch_session(self, session_id: str) -> SessionInfo:
        """Mark the session used now (its TTL restarts) and return it."""
    @abc.abstractmethod
    async def cleanup_session(self, session_id: str) -> bool: ...
    @abc.abstractmethod
    async def register_variable(self, session_id: str, name: str, type_name: str, value: Any, *, constraints: dict[str, Any] | None, metadata: dict[str, Any] | None, source: str) -> tuple[Variable, int]: ...
    @abc.abstractmethod
    async def get_variables(self, session_id: str, keys: list[str] | None) -> tuple[dict[str, Variable], int]: ...
    @abc.abstractmethod
    async def set_variable(self, session_id: str, key: str, value: Any, *, expected_version: int | None, source: str, optimizer_id: str | None, metadata: dict[str, Any] | None) -> tuple[Variable, int]: ...
    @abc.abstractmethod
    async def set_variables(self, session_id: str, updates: Mapping[str, Any], *, atomic: bool, source: str, optimizer_id: str | None) -> tuple[dict[str, Variable | Exception], int]: ...
    @abc.abstractmethod
    async def list_variables(self, session_id: str, pattern: str) -> list[Variable]: ...
    @abc.abstractmethod
    async def delete_variable(self, session_id: str, key: str, *, source: str) -> int: ...
    @abc.abstractmethod
    async def variable_history(self, session_id: str, key: str) -> list[HistoryEntry]: ...
    @abc.abstractmethod
    async def rollback_variable(self, session_id: str, key: str, version: int, *, source: str, optimizer_id: str | None) -> tuple[Variable, int]: ...
    @abc.abstractmethod
    async def add_dependency(self, session_id: str, dependent: str, dependency: str) -> Variable: ...
    @abc.abstractmethod
    async def set_optimization(self, session_id: str, key: str, optimizer_id: str, *, active: bool) -> Variable: ...
    @abc.abstractmethod
    def watch(
        self, session_id: str, names: list[str], *, include_initial: bool, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AbstractAsyncContextManager[Watcher]:
        """An async context manager yielding a :class:`Watcher`. No update is lost between the
        initial snapshot and the first change; leaving the block frees the watcher. Writers
        never wait for watchers; one more than ``buffer_size`` updates behind coalesces.

        Raises:
            VariableNotFoundError: a name is not a variable of the session.
            InvalidArgumentError: ``buffer_size`` is below 1.
        """
    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (the TTL reaper); run it in a nursery for the backend's lifetime."""

    def gauges(self) -> dict[str, int]:
        """What the backend holds now, for metrics: any of ``"sessions"``, ``"variables"`` and
        ``"watchers"`` (this process's) it can count cheaply and without I/O; may be called
        from another thread."""
        return {}

    # ---- idempotent calls (``Pool.execute(..., idempotency_key=...)``) ----
    # Concrete, so that a backend written before them still works without them: these raise.

    #: the largest record (bytes) :meth:`finish_call` keeps; ``None``: no limit.
    max_value_bytes: int | None = None

    @property
    def command_timeout(self) -> float | None:
        """Seconds one command to the backend may take before it fails (a shared backend's);
        ``None``: it has no such bound (in-memory). An idempotent call's claim lasts at least
        three of them, so that a renewal that timed out can be tried again before it lapses."""
        return None

    async def claim_call(self, key: str, fingerprint: str, lease: float) -> Claim:
        """Claim idempotency key ``key`` for a call whose ``fingerprint`` (an opaque str) says
        what it runs, atomically: a free key (or one whose holder's lease of ``lease`` seconds
        lapsed) is claimed for ``lease`` seconds; otherwise say who has it (see :class:`Claim`).
        Keys are global to the backend.

        Raises:
            InvalidArgumentError: the backend does not keep idempotent calls.
            QuotaExceededError: the backend keeps as many keys as it may, all running calls'.
            StateUnavailableError: a shared backend cannot be reached.
        """
        raise self._no_idempotent_calls()

    async def renew_call(self, key: str, token: str, lease: float) -> bool:
        """Extend the holder's claim by ``lease`` seconds from now; ``False``: ``token`` no
        longer holds it (its lease lapsed and another caller took it)."""
        raise self._no_idempotent_calls()

    async def finish_call(self, key: str, token: str, record: bytes) -> bool:
        """Keep ``record`` as the call's outcome (``idempotency_ttl`` seconds) and wake its
        waiters; ``False``: ``token`` no longer holds the key (nothing is written)."""
        raise self._no_idempotent_calls()

    async def release_call(self, key: str, token: str) -> bool:
        """Free the key without a record (the call did not finish); ``False``: ``token`` no
        longer held it."""
        raise self._no_idempotent_calls()

    async def wait_call(self, key: str, poll: float) -> None:
        """Wait until the key's claim may have changed: it was finished or released, or its
        lease lapsed; a backend that cannot be told polls, returning after about ``poll``
        seconds. Callers claim again after it."""
        raise self._no_idempotent_calls()

    def _no_idempotent_calls(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"the state backend {type(self).__name__} does not keep idempotent calls (it implements no "
            "StateBackend.claim_call): call without idempotency_key, or use MemoryBackend or RedisBackend"
        )


@public_module
class MemoryBackend(StateBackend):
    """Everything in this process's memory. Session TTLs, and idempotent calls' leases and
    records, run on the Trio clock, so tests can use ``trio.testing.MockClock``.

    Args:
        sessions: the session store (its quotas); default: a new one with the default quotas.
        lock_lease: seconds an optimization lock lasts unless renewed (``None``: until released).
        idempotency_ttl: seconds an idempotent call's record lives after its last write
            (default 3600).
        max_idempotency_records: idempotency keys (running calls' claims and records) kept
            at most (default 100,000); beyond it the oldest records are dropped first (their
            keys are new again, as when they expire), and a new key is refused with
            ``QuotaExceededError`` while every key kept is a running call's.

    Raises:
        InvalidArgumentError: ``idempotency_ttl`` is not a positive number of seconds, or
            ``max_idempotency_records`` not a whole number >= 1.
    """

    def __init__(
        self, sessions: SessionStore | None = None, *, lock_lease: float | None = None,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL, max_idempotency_records: int = DEFAULT_MAX_IDEMPOTENCY_RECORDS,
    ) -> None:
        self.sessions: SessionStore = sessions if sessions is not None else SessionStore()  # an empty store is falsy
        self.lock_lease = lock_lease
        self.calls: MemoryCalls = MemoryCalls(idempotency_ttl, max_idempotency_records)
        self.max_value_bytes: int | None = self.sessions.max_value_bytes
        self.on_session_end: list[Callable[[str], None]] = []
        self._feeds: dict[str, _Feed] = {}  # sessions that have watchers
        self._reaper_wakeup = trio.Event()

    # ---- sessions ----
    async def create_session(self, session_id: str | None, *, ttl: float | None, metadata: dict[str, Any] | None) -> SessionInfo:
        record = self.sessions.create(session_id, ttl=ttl, metadata=metadata, now=trio.current_time())
        self._reaper_wakeup.set()
        return _info(record)

    async def get_session(self, session_id: str) -> SessionInfo:
        return _info(self.sessions.get(session_id))

    async def touch_session(self, session_id: str) -> SessionInfo:
        return _info(self.sessions.touch(session_id, trio.current_time()))

    async def cleanup_session(self, session_id: str) -> bool:
        record = self.sessions.remove(session_id)
        if record is None:
            return False
        self._end(record)
        return True

    def _end(self, record: SessionRecord) -> None:
        feed = self._feeds.pop(record.id, None)
        if feed is not None:
            feed.close()
        for callback in self.on_session_end:
            callback(record.id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            for record in self.sessions.pop_expired(trio.current_time()):
                self._end(record)
            next_expiry = self.sessions.next_expiry()
            self._reaper_wakeup = trio.Event()
            with trio.move_on_at(math.inf if next_expiry is None else next_expiry):
                await self._reaper_wakeup.wait()

    # ---- variables ----
    async def register_variable(
        self, session_id: str, name: str, type_name: str, value: Any, *, constraints: dict[str, Any] | None,
        metadata: dict[str, Any] | None, source: str,
    ) -> tuple[Variable, int]:
        record = self._touch(session_id)
        variable = record.variables.register(name, type_name, value, constraints=constraints, metadata=metadata, source=source)
        record.state_version += 1
        self._notify(record, [VariableUpdate(name, None, variable.value, 0, source, "change", variable.created_at)])
        return variable, record.state_version

    async def get_variables(self, session_id: str, keys: list[str] | None) -> tuple[dict[str, Variable], int]:
        record = self._touch(session_id)
        if keys is None:
            found = {v.name: v for v in record.variables.list()}
        else:
            found = {}
            for key in keys:
                variable = record.variables.get(key)
                found[variable.name] = variable
        return found, record.state_version

    async def set_variable(
        self, session_id: str, key: str, value: Any, *, expected_version: int | None, source: str,
        optimizer_id: str | None, metadata: dict[str, Any] | None,
    ) -> tuple[Variable, int]:
        record = self._touch(session_id)
        variable, change = record.variables.set(
            key, value, expected_version=expected_version, source=source, optimizer_id=optimizer_id, metadata=metadata
        )
        if change is not None:
            record.state_version += 1
            self._notify(record, [change])
        return variable, record.state_version

    async def set_variables(
        self, session_id: str, updates: Mapping[str, Any], *, atomic: bool, source: str, optimizer_id: str | None
    ) -> tuple[dict[str, Variable | Exception], int]:
        record = self._touch(session_id)
        results, changes = record.variables.set_many(updates, atomic=atomic, source=source, optimizer_id=optimizer_id)
        if changes:
            record.state_version += 1
            self._notify(record, changes)
        return results, record.state_version

    async def list_variables(self, session_id: str, pattern: str) -> list[Variable]:
        return self._touch(session_id).variables.list(pattern)

    async def delete_variable(self, session_id: str, key: str, *, source: str) -> int:
        record = self._touch(session_id)
        change = record.variables.delete(key, source=source)
        record.state_version += 1
        self._notify(record, [change])
        return record.state_version

    async def variable_history(self, session_id: str, key: str) -> list[HistoryEntry]:
        return self._touch(session_id).variables.history(key)

    async def rollback_variable(
        self, session_id: str, key: str, version: int, *, source: str, optimizer_id: str | None
    ) -> tuple[Variable, int]:
        record = self._touch(session_id)
        variable, change = record.variables.rollback(key, version, source=source, optimizer_id=optimizer_id)
        if change is not None:
            record.state_version += 1
            self._notify(record, [change])
        return variable, record.state_version

    async def add_dependency(self, session_id: str, dependent: str, dependency: str) -> Variable:
        record = self._touch(session_id)
        variable = record.variables.add_dependency(dependent, dependency)
        record.state_version += 1  # workers' caches hold depends_on too
        return variable

    async def set_optimization(self, session_id: str, key: str, optimizer_id: str, *, active: bool) -> Variable:
        record = self._touch(session_id)
        variables = record.variables
        if active:
            variable = variables.start_optimization(key, optimizer_id, lease=self.lock_lease)
        else:
            variable = variables.stop_optimization(key, optimizer_id)
        record.state_version += 1  # workers' caches hold optimizer_id too
        return variable

    @asynccontextmanager
    async def watch(
        self, session_id: str, names: list[str], *, include_initial: bool, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[Watcher]:
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise InvalidArgumentError(f"buffer_size must be a positive number of updates, not {buffer_size!r}")
        record = self._touch(session_id)
        variables = list({v.name: v for v in (record.variables.get(name) for name in names)}.values())  # unknown names fail here
        # Subscribe and snapshot with no checkpoint in between: no update can fall in the gap.
        feed = self._feeds.get(session_id)
        if feed is None:
            feed = self._feeds[session_id] = _Feed()
        for v in variables:
            log = feed.logs.get(v.name)
            if log is None:
                log = feed.logs[v.name] = _Log(buffer_size)
            log.reserve(buffer_size)
            log.watchers += 1
        now = time.time()
        initial = [VariableUpdate(v.name, None, v.value, v.version, v.source, "initial", now) for v in variables] if include_initial else []
        watcher = MemoryWatcher(feed, [v.name for v in variables], buffer_size, {v.name: v.value for v in variables}, initial)
        feed.watchers.add(watcher)
        try:
            yield watcher
        finally:
            watcher.close()
            feed.watchers.discard(watcher)
            for v in variables:
                log = feed.logs[v.name]
                log.watchers -= 1
                if not log.watchers:
                    del feed.logs[v.name]
            if not feed.watchers and self._feeds.get(session_id) is feed:
                del self._feeds[session_id]

    # ---- idempotent calls ----
    async def claim_call(self, key: str, fingerprint: str, lease: float) -> Claim:
        await trio.lowlevel.checkpoint()
        return self.calls.claim(key, fingerprint, lease)

    async def renew_call(self, key: str, token: str, lease: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self.calls.renew(key, token, lease)

    async def finish_call(self, key: str, token: str, record: bytes) -> bool:
        return self.calls.finish(key, token, record)  # no checkpoint: callers finish when shielded

    async def release_call(self, key: str, token: str) -> bool:
        return self.calls.release(key, token)

    async def wait_call(self, key: str, poll: float) -> None:
        await self.calls.wait(key)

    def gauges(self) -> dict[str, int]:
        records = self.sessions.records()
        return {
            "sessions": len(records),
            "variables": sum(len(r.variables) for r in records),
            "watchers": sum(len(feed.watchers) for feed in list(self._feeds.values())),
        }

    # ---- internals ----
    def _touch(self, session_id: str) -> SessionRecord:
        return self.sessions.touch(session_id, trio.current_time())

    def _notify(self, record: SessionRecord, updates: list[VariableUpdate]) -> None:
        feed = self._feeds.get(record.id)
        if feed is not None:
            feed.publish(updates)


def _info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        id=record.id, created_at=record.created_at, last_used=record.last_used, ttl=record.ttl,
        metadata=dict(record.metadata), variable_count=len(record.variables), state_version=record.state_version,
    )
