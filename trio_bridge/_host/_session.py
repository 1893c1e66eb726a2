"""Sessions as the host application sees them: variables, watching, optimization, calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import trio

from trio_bridge._errors import SessionNotFoundError
from trio_bridge._host._groups import UserErrorTracker
from trio_bridge._host._leases import keep_renewed
from trio_bridge._host._python_calls import PythonCalls
from trio_bridge._state.backend import DEFAULT_WATCH_BUFFER, SessionInfo, StateBackend, Watcher
from trio_bridge._state.types import VariableType
from trio_bridge._state.variables import HistoryEntry, Variable
from trio_bridge._util import NoPublicConstructor, public_module

if TYPE_CHECKING:
    from trio_bridge._host._dispatch import Affinity
    from trio_bridge._host._router import Route
    from trio_bridge._host._tools import ToolInfo, ToolRegistry

_SOURCE = "host"


class SessionCalls(Protocol):
    """What a session needs of the pool: calls along its route."""

    async def execute(
        self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None, affinity: Affinity | None = None,
        *, idempotency_key: str | None = None,
    ) -> Any: ...

    def stream(
        self, tool: str, arguments: dict[str, Any] | None, buffer_size: int, route: Route | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]: ...


@final
@public_module
class Session(PythonCalls, metaclass=NoPublicConstructor):
    """A session of a pool: typed variables shared with its workers, and calls with affinity
    (the "call any Python" methods, ``call``, ``pipeline``, ``retrieve``, ``list_stored`` and
    ``delete_stored``, for a pool of the ``PythonAdapter``).

    Made by :meth:`Pool.session`, not by users. Variable methods raise the errors of
    :class:`~trio_bridge._state.variables.VariableStore` (``InvalidVariableError``,
    ``VersionConflictError``, ``VariableLockedError``, ``VariableNotFoundError``,
    ``DependencyCycleError``, ``QuotaExceededError``), and :class:`SessionNotFoundError` once
    the session has ended; a refused write changes nothing.

    Attributes:
        id: the session id.
        affinity: ``"prefer"``, ``"strict"`` or ``"strict_fail_fast"``.
        worker_id: the id of the worker that serves it, once a call has run.
        moves: how many times it moved to another worker because its worker died.
    """

    _calls: SessionCalls

    def __init__(
        self, calls: SessionCalls, tools: ToolRegistry, pool_tools: Callable[[], list[ToolInfo]], state: StateBackend,
        route: Route,
    ) -> None:
        self._calls = calls
        self._tools = tools
        self._pool_tools = pool_tools
        self._state = state
        self._route = route
        self.id: Final[str] = route.session_id

    def __repr__(self) -> str:
        return f"<Session {self.id} affinity={self.affinity} worker={self.worker_id}>"

    @property
    def affinity(self) -> Affinity:
        return self._route.affinity

    @property
    def moves(self) -> int:
        return self._route.moves

    @property
    def worker_id(self) -> str | None:
        home = self._route.home
        return None if home is None else home.id

    async def info(self) -> SessionInfo:
        return await self._state.get_session(self.id)

    # ---- calls ----
    async def execute(self, tool: str, arguments: dict[str, Any] | None = None, *, idempotency_key: str | None = None) -> Any:
        """:meth:`Pool.execute` in this session: on its worker when the affinity allows, and with
        its variables visible to the tool (a tool that starts after a write returned sees it).
        An ``idempotency_key`` belongs to this session: the same key from another session (or
        none) is an ``IdempotencyConflictError``."""
        return await self._calls.execute(tool, arguments, self._route, idempotency_key=idempotency_key)

    def stream(
        self, tool: str, arguments: dict[str, Any] | None = None, *, buffer_size: int = 64
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """:meth:`Pool.stream` in this session."""
        return self._calls.stream(tool, arguments, buffer_size, self._route)

    # ---- tools ----
    def register_host_tool(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        streaming: bool | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Register a host tool that only this session's calls can see (see
        :meth:`Pool.host_tool`); it goes away with the session."""
        self._tools.register(
            function, name=name, description=description, streaming=streaming, metadata=metadata, session_id=self.id
        )

    def tools(self) -> list[ToolInfo]:
        """What this session's calls can use: the pool's tools and this session's host tools."""
        own = [t.info() for t in self._tools.host_tools(self.id) if t.session_id == self.id]
        return sorted([*self._pool_tools(), *own], key=lambda t: t.name)

    # ---- variables ----
    async def register_variable(
        self, name: str, type: VariableType, value: Any, *, constraints: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None
    ) -> Variable:
        """Create a variable at version 0.

        Args:
            name: letters, digits, ``_ . -``; starting with a letter or ``_``.
            type: ``float, integer, string, boolean, choice, module, embedding, tensor``.
            value: its initial value, checked against the type and constraints.
            constraints: per type (see ``trio_bridge._state.types``), checked here too.
        """
        variable, _ = await self._state.register_variable(
            self.id, name, type, value, constraints=constraints, metadata=metadata, source=_SOURCE
        )
        return variable

    async def get_variable(self, name: str) -> Variable:
        """By name or id."""
        found, _ = await self._state.get_variables(self.id, [name])
        return next(iter(found.values()))

    async def get_variables(self, names: list[str]) -> dict[str, Any]:
        """Values by name, in one call."""
        found, _ = await self._state.get_variables(self.id, list(names))
        return {name: variable.value for name, variable in found.items()}

    async def set_variable(self, name: str, value: Any, *, expected_version: int | None = None, metadata: dict[str, Any] | None = None) -> Variable:
        """Set a value; ``expected_version`` makes it conditional (``VersionConflictError``).
        Setting an equal value changes nothing and notifies nobody."""
        variable, _ = await self._state.set_variable(
            self.id, name, value, expected_version=expected_version, source=_SOURCE, optimizer_id=None, metadata=metadata
        )
        return variable

    async def set_variables(self, updates: Mapping[str, Any], *, atomic: bool = True) -> dict[str, Variable | Exception]:
        """Set several variables. ``atomic=True``: all or nothing (the first error is raised).
        ``atomic=False``: each on its own; the result maps names to Variables or to errors."""
        results, _ = await self._state.set_variables(self.id, dict(updates), atomic=atomic, source=_SOURCE, optimizer_id=None)
        return results

    async def list_variables(self, pattern: str = "*") -> list[str]:
        """Names matching a glob pattern (``"temp*"``), sorted."""
        return [v.name for v in await self._state.list_variables(self.id, pattern)]

    async def delete_variable(self, name: str) -> None:
        await self._state.delete_variable(self.id, name, source=_SOURCE)

    async def variable_history(self, name: str) -> list[HistoryEntry]:
        """Past values, oldest first (bounded: 50 by default)."""
        return await self._state.variable_history(self.id, name)

    async def rollback_variable(self, name: str, *, version: int) -> Variable:
        """Set the value the variable had at ``version``; this makes a new version."""
        variable, _ = await self._state.rollback_variable(self.id, name, version, source=_SOURCE, optimizer_id=None)
        return variable

    async def add_dependency(self, dependent: str, dependency: str) -> Variable:
        """Record that ``dependent`` depends on ``dependency``; a cycle raises DependencyCycleError."""
        return await self._state.add_dependency(self.id, dependent, dependency)

    @asynccontextmanager
    async def optimizing(self, name: str, *, optimizer_id: str) -> AsyncIterator[Optimization]:
        """Hold the variable's optimization lock for the block: writes by anyone else are
        refused with ``VariableLockedError`` until it ends (or the session ends).

        With a backend whose locks are leases (``RedisBackend``), the lock is renewed every
        third of its lease while the block runs, so it lapses only if this host dies.

        Raises:
            VariableLockedError: another optimizer holds it.
        """
        await self._state.set_optimization(self.id, name, optimizer_id, active=True)
        tracker = UserErrorTracker()  # the block's own exception leaves as itself, not in a group
        try:
            with tracker.resolve_groups():
                async with trio.open_nursery() as renewal:
                    lease = self._state.lock_lease
                    if lease is not None:
                        renewal.start_soon(keep_renewed, partial(_renew_optimization, self._state, self.id, name, optimizer_id), lease)
                    with tracker.user_block():
                        yield Optimization._create(self, name, optimizer_id)
                    renewal.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._state.set_optimization(self.id, name, optimizer_id, active=False)
                except SessionNotFoundError:
                    pass  # the session ended: its locks went with it

    @asynccontextmanager
    async def watch_variables(
        self, names: list[str], *, include_initial: bool = True, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[Watcher]:
        """Watch variables: the block gets an async iterator of ``VariableUpdate`` (``.name
        .old_value .new_value .version .source .kind .coalesced``): initial values first, then
        every change, in order, none lost between the two. Writers never wait for a watcher:
        one that falls more than ``buffer_size`` updates behind gets, next, only the latest
        value of each variable that changed, with ``coalesced`` counting the updates it skipped
        (``Watcher.coalesced``: all it skipped). Iteration ends when the session ends.

        Raises:
            VariableNotFoundError: a name is not a variable of the session.
            InvalidArgumentError: ``buffer_size`` is below 1.
        """
        async with self._state.watch(self.id, list(names), include_initial=include_initial, buffer_size=buffer_size) as watcher:
            yield watcher


async def _renew_optimization(state: StateBackend, session_id: str, name: str, optimizer_id: str) -> bool:
    """Take the held optimization lock again (its lease restarts); a lost lock shows on the
    holder's next write, so renewing goes on."""
    await state.set_optimization(session_id, name, optimizer_id, active=True)
    return True


@final
@public_module
class Optimization(metaclass=NoPublicConstructor):
    """The holder's handle inside :meth:`Session.optimizing`."""

    def __init__(self, session: Session, name: str, optimizer_id: str) -> None:
        self._session = session
        self.name: Final[str] = name
        self.optimizer_id: Final[str] = optimizer_id

    async def set(self, value: Any) -> Variable:
        variable, _ = await self._session._state.set_variable(
            self._session.id, self.name, value, expected_version=None,
            source=f"optimizer:{self.optimizer_id}", optimizer_id=self.optimizer_id, metadata=None,
        )
        return variable
