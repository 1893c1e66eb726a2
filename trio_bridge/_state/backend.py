"""The state backend interface, and the in-memory backend (the default).

Callers -- the host's :class:`Session` objects and the HostService handlers that workers call
-- talk only to :class:`StateBackend`, so a shared backend (Redis, with pub/sub for watches)
can replace :class:`MemoryBackend` without touching them.
"""

from __future__ import annotations

import abc
import collections
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from trio_bridge._state.sessions import SessionRecord, SessionStore
from trio_bridge._state.variables import HistoryEntry, Variable, VariableUpdate

__all__ = ["MemoryBackend", "SessionInfo", "StateBackend", "VariableUpdate", "Watcher"]


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session. Times are on the Trio clock (seconds)."""

    id: str
    created_at: float
    last_used: float
    ttl: float | None
    metadata: Mapping[str, Any]
    variable_count: int
    state_version: int


class Watcher:
    """A watcher's pending updates: at most one per variable, so it is bounded by the number of
    watched variables however slow its reader is. Writers never wait for it: a newer update of a
    variable replaces the pending one (keeping its ``old_value`` and counting the fold)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._pending: collections.OrderedDict[str, VariableUpdate] = collections.OrderedDict()
        self._wakeup = trio.Event()
        self._closed = False
        self.coalesced = 0

    def push(self, update: VariableUpdate) -> None:
        if self._closed:
            return
        earlier = self._pending.get(update.name)
        if earlier is not None:
            self.coalesced += 1
            kind = earlier.kind if earlier.kind == "initial" and update.kind == "change" else update.kind
            update = VariableUpdate(
                update.name, earlier.old_value, update.new_value, update.version, update.source, kind,
                update.timestamp, earlier.coalesced + 1,
            )
        self._pending[update.name] = update
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def next_batch(self) -> list[VariableUpdate]:
        """Wait for pending updates and take them all, oldest first; ``[]`` once closed."""
        while not self._pending:
            if self._closed:
                return []
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        batch = list(self._pending.values())
        self._pending.clear()
        return batch

    def __aiter__(self) -> AsyncIterator[VariableUpdate]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[VariableUpdate]:
        while True:
            batch = await self.next_batch()
            if not batch:
                return
            for update in batch:
                yield update


class StateBackend(abc.ABC):
    """Sessions and their variables. All methods raise :class:`SessionNotFoundError` for an
    unknown session; variable methods raise the :class:`VariableError` subclasses of the
    operation (see :class:`~trio_bridge._state.variables.VariableStore`). Writes return the
    session's new ``state_version`` with their result."""

    on_session_end: list[Callable[[str], None]]

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
    def watch(self, session_id: str, names: list[str], *, include_initial: bool) -> Any:
        """An async context manager yielding a :class:`Watcher`. No update is lost between the
        initial snapshot and the first change; leaving the block frees the watcher."""
    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (the TTL reaper); run it in a nursery for the backend's lifetime."""


class MemoryBackend(StateBackend):
    """Everything in this process's memory. Session TTLs run on the Trio clock, so tests can
    use ``trio.testing.MockClock``."""

    def __init__(self, sessions: SessionStore | None = None) -> None:
        self.sessions = sessions if sessions is not None else SessionStore()  # an empty store is falsy
        self.on_session_end = []
        self._watchers: dict[str, set[Watcher]] = collections.defaultdict(set)
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
        for watcher in self._watchers.pop(record.id, ()):
            watcher.close()
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
    async def register_variable(self, session_id, name, type_name, value, *, constraints, metadata, source):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        variable = record.variables.register(name, type_name, value, constraints=constraints, metadata=metadata, source=source)
        record.state_version += 1
        self._notify(record, [VariableUpdate(name, None, variable.value, 0, source, "change", variable.created_at)])
        return variable, record.state_version

    async def get_variables(self, session_id, keys):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        if keys is None:
            found = {v.name: v for v in record.variables.list()}
        else:
            found = {}
            for key in keys:
                variable = record.variables.get(key)
                found[variable.name] = variable
        return found, record.state_version

    async def set_variable(self, session_id, key, value, *, expected_version, source, optimizer_id, metadata):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        variable, change = record.variables.set(
            key, value, expected_version=expected_version, source=source, optimizer_id=optimizer_id, metadata=metadata
        )
        if change is not None:
            record.state_version += 1
            self._notify(record, [change])
        return variable, record.state_version

    async def set_variables(self, session_id, updates, *, atomic, source, optimizer_id):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        results, changes = record.variables.set_many(updates, atomic=atomic, source=source, optimizer_id=optimizer_id)
        if changes:
            record.state_version += 1
            self._notify(record, changes)
        return results, record.state_version

    async def list_variables(self, session_id, pattern):  # type: ignore[no-untyped-def]
        return self._touch(session_id).variables.list(pattern)

    async def delete_variable(self, session_id, key, *, source):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        change = record.variables.delete(key, source=source)
        record.state_version += 1
        self._notify(record, [change])
        return record.state_version

    async def variable_history(self, session_id, key):  # type: ignore[no-untyped-def]
        return self._touch(session_id).variables.history(key)

    async def rollback_variable(self, session_id, key, version, *, source, optimizer_id):  # type: ignore[no-untyped-def]
        record = self._touch(session_id)
        variable, change = record.variables.rollback(key, version, source=source, optimizer_id=optimizer_id)
        if change is not None:
            record.state_version += 1
            self._notify(record, [change])
        return variable, record.state_version

    async def add_dependency(self, session_id, dependent, dependency):  # type: ignore[no-untyped-def]
        return self._touch(session_id).variables.add_dependency(dependent, dependency)

    async def set_optimization(self, session_id, key, optimizer_id, *, active):  # type: ignore[no-untyped-def]
        variables = self._touch(session_id).variables
        return variables.start_optimization(key, optimizer_id) if active else variables.stop_optimization(key, optimizer_id)

    @asynccontextmanager
    async def watch(self, session_id: str, names: list[str], *, include_initial: bool) -> AsyncIterator[Watcher]:
        record = self._touch(session_id)
        variables = [record.variables.get(name) for name in names]  # unknown names fail here
        watcher = Watcher(frozenset(v.name for v in variables))
        # Subscribe and snapshot with no checkpoint in between: no update can fall in the gap.
        self._watchers[session_id].add(watcher)
        if include_initial:
            now = time.time()
            for v in variables:
                watcher.push(VariableUpdate(v.name, None, v.value, v.version, v.source, "initial", now))
        try:
            yield watcher
        finally:
            watcher.close()
            self._watchers.get(session_id, set()).discard(watcher)

    # ---- internals ----
    def _touch(self, session_id: str) -> SessionRecord:
        return self.sessions.touch(session_id, trio.current_time())

    def _notify(self, record: SessionRecord, updates: list[VariableUpdate]) -> None:
        watchers = self._watchers.get(record.id)
        if not watchers:
            return
        for update in updates:
            for watcher in watchers:
                if update.name in watcher.names:
                    watcher.push(update)


def _info(record: SessionRecord) -> SessionInfo:
    return SessionInfo(
        id=record.id, created_at=record.created_at, last_used=record.last_used, ttl=record.ttl,
        metadata=dict(record.metadata), variable_count=len(record.variables), state_version=record.state_version,
    )
