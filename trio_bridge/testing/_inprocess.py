"""Adapters in process: test an adapter's tools on Trio's clock, without processes or a wire.

:func:`open_adapter_pool` yields a real :class:`~trio_bridge.Pool` -- the same dispatcher,
supervisor, calls, sessions, host tools and statistics as :func:`~trio_bridge.open_pool` --
whose workers run your :class:`~trio_bridge.worker.Adapter` in this process, in the test's
Trio run: ``setup()`` once per worker, ``async def`` tools as Trio tasks (cancelled with their
call), sync tools in Trio worker threads, generators as streaming tools. So a test of tools,
session variables and host tools can run on ``trio.testing.MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock`` fixture), where an hour of ``trio.sleep`` costs no time::

    from trio_bridge.testing import open_adapter_pool

    async def test_slow_tool(autojump_clock):
        async with open_adapter_pool("myapp.adapters:Agent", adapter_options={"model": "tiny"}) as pool:
            with trio.fail_after(10):
                assert await pool.execute("answer", {"question": "2+2"}) == "4"

What the worker side is here: the workers are the pool's in-memory workers of
:func:`~trio_bridge.testing.open_fake_pool`, running the adapter's tools; the context a tool
gets (a parameter annotated ``SessionContext``) is backed by the worker side's own session
client (the per-session variable cache kept coherent by the session's state version) and the
host's own ``HostService``, called in Trio instead of over gRPC. Arguments, results, chunks and
variable values still go through the wire codec, so a value that cannot travel fails as it
would. Not there: processes (``WorkerInfo.pid`` is ``None``), the wire itself, shared memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import sys
import traceback
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import grpclib.const
import trio
from grpclib.exceptions import GRPCError

from trio_bridge._core.failures import is_failure
from trio_bridge._core.tools import ToolDefinition
from trio_bridge._errors import InvalidArgumentError, SessionNotFoundError, TrioBridgeError
from trio_bridge._host._host_service import HostService
from trio_bridge._host._options import PoolOptions
from trio_bridge._host._pool import Pool
from trio_bridge._host._supervisor import heartbeat
from trio_bridge._host._worker import ToolCall
from trio_bridge._state.variables import VariableUpdate
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.contract import (
    DEFAULT_WATCH_BUFFER,
    EXIT_ADAPTER_IMPORT,
    EXIT_ADAPTER_SETUP,
    WATCH_BUFFER_METADATA,
    WORKER_MESSAGE_PREFIX,
    timeout_from_wire,
)
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.state import update_from_wire
from trio_bridge.testing._fakes import FakeWorker, FakeWorkers, fake_pool_options, open_pool_of_fakes
from trio_bridge.worker._adapter import Adapter, AdapterLoadError, collect_tools, load_adapter_class
from trio_bridge.worker._context import SessionContext, WorkerOptimization, end_call, keep_watch, session_link
from trio_bridge.worker._host_client import HostClient, SessionLink, client_over, failure, host_stub

if TYPE_CHECKING:
    from grpclib.client import Channel

    from trio_bridge._aio import Boundary

_END = object()  # what next() returns at the end of a generator tool


def open_adapter_pool(
    adapter: type[Adapter] | str,
    *,
    size: int = 1,
    concurrency: int = 1,
    adapter_options: dict[str, Any] | None = None,
    **open_pool_options: Any,
) -> AbstractAsyncContextManager[Pool]:
    """Open a real :class:`~trio_bridge.Pool` whose workers run ``adapter`` in this process, in
    Trio, and yield it: the same API as :func:`~trio_bridge.open_pool` (``execute``, ``stream``,
    ``session()``, ``host_tool``, ``statistics``, ``workers``, ...) for tests that need no
    process and may run on Trio's autojump clock.

    Each worker makes its own adapter instance, sets ``self.options`` and runs ``setup()``
    (sync or async, in the Trio thread) once. Then, as in a worker process:

    - ``async def`` tools and async generators run as Trio tasks: cancelling the call (or its
      deadline, ``trio.fail_after`` around ``pool.execute``) cancels them, on the Trio clock.
      They must await Trio or framework-neutral things (``ctx``'s ``a...`` methods,
      ``trio.sleep``): an ``asyncio`` call fails there (test asyncio tools with
      :func:`~trio_bridge.testing.open_pool_in_threads`).
    - sync tools and generators run in Trio worker threads (``trio.to_thread.run_sync``, at most
      ``concurrency`` per worker); a cancelled call sets ``ctx.cancelled`` and keeps its slot
      until the thread returns, as in a worker process. ``@tool(inline=True)`` ones run in the
      Trio thread.
    - a tool's ``ctx: SessionContext`` parameter gets a context with the same methods: the
      call's session variables (a cache coherent at call start, writes, watches, history,
      optimization locks), host tools (``call_host_tool``, ``stream_host_tool``,
      ``ctx.host_tools``) and ``call_tool`` on the pool's workers; the blocking forms from sync
      tools, the ``a...`` forms from async ones (a blocking form in the Trio thread raises
      ``RuntimeError``, as on a worker's event loop). Its ``deadline`` and ``time_remaining()``
      are on the Trio clock (``trio.current_time()``), not ``time.monotonic()``.
    - ``on_session_start``/``on_session_end`` run when a session first reaches the worker and
      when it ends; what they raise is printed to stderr, and the worker goes on.

    Caveat, the autojump clock and threads: while a sync tool (or a sync generator's step) runs
    in its thread, Trio sees no task to run and the autojump clock jumps to the next deadline,
    so a ``trio.fail_after`` around such a call, or a TTL, may expire while the thread works
    for milliseconds of real time. Give calls of sync tools no deadline on that clock (or test
    their timing with ``async def`` tools); ``setup()`` runs in the Trio thread for that reason.

    Args:
        adapter: the :class:`~trio_bridge.worker.Adapter` subclass, or its
            ``"package.module:ClassName"`` (imported when a worker starts, as a worker process
            does).
        size: workers; concurrency: calls each serves at once.
        adapter_options: JSON-able options the adapter reads as ``self.options`` (they go
            through JSON, as to a worker process).
        open_pool_options: the other options of :func:`~trio_bridge.open_pool` (``max_queue``,
            ``state``, ``lifecycle``, ``recycling``, ``state_limits``, ``monitoring``); those
            that only concern processes (``transport``, ``local``, ``remote``,
            ``Lifecycle.heartbeat_interval``) are checked and have no effect. The
            ``TRIO_BRIDGE_*`` variables are not read.

    Raises:
        TypeError: an option ``open_pool`` does not have.
        InvalidArgumentError: ``adapter`` is neither an Adapter subclass nor a
            ``"module:Class"`` string, or an option is out of range or not JSON-able.
        WorkerStartError: a worker could not start: the adapter did not import (exit code 3)
            or its ``setup()`` raised (exit code 4); ``stderr_tail`` holds the traceback.
    """
    if isinstance(adapter, str):
        adapter_class, path = None, adapter
    elif isinstance(adapter, type) and issubclass(adapter, Adapter):
        adapter_class, path = adapter, f"{adapter.__module__}:{adapter.__qualname__}"
    else:
        raise InvalidArgumentError(
            f"adapter must be an Adapter subclass or 'package.module:ClassName', not {short_repr(adapter)}"
        )
    options = fake_pool_options(
        "open_adapter_pool", path,
        {**open_pool_options, "size": size, "concurrency": concurrency, "adapter_options": adapter_options},
    )
    return _open_adapter_pool(adapter_class, options)


@asynccontextmanager
async def _open_adapter_pool(adapter_class: type[Adapter] | None, options: PoolOptions) -> AsyncIterator[Pool]:
    def make_workers(adapter_options_json: str) -> FakeWorkers:
        return FakeWorkers(
            {}, concurrency=options.concurrency, start_delay=0.0, startup_timeout=options.lifecycle.startup_timeout,
            adapter=options.adapter,
            runner=lambda worker: AdapterTools(worker, adapter_class, options.adapter, adapter_options_json, options.concurrency),
        )

    async with open_pool_of_fakes(make_workers, options) as (pool, _):
        yield pool


class AdapterTools:
    """An adapter's tools as an in-process worker's (a :class:`~trio_bridge.testing.FakeWorker`
    composed with this :class:`~trio_bridge.testing._fakes.ToolRunner`), run as a worker
    process would run them (see :func:`open_adapter_pool`)."""

    tells_tools_on_exit = True  # a thread outlives its worker: tell its tool to stop

    def __init__(
        self, worker: FakeWorker, adapter_class: type[Adapter] | None, path: str, adapter_options_json: str,
        concurrency: int,
    ) -> None:
        self.definitions: Mapping[str, ToolDefinition] = {}
        self.adapter: Adapter | None = None
        self._worker = worker
        self._adapter_class = adapter_class
        self._path = path
        self._options_json = adapter_options_json
        self._host: HostClient | None = None
        self._initialized: set[str] = set()  # sessions whose on_session_start ran here
        self._threads = trio.CapacityLimiter(concurrency)  # a worker's thread pool

    # ---- start ----
    async def prepare(self) -> tuple[str, int] | None:
        try:
            adapter_class = self._adapter_class or load_adapter_class(self._path)
        except AdapterLoadError as exc:  # as a worker process says it (worker/_server.py)
            trace = "\n" + "".join(traceback.format_exception(exc.__cause__ or exc)) if exc.in_module_code else ""
            return f"{WORKER_MESSAGE_PREFIX}{exc}{trace}", EXIT_ADAPTER_IMPORT
        except Exception:
            return f"{WORKER_MESSAGE_PREFIX}cannot load adapter {self._path!r}:\n{traceback.format_exc()}", EXIT_ADAPTER_IMPORT
        try:
            adapter = adapter_class()
            adapter.options = json.loads(self._options_json)
            started: Any = adapter.setup()  # may be async def
            if inspect.isawaitable(started):
                await started
            definitions = collect_tools(adapter)
        except BaseException as exc:
            if not is_failure(exc, (trio.Cancelled,)):
                raise
            return f"trio-bridge worker: {self._path}.setup() failed:\n{traceback.format_exc()}", EXIT_ADAPTER_SETUP
        self.adapter = adapter
        self.definitions = definitions
        parts = self._worker.workers.parts
        service = HostService(
            cast("Boundary", _TrioBoundary()), parts.state, calls=parts.calls, tools=parts.tools, plane=None,
            heartbeat=functools.partial(heartbeat, parts.supervisor), route_for=parts.route_for,
            count_host_tool_call=parts.metrics.host_tool_call,
        )
        # The worker side's host client (session caches, host tool and routed calls) over the
        # service in this Trio run; no event loop: Trio.
        local = cast("Channel", _LocalChannel(service, self._worker.running_nursery))
        self._host = client_over(local, "in-process", "", self._worker.id, cast(asyncio.AbstractEventLoop, None))
        return None

    # ---- calls ----
    def new_context(self, call: ToolCall) -> tuple[Any, Callable[[], None]]:
        assert self._host is not None
        timeout = timeout_from_wire(call.timeout_seconds)
        clock = trio.lowlevel.current_clock()
        context = _InProcessContext._create(
            call.session_id, call.call_id, None if timeout is None else clock.current_time() + timeout,
            self._host.link(call.session_id) if call.session_id else None, self._host, clock,
            trio.lowlevel.current_trio_token(), self._worker.running_nursery,
        )
        return context, context._cancel

    def stubborn(self, definition: ToolDefinition) -> bool:
        # A thread cannot be interrupted: cancelling its call sets ctx.cancelled, and the call
        # holds its slot until the thread returns.
        return definition.kind in ("sync", "generator") and not definition.inline

    async def call_starting(self, call: ToolCall, definition: ToolDefinition) -> None:
        if definition.context_parameter and call.session_id and self._host is not None:
            await self._host.refresh(call.session_id, call.state_version)

    async def call_finished(self, context: Any) -> None:
        if isinstance(context, _InProcessContext):
            await end_call(context)  # the watches its tool left open

    async def invoke(self, definition: ToolDefinition, arguments: dict[str, Any]) -> Any:
        if definition.kind == "async":
            return await definition.function(**arguments)
        if definition.inline:
            return definition.function(**arguments)
        return await self._in_thread(functools.partial(definition.function, **arguments), definition.name)

    async def next_chunk(self, definition: ToolDefinition, chunks: Any) -> tuple[bool, Any]:
        if definition.kind == "async_generator":
            try:
                return True, await anext(chunks)
            except StopAsyncIteration:
                return False, None
        item = await self._in_thread(functools.partial(next, chunks, _END), definition.name)
        return (False, None) if item is _END else (True, item)

    async def close_chunks(self, definition: ToolDefinition, chunks: Any) -> None:
        if definition.kind == "async_generator":
            await chunks.aclose()
            return
        # In a thread: its finally blocks may use ctx's blocking methods.
        with contextlib.suppress(ValueError):  # still running in a thread its dead worker left behind
            await self._in_thread(chunks.close, definition.name)

    async def _in_thread(self, function: Callable[[], Any], name: str) -> Any:
        # Abandoned only if the call's scope is cancelled, which for these stubborn tools
        # happens only when the worker dies (its "process" is gone; the thread runs on).
        return await trio.to_thread.run_sync(
            function, abandon_on_cancel=True, limiter=self._threads, thread_name=f"trio-bridge {self._worker.id} tool {name}"
        )

    # ---- sessions ----
    async def session_started(self, session_id: str, metadata: Any) -> None:
        if session_id not in self._initialized and self.adapter is not None:
            self._initialized.add(session_id)
            await self._adapter_hook(self.adapter.on_session_start, session_id, metadata or {})

    async def session_ended(self, session_id: str) -> None:
        self._initialized.discard(session_id)
        if self._host is not None:
            self._host.forget(session_id)
        if self.adapter is not None:
            await self._adapter_hook(self.adapter.on_session_end, session_id)

    async def _adapter_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            if not is_failure(exc, (trio.Cancelled,)):
                raise
            # The adapter's bug: reported as a worker process reports it (stderr), and served on.
            text = traceback.format_exc()
            print(text, file=sys.stderr, end="")
            self._worker.stderr_tail.extend(text.splitlines())


# ---------------------------------------------------------------------------------------------
# the host service, called in Trio


class _TrioBoundary:
    """The host service's boundary when its handlers are called from Trio: nothing to cross."""

    async def call_trio(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return await fn(*args)

    async def run(self, awaitable: Awaitable[Any]) -> Any:
        return await awaitable


class _LocalChannel:
    """A grpclib ``Channel`` (as much of one as the generated stubs use) whose RPCs call a
    ``HostService``'s handlers in this Trio run: a unary RPC in the caller's task, a server
    stream in a task of the worker's nursery, stopped when the caller leaves the stream."""

    def __init__(self, service: HostService, nursery: Callable[[], trio.Nursery]) -> None:
        self._handlers = service.__mapping__()
        self._nursery = nursery

    @asynccontextmanager
    async def request(
        self, route: str, cardinality: grpclib.const.Cardinality, request_type: Any, reply_type: Any, *,
        timeout: float | None = None, deadline: Any = None, metadata: Any = None,
    ) -> AsyncIterator[_ClientStream]:
        stream = _ClientStream(self._handlers[route], dict(metadata or {}), self._nursery)
        try:
            yield stream
        finally:
            stream.close()

    def close(self) -> None:
        pass


class _ClientStream:
    """The caller's end of one RPC on a :class:`_LocalChannel`."""

    def __init__(self, handler: grpclib.const.Handler, metadata: dict[str, str], nursery: Callable[[], trio.Nursery]) -> None:
        self._handler = handler
        self._metadata = metadata
        self._nursery = nursery
        self._request: Any = None
        self._replies: trio.MemoryReceiveChannel[Any] | None = None
        self._scope = trio.CancelScope()
        self._failure: list[BaseException] = []

    async def send_message(self, message: Any, *, end: bool = False) -> None:
        self._request = message
        if self._handler.cardinality is grpclib.const.Cardinality.UNARY_STREAM:
            send, self._replies = trio.open_memory_channel[Any](0)
            self._nursery().start_soon(self._serve, send)

    async def _serve(self, send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            with self._scope:
                try:
                    await self._handler.func(_ServerStream(self._request, self._metadata, send.send))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the caller left the stream
                except Exception as exc:
                    self._failure.append(exc)  # raised to the caller, as a broken RPC would be

    async def recv_message(self) -> Any:
        if self._replies is None:  # unary
            replies: list[Any] = []

            async def deliver(message: Any) -> None:
                replies.append(message)

            await self._handler.func(_ServerStream(self._request, self._metadata, deliver))
            return replies[0] if replies else None
        try:
            return await self._replies.receive()
        except trio.EndOfChannel:
            if self._failure:
                raise self._failure[0] from None
            return None

    def __aiter__(self) -> _ClientStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    def close(self) -> None:
        self._scope.cancel()
        if self._replies is not None:
            self._replies.close()


class _ServerStream:
    """The handler's end of one RPC: the request, the caller's metadata, and where replies go."""

    def __init__(self, request: Any, metadata: dict[str, str], send: Callable[[Any], Awaitable[None]]) -> None:
        self.metadata = metadata
        self._request = request
        self._send = send

    async def recv_message(self) -> Any:
        request, self._request = self._request, None
        return request

    async def send_message(self, message: Any) -> None:
        await self._send(message)


# ---------------------------------------------------------------------------------------------
# the context a tool gets


class _InProcessContext(SessionContext):  # pyright: ignore[reportGeneralTypeIssues]  # final for users; this is ours
    """What a tool's ``ctx: SessionContext`` parameter gets in :func:`open_adapter_pool`: the
    worker's own :class:`~trio_bridge.worker.SessionContext`, in Trio. Only what touches the
    event loop differs: blocking forms (sync tools, in their thread) enter Trio with
    ``trio.from_thread``; ``deadline`` is on the Trio clock; lock renewal and watches run in
    Trio."""

    __slots__ = ("_clock", "_nursery", "_scopes", "_token")

    def __init__(
        self, session_id: str, call_id: str, deadline: float | None, link: SessionLink | None, host: HostClient,
        clock: trio.abc.Clock, token: trio.lowlevel.TrioToken, nursery: Callable[[], trio.Nursery],
    ) -> None:
        super().__init__(session_id, call_id, deadline, link, host)
        self._clock = clock
        self._token = token
        self._nursery = nursery
        self._scopes: set[trio.CancelScope] = set()  # blocking calls, cancelled with the call

    # ---- cancellation and deadline ----
    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self._clock.current_time()

    def _cancel(self) -> None:
        super()._cancel()
        for scope in list(self._scopes):
            scope.cancel()

    # ---- optimization locks: renewed by a Trio task ----
    def _renew_lock(self, link: SessionLink, name: str, optimizer_id: str, lease: float) -> Callable[[], object]:
        renewal = trio.from_thread.run_sync(self._keep_lock, link, name, optimizer_id, lease, trio_token=self._token)
        return lambda: trio.from_thread.run_sync(renewal.cancel, trio_token=self._token)

    @contextlib.asynccontextmanager
    async def aoptimizing(self, name: str, *, optimizer_id: str) -> AsyncIterator[WorkerOptimization]:
        link = session_link(self)
        if not optimizer_id:
            raise InvalidArgumentError("an optimizer_id is required")
        with trio.CancelScope(shield=True):
            _, lease = await link.set_optimization(name, optimizer_id, active=True)
        renewal = self._keep_lock(link, name, optimizer_id, lease)
        try:
            yield WorkerOptimization._create(self, name, optimizer_id)
        finally:
            renewal.cancel()
            with trio.CancelScope(shield=True):
                try:
                    await link.set_optimization(name, optimizer_id, active=False)
                except SessionNotFoundError:
                    pass

    def _keep_lock(self, link: SessionLink, name: str, optimizer_id: str, lease: float) -> trio.CancelScope:
        """Renew a held lock every third of its ``lease`` (seconds; 0: it needs none) until the
        returned scope is cancelled, as a worker does."""
        scope = trio.CancelScope()

        async def renew() -> None:
            with scope:
                while True:
                    await trio.sleep(lease / 3)
                    with contextlib.suppress(TrioBridgeError):  # the holder's next write says if it was lost
                        await link.set_optimization(name, optimizer_id, active=True)

        if lease:
            self._nursery().start_soon(renew)
        return scope

    # ---- watches: the host's watcher, read in Trio ----
    def watch_variables(
        self, names: list[str], *, include_initial: bool = True, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[VariableUpdate]:
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise InvalidArgumentError(f"buffer_size must be a positive number of updates, not {buffer_size!r}")
        watch = self._watch(session_link(self), names, include_initial, buffer_size)
        keep_watch(self, watch)
        return watch

    async def _watch(
        self, link: SessionLink, names: list[str], include_initial: bool, buffer_size: int
    ) -> AsyncGenerator[VariableUpdate, None]:
        # The host's watcher coalesces beyond ``buffer_size`` when this reader falls behind.
        request = pb.WatchVariablesRequest(session_id=self.session_id, names=list(names), include_initial=include_initial)
        metadata = {**link.client.metadata, WATCH_BUFFER_METADATA: str(buffer_size)}
        batches = cast(AsyncGenerator[pb.WatchBatch, None], host_stub(link.client).watch_variables(request, metadata=metadata))
        async with contextlib.aclosing(batches):
            try:
                async for batch in batches:
                    for update in batch.updates:
                        yield update_from_wire(update)
            except GRPCError as exc:
                raise failure(exc) from None

    # ---- streaming host tools: closed in Trio ----
    def _close_from_thread(self, stream: AsyncGenerator[Any, None]) -> None:
        if not trio.lowlevel.in_trio_run():
            trio.from_thread.run(stream.aclose, trio_token=self._token)

    # ---- blocking on the host: from a sync tool's thread into Trio ----
    def _blocking(self, coro: Any, *, cancellable: bool = True) -> Any:
        if trio.lowlevel.in_trio_run():
            coro.close()
            raise RuntimeError(
                "this SessionContext method blocks, and async and inline tools run in the Trio thread: "
                "use its awaitable form in an async tool (e.g. `await ctx.aset_variable(...)`, "
                "`await ctx.acall_host_tool(...)`); a sync tool that needs it cannot be inline"
            )
        try:
            return trio.from_thread.run(self._await, coro, cancellable, trio_token=self._token)
        finally:
            coro.close()  # a no-op once awaited; else (the run ended first) no "never awaited" warning

    async def _await(self, awaitable: Awaitable[Any], cancellable: bool) -> Any:
        with trio.CancelScope(shield=not cancellable) as scope:
            if cancellable:
                self._scopes.add(scope)
            try:
                return await awaitable
            finally:
                self._scopes.discard(scope)
        # Cancelled with the call, as a worker process's pending blocking call is.
        raise concurrent.futures.CancelledError(f"call {self.call_id!r} was cancelled")

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<SessionContext (in process) session={self.session_id!r} call={self.call_id!r} {state}>"
