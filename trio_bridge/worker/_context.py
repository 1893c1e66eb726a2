"""The context a tool receives when it declares a parameter annotated ``SessionContext``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import inspect
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, final

from trio_bridge import _tracing as tracing
from trio_bridge._errors import InvalidArgumentError, SessionNotFoundError, TrioBridgeError, VariableNotFoundError
from trio_bridge._state.types import VariableType
from trio_bridge._state.variables import HistoryEntry, Variable, VariableUpdate
from trio_bridge._util import NoPublicConstructor
from trio_bridge._wire import shared_memory
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import timeout_to_wire
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge.worker._host_client import (
    DEFAULT_WATCH_BUFFER,
    SessionInfo,
    client_call_tool,
    client_list_host_tools,
    client_stream_host_tool,
    running_loop,
)

if TYPE_CHECKING:
    from trio_bridge.worker._host_client import HostClient, SessionLink

__all__ = ["SessionContext", "SessionInfo", "WorkerOptimization"]


_CANCEL_EVENTS = threading.Lock()  # makes and sets SessionContext's cancel events in step


@final
class SessionContext(metaclass=NoPublicConstructor):
    """Per-call context handed to a tool (made by the worker, not by users).

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

    __slots__ = ("_cancel_event", "_cancelled", "_host", "_link", "_pending", "_watches", "call_id", "deadline", "session_id")

    def __init__(
        self,
        session_id: str,
        call_id: str,
        deadline: float | None,
        link: SessionLink | None = None,
        host: HostClient | None = None,
    ) -> None:
        self.session_id: Final[str] = session_id
        self.call_id: Final[str] = call_id
        self.deadline: Final[float | None] = deadline
        self._cancelled = False
        self._cancel_event: threading.Event | None = None  # made when a thread first waits for it (most calls never do)
        self._link = link
        self._host = host
        self._watches: list[Any] = []  # closed when the call ends
        self._pending: set[concurrent.futures.Future[Any]] = set()  # blocking calls, cancelled with the call

    # ---- cancellation and deadline ----
    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call (or its deadline passed)."""
        return self._cancelled

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block a sync tool's thread up to ``timeout`` seconds until the call is cancelled.

        Returns:
            True if the call was cancelled. Useful as an interruptible ``time.sleep``.
        """
        event = self._cancel_event
        if event is None:
            with _CANCEL_EVENTS:
                event = self._cancel_event
                if event is None:
                    event = self._cancel_event = threading.Event()
                    if self._cancelled:
                        event.set()
        return event.wait(timeout)

    def time_remaining(self) -> float | None:
        """Seconds left until :attr:`deadline` (may be negative), or ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    # ---- arrays ----
    def empty(self, shape: int | tuple[int, ...], dtype: Any = float) -> Any:
        """A new writable numpy array (like ``numpy.empty``; contents arbitrary: fill all of it)
        that the tool returns **without a copy**: it lives in the pool's shared memory (at least
        the pool's ``shared_memory_threshold`` bytes; smaller, or without shared memory, e.g. a
        remote worker, it is a plain ``numpy.empty`` array, copied like any other). Write the
        result into it (``numpy.add(a, 1, out=out)``) and return it, or a contiguous view of it.

        Returning it makes it read-only for good (later writes raise ``ValueError: assignment
        destination is read-only``, and so does ``out.flags.writeable = True``), so the caller's
        result never changes after the call; an array of which another view is alive when it
        is returned is copied instead (a raw pointer or ``memoryview`` over it is not such a
        view: do not write through one later).

        Args:
            shape: an int or a sequence of ints >= 0 (elements).
            dtype: a numpy dtype (or what ``numpy.dtype`` takes), neither object nor structured.

        Raises:
            InvalidArgumentError: ``shape`` or ``dtype`` is not one of those.
            OSError: ``/dev/shm`` is full (``ENOSPC``).
        """
        return shared_memory.empty(shared_memory.default_plane, shape, dtype)

    def _cancel(self) -> None:
        with _CANCEL_EVENTS:  # in step with wait_cancelled making the event
            self._cancelled = True
            event = self._cancel_event
        if event is not None:
            event.set()
        for future in list(self._pending):
            future.cancel()  # cancels the host call (and so the host tool) a sync tool waits on

    # ---- variables: reads (from the cache; work in sync and async tools) ----
    @property
    def variables(self) -> Variables:
        """The session's variables as a mapping of name -> value; assigning an item sets the
        variable (sync tools only: async tools ``await ctx.aset_variable(...)``)."""
        return Variables._create(self)

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

    def list_variables(self, pattern: str = "*", *, fresh: bool = False) -> list[str]:
        """Names of the session's variables matching a glob ``pattern`` (``"temp*"``), sorted:
        as of the call's start and this call's own writes (no round trip); with
        ``fresh=True``, as of now (one round trip; sync tools only -- async tools
        ``await ctx.alist_variables(pattern)``)."""
        if fresh:
            return [v.name for v in self._blocking(self._session().list_variables(pattern))]
        return sorted(n for n in self._session().cache.variables if fnmatch.fnmatchcase(n, pattern))

    async def alist_variables(self, pattern: str = "*") -> list[str]:
        """The names matching ``pattern`` as of now, from the host (one round trip), for async tools."""
        return [v.name for v in await self._session().list_variables(pattern)]

    def variable_history(self, name: str, limit: int | None = None) -> list[HistoryEntry]:
        """Past and current values of a variable (``.version .value .updated_at .source``),
        oldest first: the host keeps a bounded history (50 by default); ``limit``: only the
        newest ``limit`` of them. One round trip; sync tools only.

        Raises:
            VariableNotFoundError: no such variable.
        """
        return _newest(self._blocking(self._session().variable_history(name)), limit)

    async def avariable_history(self, name: str, limit: int | None = None) -> list[HistoryEntry]:
        """:meth:`variable_history` for async tools."""
        return _newest(await self._session().variable_history(name), limit)

    def session_info(self) -> SessionInfo:
        """The session now (``.id .ttl .metadata .variable_count .state_version``). One round
        trip; sync tools only.

        Raises:
            SessionNotFoundError: the session ended.
        """
        return self._blocking(self._session().session_info())

    async def asession_info(self) -> SessionInfo:
        """:meth:`session_info` for async tools."""
        return await self._session().session_info()

    # ---- variables: writes (a round trip to the host) ----
    def set_variable(self, name: str, value: Any, *, expected_version: int | None = None) -> Variable:
        """Set a variable (validated by the host). Sync tools only.

        Raises:
            VariableError: the host refused (``InvalidVariableError``, ``VersionConflictError``,
                ``VariableLockedError``, ``VariableNotFoundError``); nothing changed.
            QuotaExceededError: the host refused; nothing changed.
        """
        return self._blocking(self._session().set_variable(name, value, expected_version))

    async def aset_variable(self, name: str, value: Any, *, expected_version: int | None = None) -> Variable:
        """:meth:`set_variable` for async tools."""
        return await self._session().set_variable(name, value, expected_version)

    def register_variable(self, name: str, type: VariableType, value: Any, *, constraints: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Variable:
        """Register a new variable in the session. Sync tools only."""
        return self._blocking(self._session().register_variable(name, type, value, constraints, metadata))

    async def aregister_variable(self, name: str, type: VariableType, value: Any, *, constraints: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Variable:
        """:meth:`register_variable` for async tools."""
        return await self._session().register_variable(name, type, value, constraints, metadata)

    def delete_variable(self, name: str) -> None:
        """Delete a variable (and the dependency edges to it). Sync tools only.

        Raises:
            VariableNotFoundError: no such variable.
            VariableLockedError: an optimizer holds it.
        """
        self._blocking(self._session().delete_variable(name))

    async def adelete_variable(self, name: str) -> None:
        """:meth:`delete_variable` for async tools."""
        await self._session().delete_variable(name)

    def rollback_variable(self, name: str, version: int) -> Variable:
        """Set the value the variable had at ``version`` (still in its history); this makes a
        new version. Sync tools only.

        Raises:
            VariableNotFoundError: no such variable, or ``version`` is no longer in its history.
            VariableLockedError, InvalidVariableError: the host refused; nothing changed.
        """
        return self._blocking(self._session().rollback_variable(name, version))

    async def arollback_variable(self, name: str, version: int) -> Variable:
        """:meth:`rollback_variable` for async tools."""
        return await self._session().rollback_variable(name, version)

    def add_dependency(self, dependent: str, dependency: str) -> Variable:
        """Record that ``dependent`` depends on ``dependency`` and return ``dependent``. Sync
        tools only.

        Raises:
            DependencyCycleError: it would make a cycle (nothing is recorded).
            VariableNotFoundError: either is not a variable.
        """
        return self._blocking(self._session().add_dependency(dependent, dependency))

    async def aadd_dependency(self, dependent: str, dependency: str) -> Variable:
        """:meth:`add_dependency` for async tools."""
        return await self._session().add_dependency(dependent, dependency)

    @contextmanager
    def optimizing(self, name: str, *, optimizer_id: str) -> Iterator[WorkerOptimization]:
        """Hold the variable's optimization lock for the block: writes by anyone else (the host,
        other tools) are refused with ``VariableLockedError`` until it ends -- however it ends,
        the call's cancellation included. Write through the handle: ``opt.set(value)``. Sync
        tools only; async tools ``async with ctx.aoptimizing(...)``.

        Raises:
            VariableLockedError: another optimizer holds it.
            VariableNotFoundError: no such variable.
        """
        link = self._session()
        if not optimizer_id:
            raise InvalidArgumentError("an optimizer_id is required")
        # Neither taking nor releasing the lock is cut short by the call's cancellation: a lock
        # taken on the host with its reply lost would stay held.
        _, lease = self._blocking(link.set_optimization(name, optimizer_id, active=True), cancellable=False)
        stop_renewing = self._renew_lock(link, name, optimizer_id, lease)
        try:
            yield WorkerOptimization._create(self, name, optimizer_id)
        finally:
            stop_renewing()
            try:  # not cancelled with the call: the lock must not outlive the block
                self._blocking(link.set_optimization(name, optimizer_id, active=False), cancellable=False)
            except SessionNotFoundError:
                pass  # the session ended: its locks went with it

    def _renew_lock(self, link: SessionLink, name: str, optimizer_id: str, lease: float) -> Callable[[], object]:
        """From a sync tool's thread: renew a held lock in the background (``lease`` seconds; 0:
        it needs none) until the returned function is called."""
        if not lease:
            return lambda: None
        return asyncio.run_coroutine_threadsafe(link.keep_optimization(name, optimizer_id, lease), link.client.loop).cancel

    @asynccontextmanager
    async def aoptimizing(self, name: str, *, optimizer_id: str) -> AsyncIterator[WorkerOptimization]:
        """:meth:`optimizing` for async tools: ``async with ctx.aoptimizing(...) as opt:
        await opt.aset(value)``."""
        link = self._session()
        if not optimizer_id:
            raise InvalidArgumentError("an optimizer_id is required")
        acquire = asyncio.ensure_future(link.set_optimization(name, optimizer_id, active=True))
        try:
            await _shielded(acquire)
        except asyncio.CancelledError:
            if not acquire.cancelled() and acquire.exception() is None:  # taken all the same
                await _shielded(link.set_optimization(name, optimizer_id, active=False))
            raise
        _, lease = acquire.result()
        renewal = asyncio.ensure_future(link.keep_optimization(name, optimizer_id, lease)) if lease else None
        try:
            yield WorkerOptimization._create(self, name, optimizer_id)
        finally:
            if renewal is not None:
                renewal.cancel()
            try:
                await _shielded(link.set_optimization(name, optimizer_id, active=False))
            except SessionNotFoundError:
                pass

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

    def watch_variables(
        self, names: list[str], *, include_initial: bool = True, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[VariableUpdate]:
        """Updates of ``names`` as they happen (async tools): initial values first when
        ``include_initial``, then every change, in order. Writers never wait for this watcher:
        once it is more than ``buffer_size`` updates behind, it gets only the latest value of
        each variable that changed, with ``.coalesced`` counting the updates it skipped. Ends
        when the session ends; stops when the tool's call ends (unless a task the tool leaves
        running still reads it: then it ends with the session, or when that task stops reading).

        Raises:
            InvalidArgumentError: ``buffer_size`` is below 1.
        """
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise InvalidArgumentError(f"buffer_size must be a positive number of updates, not {buffer_size!r}")
        watch = self._session().watch(names, include_initial, buffer_size)
        self._watches.append(watch)
        return watch

    async def _close_watches(self) -> None:
        watches, self._watches = self._watches, []
        for watch in watches:
            if getattr(watch, "ag_running", False):  # a task the tool left behind reads it: that task's
                continue  # (aclose() would raise; it ends with the session)
            await watch.aclose()

    # ---- tools in both directions ----
    def call_host_tool(self, name: str, /, **arguments: Any) -> Any:
        """Call a host tool (registered with ``pool.host_tool`` or ``session.register_host_tool``)
        and return its result. Sync tools only; async tools ``await ctx.acall_host_tool(...)``.
        Cancelling this tool's call cancels the host tool; the call's deadline applies to it.

        Raises:
            ToolNotFoundError: no such host tool (the message lists the available ones).
            InvalidArgumentError: the arguments do not fit its parameters.
            ToolError: the host tool raised (with the host's traceback).
        """
        return self._blocking(client_call_tool(self._client(), True, self._request(name, arguments)))

    async def acall_host_tool(self, name: str, /, **arguments: Any) -> Any:
        """:meth:`call_host_tool` for async tools."""
        return await client_call_tool(self._client(), True, self._request(name, arguments))

    def stream_host_tool(self, name: str, /, **arguments: Any) -> Iterator[Any]:
        """Iterate over a streaming host tool's chunks (sync tools)."""
        batches = client_stream_host_tool(self._client(), self._request(name, arguments))
        try:
            while True:
                try:
                    batch = self._blocking(batches.__anext__())
                except StopAsyncIteration:
                    return
                yield from batch
        finally:
            self._close_from_thread(batches)

    def _close_from_thread(self, stream: AsyncGenerator[Any, None]) -> None:
        """Close ``stream`` (the host client's) from a sync tool's thread, without waiting."""
        asyncio.run_coroutine_threadsafe(stream.aclose(), self._client().loop)

    async def astream_host_tool(self, name: str, /, **arguments: Any) -> AsyncIterator[Any]:
        """Iterate over a streaming host tool's chunks (async tools)."""
        batches = client_stream_host_tool(self._client(), self._request(name, arguments))
        try:
            async for batch in batches:
                for chunk in batch:
                    yield chunk
        finally:
            await batches.aclose()

    def call_tool(self, name: str, /, **arguments: Any) -> Any:
        """Call a tool of any worker of the pool (routed by the host, in this call's session).
        Sync tools only; async tools ``await ctx.acall_tool(...)``."""
        return self._blocking(client_call_tool(self._client(), False, self._request(name, arguments)))

    async def acall_tool(self, name: str, /, **arguments: Any) -> Any:
        """:meth:`call_tool` for async tools."""
        return await client_call_tool(self._client(), False, self._request(name, arguments))

    @property
    def host_tools(self) -> HostTools:
        """The host tools as functions: ``ctx.host_tools.lookup(word="cat")``, each with the
        tool's ``__doc__`` and ``__signature__``; ``ctx.host_tools["name.with.dots"]`` works too.
        Sync tools only (listing them is a round trip); async tools ``await ctx.ahost_tools()``."""
        return HostTools._create(self, self._blocking(client_list_host_tools(self._client(), self.session_id)), asynchronous=False)

    async def ahost_tools(self) -> HostTools:
        """:attr:`host_tools` for async tools: its functions are coroutine functions."""
        return HostTools._create(self, await client_list_host_tools(self._client(), self.session_id), asynchronous=True)

    def _request(self, name: str, arguments: dict[str, Any]) -> pb.ExecuteToolRequest:
        remaining = self.time_remaining()
        return pb.ExecuteToolRequest(
            tool_name=name, arguments=encode(arguments, path="arguments"), session_id=self.session_id,
            call_id=self.call_id, timeout_seconds=timeout_to_wire(remaining),
            traceparent=tracing.current_traceparent(),
        )

    def _client(self) -> HostClient:
        if self._host is None:
            raise TrioBridgeError("this worker has no connection to a host (it was not started by a pool)")
        return self._host

    # ---- internals ----
    def _session(self) -> SessionLink:
        if self._link is None:
            raise TrioBridgeError(
                "this call is not in a session: variables live in sessions "
                "(call the tool through `async with pool.session() as session: await session.execute(...)`)"
            )
        return self._link

    def _blocking(self, coro: Any, *, cancellable: bool = True) -> Any:
        loop = self._client().loop
        if running_loop() is loop:
            coro.close()
            raise RuntimeError(
                "this SessionContext method blocks, and async and inline tools run on the worker's event loop: "
                "use its awaitable form in an async tool (e.g. `await ctx.aset_variable(...)`, "
                "`await ctx.acall_host_tool(...)`); a sync tool that needs it cannot be inline"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        if not cancellable:
            return future.result()
        self._pending.add(future)
        try:
            return future.result()
        finally:
            self._pending.discard(future)

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<SessionContext session={self.session_id!r} call={self.call_id!r} {state}>"


@final
class WorkerOptimization(metaclass=NoPublicConstructor):
    """A tool's handle on an optimization lock it holds, inside :meth:`SessionContext.optimizing`
    (or ``aoptimizing``): its writes pass the lock (the host's handle is ``trio_bridge.Optimization``).

    Attributes:
        name: the variable.
        optimizer_id: the lock's holder.
    """

    __slots__ = ("_ctx", "name", "optimizer_id")

    def __init__(self, ctx: SessionContext, name: str, optimizer_id: str) -> None:
        self._ctx = ctx
        self.name: Final[str] = name
        self.optimizer_id: Final[str] = optimizer_id

    def __repr__(self) -> str:
        return f"<WorkerOptimization {self.name!r} by {self.optimizer_id!r}>"

    def set(self, value: Any) -> Variable:
        """Set the variable (validated by the host). Sync tools only.

        Raises:
            InvalidVariableError: the host refused the value; nothing changed.
        """
        return self._ctx._blocking(self._ctx._session().set_variable(self.name, value, None, self.optimizer_id))

    async def aset(self, value: Any) -> Variable:
        """:meth:`set` for async tools."""
        return await self._ctx._session().set_variable(self.name, value, None, self.optimizer_id)


async def _shielded(awaitable: Any) -> Any:
    """Run ``awaitable`` to its end even if the awaiting task is cancelled meanwhile: the
    cancellation is raised once it finished."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation wins
        raise


def _newest(entries: list[HistoryEntry], limit: int | None) -> list[HistoryEntry]:
    if limit is None:
        return entries
    if not isinstance(limit, int) or limit < 0:
        raise InvalidArgumentError(f"limit must be a non-negative integer or None, not {limit!r}")
    return entries[len(entries) - limit:] if limit else []


@final
class HostTools(metaclass=NoPublicConstructor):
    """``ctx.host_tools``: the host tools this call can see, as functions."""

    def __init__(self, ctx: SessionContext, specs: list[pb.ToolSpec], *, asynchronous: bool) -> None:
        self._tools = {spec.name: _proxy(ctx, spec, asynchronous) for spec in specs}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._tools[name]
        except KeyError:
            raise AttributeError(
                f"no host tool named {name!r}; available: {', '.join(sorted(self._tools)) or '(none)'}"
            ) from None

    __getitem__ = __getattr__

    def __dir__(self) -> list[str]:
        return sorted(self._tools)

    def __repr__(self) -> str:
        return f"<HostTools {', '.join(sorted(self._tools))}>"


def _proxy(ctx: SessionContext, spec: pb.ToolSpec, asynchronous: bool) -> Any:
    if spec.streaming:
        function: Any = ctx.astream_host_tool if asynchronous else ctx.stream_host_tool
    else:
        function = ctx.acall_host_tool if asynchronous else ctx.call_host_tool

    if asynchronous and not spec.streaming:
        # One of two definitions by design (the other one is sync).
        async def proxy(**arguments: Any) -> Any:  # pyright: ignore[reportRedeclaration]
            return await function(spec.name, **arguments)
    else:
        def proxy(**arguments: Any) -> Any:
            return function(spec.name, **arguments)

    parameters = [
        inspect.Parameter(
            p.name, inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if p.required else decode(p.default),
            annotation=p.type or inspect.Parameter.empty,
        )
        for p in spec.parameters
    ]
    proxy.__name__ = proxy.__qualname__ = spec.name
    proxy.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    described = [f"{p.name}: {p.description}" for p in spec.parameters if p.description]
    proxy.__doc__ = spec.description + ("\n\nArgs:\n    " + "\n    ".join(described) if described else "")
    return proxy


@final
class Variables(Mapping[str, Any], metaclass=NoPublicConstructor):
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


def cancel_call(ctx: SessionContext) -> None:
    """For the worker runtime: the call was cancelled, or its deadline passed (``ctx.cancelled``)."""
    ctx._cancel()


def session_link(ctx: SessionContext) -> SessionLink:
    """For the worker runtimes: the link to the call's session.

    Raises:
        TrioBridgeError: the call is not in a session.
    """
    return ctx._session()


def keep_watch(ctx: SessionContext, watch: Any) -> None:
    """For the worker runtimes: a watch its tool opened, closed by :func:`end_call` at the latest."""
    ctx._watches.append(watch)


async def end_call(ctx: SessionContext) -> None:
    """For the worker runtime: the call is over; close the watches its tool left open."""
    await ctx._close_watches()
