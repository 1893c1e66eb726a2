"""The context a tool receives when it declares a parameter annotated ``SessionContext``."""

from __future__ import annotations

import asyncio
import fnmatch
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from trio_bridge._errors import TrioBridgeError, VariableNotFoundError
from trio_bridge._state.variables import Variable, VariableUpdate

if TYPE_CHECKING:
    from trio_bridge.worker._host_client import SessionLink

__all__ = ["SessionContext"]


class SessionContext:
    """Per-call context handed to a tool.

    Attributes:
        session_id: the session the call belongs to (``""`` outside a session).
        call_id: the host's id for this call.
        deadline: ``time.monotonic()`` value by which the caller wants the result, or ``None``.

    Variables: inside a session, ``ctx.variables`` holds the session's variables as they were
    when the call started (read from a cache kept coherent by the session's state version: no
    round trip per read, and never stale at call start). Writes go to the host, are validated
    there, and raise the host's error when refused (nothing changes then). Sync tools use the
    plain methods; async tools use the ``a``-prefixed awaitable forms (a blocking call on the
    worker's event loop would deadlock it, so the plain forms refuse to run there).

    Cancellation: sync tools cannot be interrupted from outside their thread; a long-running one
    should check :attr:`cancelled` now and then. Async tools are cancelled for real and
    generators are closed, so they need no such check.
    """

    __slots__ = ("_cancelled", "_link", "_watches", "call_id", "deadline", "session_id")

    def __init__(self, session_id: str, call_id: str, deadline: float | None, link: SessionLink | None = None) -> None:
        self.session_id = session_id
        self.call_id = call_id
        self.deadline = deadline
        self._cancelled = threading.Event()
        self._link = link
        self._watches: list[Any] = []  # closed when the call ends

    # ---- cancellation and deadline ----
    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call (or its deadline passed)."""
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block a sync tool's thread up to ``timeout`` seconds until the call is cancelled.

        Returns:
            True if the call was cancelled. Useful as an interruptible ``time.sleep``.
        """
        return self._cancelled.wait(timeout)

    def time_remaining(self) -> float | None:
        """Seconds left until :attr:`deadline` (may be negative), or ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _cancel(self) -> None:
        self._cancelled.set()

    # ---- variables: reads (from the cache; work in sync and async tools) ----
    @property
    def variables(self) -> Variables:
        """The session's variables as a mapping of name -> value; assigning an item sets the
        variable (sync tools only: async tools ``await ctx.aset_variable(...)``)."""
        return Variables(self)

    def get_variable(self, name: str, *, fresh: bool = False) -> Variable:
        """The variable (``.value``, ``.version``, ``.type``, ...) by name or id, as of the
        call's start (no round trip); with ``fresh=True``, as of now (one round trip; sync tools
        only -- async tools ``await ctx.aget_variable(name)``).

        Raises:
            VariableNotFoundError: no such variable (when the call started, or now if fresh).
        """
        if fresh:
            return self._blocking(self._session().get_variable(name))
        cache = self._session().cache
        variable = cache.variables.get(name) or next((v for v in cache.variables.values() if v.id == name), None)
        if variable is None:
            raise VariableNotFoundError(f"no variable named {name!r} in session {self.session_id!r}")
        return variable

    async def aget_variable(self, name: str) -> Variable:
        """The variable as of now, from the host (one round trip), for async tools."""
        return await self._session().get_variable(name)

    def list_variables(self, pattern: str = "*") -> list[str]:
        """Names of the session's variables matching a glob ``pattern``, sorted."""
        return sorted(n for n in self._session().cache.variables if fnmatch.fnmatchcase(n, pattern))

    # ---- variables: writes (a round trip to the host) ----
    def set_variable(self, name: str, value: Any, *, expected_version: int | None = None) -> Variable:
        """Set a variable (validated by the host). Sync tools only.

        Raises:
            InvalidVariableError, VersionConflictError, VariableLockedError, VariableNotFoundError,
            QuotaExceededError: the host refused; nothing changed.
        """
        return self._blocking(self._session().set_variable(name, value, expected_version))

    async def aset_variable(self, name: str, value: Any, *, expected_version: int | None = None) -> Variable:
        """:meth:`set_variable` for async tools."""
        return await self._session().set_variable(name, value, expected_version)

    def register_variable(self, name: str, type: str, value: Any, *, constraints: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Variable:
        """Register a new variable in the session. Sync tools only."""
        return self._blocking(self._session().register_variable(name, type, value, constraints, metadata))

    async def aregister_variable(self, name: str, type: str, value: Any, *, constraints: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Variable:
        """:meth:`register_variable` for async tools."""
        return await self._session().register_variable(name, type, value, constraints, metadata)

    @contextmanager
    def batch_updates(self) -> Iterator[dict[str, Any]]:
        """Collect writes and send them in one round trip, atomically (all or nothing), when the
        block ends without an exception. Sync tools only::

            with ctx.batch_updates() as batch:
                batch["temperature"] = 0.5
                batch["model"] = "large"
        """
        batch: dict[str, Any] = {}
        yield batch
        if batch:
            self._blocking(self._session().set_variables(batch))

    @asynccontextmanager
    async def abatch_updates(self) -> AsyncIterator[dict[str, Any]]:
        """:meth:`batch_updates` for async tools (``async with ctx.abatch_updates() as batch``)."""
        batch: dict[str, Any] = {}
        yield batch
        if batch:
            await self._session().set_variables(batch)

    def watch_variables(self, names: list[str], *, include_initial: bool = True) -> AsyncIterator[VariableUpdate]:
        """Updates of ``names`` as they happen (async tools): initial values first when
        ``include_initial``, then every change. Ends when the session ends; stops when the
        tool's call ends."""
        watch = self._session().watch(names, include_initial)
        self._watches.append(watch)
        return watch

    async def _close_watches(self) -> None:
        for watch in self._watches:
            await watch.aclose()
        self._watches.clear()

    # ---- internals ----
    def _session(self) -> SessionLink:
        if self._link is None:
            raise TrioBridgeError(
                "this call is not in a session: variables live in sessions "
                "(call the tool through `async with pool.session() as session: await session.execute(...)`)"
            )
        return self._link

    def _blocking(self, coro: Any) -> Any:
        link = self._session()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is link.loop:
            coro.close()
            raise RuntimeError(
                "this SessionContext method blocks, and async tools run on the worker's event loop: "
                "use its awaitable form (e.g. `await ctx.aset_variable(...)`)"
            )
        return asyncio.run_coroutine_threadsafe(coro, link.loop).result()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<SessionContext session={self.session_id!r} call={self.call_id!r} {state}>"


class Variables(Mapping[str, Any]):
    """``ctx.variables``: name -> value of the session's variables as of the call's start."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: SessionContext) -> None:
        self._ctx = ctx

    def __getitem__(self, name: str) -> Any:
        try:
            return self._ctx.get_variable(name).value
        except VariableNotFoundError as exc:
            raise KeyError(name) from exc

    def __setitem__(self, name: str, value: Any) -> None:
        self._ctx.set_variable(name, value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ctx.list_variables())

    def __len__(self) -> int:
        return len(self._ctx.list_variables())

    def __repr__(self) -> str:
        return f"<Variables {dict(self)!r}>"
