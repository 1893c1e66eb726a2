"""The pool: a thin facade over its parts, and :func:`open_pool`, which wires them together.

The parts, each in its own module: ``_worker`` (the worker seam: the ``Worker`` protocol the
core knows workers by, their lifecycle, the worker factory), ``_grpc_worker`` (a worker reached
over gRPC: channel, handshake, call stream, RPCs), its connectors ``_process`` (a worker process
of this machine) and ``_remote`` (a worker on another machine, dialled), ``_forkserver`` (the
pool's start method: workers forked by a preloaded fork server, or spawned), ``_supervisor`` (start, restart, recycling, health,
shutdown), ``_gpus`` (each slot's own environment), ``_environment`` (options from ``TRIO_BRIDGE_*``),
``_dispatch`` (slots and the wait queues, fair between sessions), ``_router`` (session affinity), ``_calls`` (unary and
streaming calls, cancellation grace, re-entrancy), ``_metrics`` (statistics), ``_tools`` (host
tools), ``_host_service`` (what workers call), ``_groups`` (the exception-group policy),
``_janitor`` (cleanup after a host that died uncleanly); the asyncio boundary is ``trio_bridge/_aio.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, TypeVar, final, overload

import trio

from trio_bridge import _aio
from trio_bridge._errors import InvalidArgumentError, PoolClosedError, SessionExistsError
from trio_bridge._host._calls import Calls
from trio_bridge._host._discovery import Discovery
from trio_bridge._host._dispatch import AFFINITIES, Affinity, Dispatcher
from trio_bridge._host._endpoint import metrics_endpoint, pool_status, serving
from trio_bridge._host._forkserver import fresh_code, open_launcher, settle, start_method_of
from trio_bridge._host._gpus import slot_environments
from trio_bridge._host._groups import UserErrorTracker
from trio_bridge._host._grpc_worker import Connector, GrpcWorker
from trio_bridge._host._health import serving_health
from trio_bridge._host._host_service import HostService
from trio_bridge._host._janitor import Janitor
from trio_bridge._host._library_threads import with_library_threads
from trio_bridge._host._metrics import Metrics, PoolStatistics
from trio_bridge._host._options import (
    DEFAULT,
    Lifecycle,
    LocalWorkers,
    Monitoring,
    PoolOptions,
    Recycling,
    RemoteWorkers,
    StateLimits,
    Transport,
    pool_options,
)
from trio_bridge._host._process import Launch, LocalProcess, WorkerProcess, WorkerSpec
from trio_bridge._host._prometheus import PoolsCollector, PoolSource, default_registry
from trio_bridge._host._reload import Reloader
from trio_bridge._host._remote import RemoteDial, RemoteTarget, check_joining
from trio_bridge._host._router import Route, Router
from trio_bridge._host._session import Session
from trio_bridge._host._signals import SignalStop, StoppedBySignal
from trio_bridge._host._supervisor import Supervisor, heartbeat
from trio_bridge._host._tools import ToolInfo, ToolRegistry, call_host_tool_here, tool_dicts
from trio_bridge._host._worker import Worker, WorkerFactory, WorkerInfo
from trio_bridge._state.backend import MemoryBackend, StateBackend
from trio_bridge._state.sessions import SessionStore
from trio_bridge._util import NoPublicConstructor, public_module
from trio_bridge._wire import buffers, shared_memory
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.contract import ALLOWED_UIDS_ENV
from trio_bridge._wire.shared_memory import SharedMemoryPlane
from trio_bridge._wire.transport import advertised_address

_logger = logging.getLogger("trio_bridge")
_WORKER_POLL = 0.05  # seconds between looks while waiting for workers
_MIN_WEIGHT, _MAX_WEIGHT = 0.01, 100.0  # a session's weight (fair queueing); the ratio bounds the dispatcher's work per call
F = TypeVar("F", bound=Callable[..., Any])


@final
@public_module
class Pool(metaclass=NoPublicConstructor):
    """A pool of worker processes hosting one adapter. Made by :func:`open_pool`.

    Attributes:
        adapter: the adapter's ``"package.module:ClassName"``.
    """

    def __init__(
        self, *, adapter: str, supervisor: Supervisor, calls: Calls, router: Router, metrics: Metrics,
        dispatcher: Dispatcher[Worker], tools: ToolRegistry, state: StateBackend, spec: WorkerSpec,
        start_method: Callable[[], str], reloader: Reloader,
    ) -> None:
        self.adapter: Final[str] = adapter
        self._supervisor = supervisor
        self._calls = calls
        self._router = router
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._tools = tools
        self._state = state
        # The session blocks open on this pool, by session id, in the order they opened: the
        # latest one's route (for calls routed by workers), weight and max_in_flight apply.
        self._blocks: dict[str, list[tuple[Route, float, int | None]]] = {}
        self._spec = spec  # for tests that speak the wire contract directly
        self._start_method = start_method
        self._reloader = reloader
        self._plane = supervisor.plane
        self.metrics_address: str | None = None
        """``"HOST:PORT"`` where its Prometheus metrics are served (``Monitoring.address``), once open."""
        self.health_address: str | None = None
        """``"tcp:HOST:PORT"`` where its health-only listener serves (``Monitoring.health_address``), once open."""

    def __repr__(self) -> str:
        state = "closing" if self._supervisor.closing else "open"
        return f"<Pool {self.adapter} {state} ready={self._supervisor.ready}/{self.size} queued={self._dispatcher.queued}>"

    # ---- calls ----
    async def execute(self, tool: str, arguments: dict[str, Any] | None = None, *, idempotency_key: str | None = None) -> Any:
        """Run ``tool`` on a free worker and return its result.

        The caller's cancel scope is the timeout: its deadline is sent to the worker, and
        cancelling the call cancels it in the worker (async tools are cancelled, sync tools see
        ``ctx.cancelled``). A worker that does not free its slot within ``Lifecycle.cancel_grace`` seconds
        after a cancellation is recycled.

        Args:
            tool: the tool's name.
            arguments: keyword arguments, encodable values (``None``, ``bool``, ``int`` of any
                size, ``float``, ``str``, ``bytes``, lists, tuples, ``str``-keyed dicts, numpy arrays).
            idempotency_key: a str of 1-200 characters: for that key, at most one execution
                completes. A call with a key in use waits for its first call, then returns the
                same result, or raises the same ``ToolError``; a first call that ended any other
                way (a crash, a cancellation, a refusal) recorded nothing, so the next one runs
                the tool again (at-least-once after a crash). Keys are global to the state
                backend (shared by every host on one Redis) and live ``idempotency_ttl`` seconds.
                A caller waiting for a key's first call waits within its own cancel scope and is
                not counted in ``max_queue``.

        Raises:
            ToolNotFoundError, InvalidArgumentError, EncodeError: the call was wrong; nothing ran.
            IdempotencyConflictError: ``idempotency_key`` was used for another tool, other
                arguments or another session; nothing ran.
            QuotaExceededError: the first call with ``idempotency_key`` returned a result over
                the state backend's ``max_value_bytes``, which was not recorded; or the backend
                keeps ``max_idempotency_records`` keys, all of running calls.
            ToolError: the tool raised; carries the remote type, message and traceback.
            WorkerCrashedError: the worker died during the call (exit code, signal, stderr tail).
            WorkerStartError: no worker is running and none could start within ``Lifecycle.no_worker_timeout``.
            PoolSaturatedError: the wait queue is full. PoolClosedError: the pool is closing.
        """
        return await self._calls.execute(tool, arguments, idempotency_key=idempotency_key)

    async def call(self, target: str, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        """With the ``PythonAdapter``: call (or read) ``target``, a dotted path in an allowed
        module, and return the result: ``await pool.call("numpy.linalg.norm", [3, 4])``. To keep
        objects in a worker, use :meth:`Session.call` with ``store_as``. ``idempotency_key``
        (keyword-only, not passed to the target): as for :meth:`execute`."""
        arguments = {"target": target, "args": list(args), "kwargs": kwargs}
        return await self._calls.execute("call", arguments, idempotency_key=idempotency_key)

    def empty(self, shape: int | tuple[int, ...], dtype: Any = float) -> Any:
        """A new writable numpy array (like ``numpy.empty``; contents arbitrary: fill all of it)
        that a call takes as an argument **without a copy**: it lives in the pool's shared memory
        (at least ``shared_memory_threshold`` bytes; smaller, or in a pool without shared memory,
        it is a plain ``numpy.empty`` array, copied when sent like any other).

        **Sending it makes it read-only for good** (numpy then refuses writes with ``ValueError:
        assignment destination is read-only``, and ``a.flags.writeable = True`` with
        ``ValueError``), so nothing the program does during or after the
        call changes what the worker read; ``numpy.array(a)`` gives a writable copy. Send the
        array ``empty`` returned (or, once it is read-only, any contiguous view of it): an array of
        which another view is alive when it is first sent is copied instead, as that view could
        still write it (a raw pointer, ``memoryview`` or ctypes object over it is not a view numpy
        knows of: do not write through one once it is sent). Its memory is reused once it and
        every worker's view of it are gone.

        Args:
            shape: an int or a sequence of ints >= 0 (elements).
            dtype: a numpy dtype (or what ``numpy.dtype`` takes), neither object nor structured.

        Raises:
            InvalidArgumentError: ``shape`` or ``dtype`` is not one of those.
            PoolClosedError: the pool is closing.
            OSError: ``/dev/shm`` is full (``ENOSPC``).
        """
        if self._supervisor.closing:
            raise PoolClosedError("the pool is closed: its shared memory is gone")
        return shared_memory.empty(self._plane, shape, dtype)

    def stream(
        self, tool: str, arguments: dict[str, Any] | None = None, *, buffer_size: int = 64
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Run a streaming tool; the block gets an async iterator over its chunks::

            async with pool.stream("train", {"epochs": 5}) as chunks:
                async for chunk in chunks:
                    ...

        Chunks reach the block through a bounded Trio memory channel of ``buffer_size`` chunks:
        a slow consumer pauses the worker's generator (backpressure; memory stays flat). Leaving
        the block early cancels the stream and stops the generator at its current ``yield``.
        An exception raised in the block leaves it as itself, never wrapped in a group.

        Raises:
            TrioBridgeError: the errors of :meth:`execute`, from the iterator; a tool error ends
                the iteration after the chunks produced before it.
        """
        return self._calls.stream(tool, arguments, buffer_size)

    # ---- sessions ----
    def session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        affinity: Affinity = "prefer",
        metadata: dict[str, Any] | None = None,
        weight: float = 1.0,
        max_in_flight: int | None = None,
    ) -> AbstractAsyncContextManager[Session]:
        """Open a session for the block: typed variables shared with the workers, and calls
        that stick to one worker.

        Args:
            session_id: reuse this id: an existing session is joined, and left as it is at the
                end; a new one is created, and cleaned up at the end. Default: a random id.
                1-128 characters of ``A-Z a-z 0-9 _ . : -``.
            ttl: seconds without use after which the session expires (default: none); a
                positive finite number.
            affinity: ``"prefer"`` (its worker when free, else any), ``"strict"`` (wait for its
                worker) or ``"strict_fail_fast"`` (``WorkerBusyError`` when it is busy).
            metadata: a ``str``-keyed dict of encodable values, kept with the session.
            weight: its share of the workers while calls wait for them, against other sessions
                (and the calls without a session, which share weight 1): a session of weight 2
                is handed twice as many freed slots as one of weight 1 while both have calls
                waiting. A number from 0.01 to 100 (default 1). See the README's "Fair sessions".
            max_in_flight: at most this many of its calls on workers at once (a whole number
                >= 1); more wait in its queue, even while workers are free. Default ``None``:
                no bound. It bounds the calls made from outside: a call made from inside one
                of them (a host tool, a routed worker-to-worker call) runs through, since its
                caller holds a place until it ends (it counts in ``in_flight``). A session joined again by id while another block has it open takes
                the ``weight`` and ``max_in_flight`` of the latest block (on this pool) until it
                ends.

        Raises:
            InvalidArgumentError: a malformed id, ttl, metadata, affinity, weight or
                max_in_flight; or joining an existing session with a ``ttl`` or ``metadata``
                other than its own.
            QuotaExceededError: the pool has ``StateLimits.max_sessions`` sessions.
            PoolClosedError: the pool is closing.
        """
        if not isinstance(affinity, str) or affinity not in AFFINITIES:
            raise InvalidArgumentError(f"affinity must be one of {', '.join(AFFINITIES)}, not {short_repr(affinity)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _MIN_WEIGHT <= weight <= _MAX_WEIGHT:
            raise InvalidArgumentError(f"weight must be a number from {_MIN_WEIGHT:g} to {_MAX_WEIGHT:g}, not {short_repr(weight)}")
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise InvalidArgumentError(f"max_in_flight must be a whole number >= 1 or None, not {short_repr(max_in_flight)}")
        return self._session(session_id, ttl, affinity, metadata, float(weight), max_in_flight)

    @asynccontextmanager
    async def _session(
        self, session_id: str | None, ttl: float | None, affinity: Affinity, metadata: dict[str, Any] | None,
        weight: float, max_in_flight: int | None,
    ) -> AsyncIterator[Session]:
        if self._supervisor.closing:
            raise PoolClosedError("the pool is closed")
        owned = True
        try:
            info = await self._state.create_session(session_id, ttl=ttl, metadata=metadata)
        except SessionExistsError:
            info = await self._state.get_session(session_id or "")  # join it, as it is
            owned = False
            if ttl is not None and ttl != info.ttl:
                raise InvalidArgumentError(
                    f"session {info.id!r} exists with ttl={info.ttl!r}, not {short_repr(ttl)}: join it without a ttl, "
                    "or use another id"
                ) from None
            if metadata is not None and dict(metadata) != dict(info.metadata):
                raise InvalidArgumentError(
                    f"session {info.id!r} exists with other metadata: join it without metadata, or use another id"
                ) from None
        route = Route(info.id, affinity)
        session = Session._create(self._calls, self._tools, self.tools, self._state, route)
        block = (route, weight, max_in_flight)
        blocks = self._blocks.setdefault(session.id, [])
        blocks.append(block)
        self._dispatcher.configure(session.id, weight=weight, max_in_flight=max_in_flight)
        try:
            yield session
        finally:
            blocks.remove(block)
            self._dispatcher.forget(session.id)
            if blocks:  # another block has it open (joined it by id): its settings apply again
                _, weight, max_in_flight = blocks[-1]
                self._dispatcher.configure(session.id, weight=weight, max_in_flight=max_in_flight, opened=False)
            elif self._blocks.get(session.id) is blocks:
                del self._blocks[session.id]
            if owned:
                with trio.CancelScope(shield=True):
                    await self._state.cleanup_session(session.id)

    def _route_for(self, session_id: str) -> Route:
        """The route of an open session, or a fresh one (a session joined by a worker's routed call)."""
        blocks = self._blocks.get(session_id)
        return blocks[-1][0] if blocks else Route(session_id, "prefer")

    def _session_ended(self, session_id: str) -> None:
        """Drop its host tools, and tell the workers (so they drop per-session objects and caches)."""
        self._tools.drop_session(session_id)
        self._router.session_ended(session_id, self._supervisor.live_handles())

    async def reload(self) -> int:
        """Replace every local worker with one that imports the adapter's code afresh: new code
        without a restart. One slot at a time, each as a recycle replaces its worker: the new
        worker starts and becomes ready first, takes the slot, and the old one finishes its
        calls and exits; then the next slot. So no call fails, capacity stays at ``size`` or
        more, and sessions and their variables (kept by the host) are untouched. A pool with a
        fork server first starts a new one (a fresh preload of the adapter's module) and forks
        the new workers from it; the old one exits once its last worker has.

        What does not survive: what a worker kept in its memory -- objects stored with
        ``store_as`` (``PythonAdapter``), caches, the adapter's attributes. As after a recycle,
        a session's next call on a new worker initializes it there (``on_session_start``); the
        old workers exit without ``on_session_end`` for sessions still open. Workers started ahead of a
        recycle and draining ones run old code until they exit (they take no new call once
        their slot is replaced); while a reload runs, old and new workers serve side by side (a
        call may reach either). Remote workers are left alone: their code is on their machine
        (``trio-bridge worker`` reloads on SIGHUP there); workers in threads
        (``trio_bridge.testing``) are replaced, but share the host's imported modules. Reloads
        run one at a time: a second call waits for the first to end, then reloads again.
        Cancelled, a reload replaces no more: the slots not reached keep their workers (a new
        worker already starting still takes its slot once ready).

        Returns:
            the number of workers replaced.

        Raises:
            WorkerStartError: a new worker could not start (its stderr tail carries the
                ``ImportError``/``SyntaxError``, or why ``setup()`` failed): that slot and the
                next keep their workers, which serve on; slots replaced before it keep their new
                workers. Logged once.
            PoolClosedError: the pool is closing, or closed during the reload (raised as it
                closes, whether or not the reload runs in the pool's block).
        """
        return await self._reloader.reload()

    # ---- state of the pool ----
    @property
    def start_method(self) -> str:
        """How the pool starts its local workers now: ``"forkserver"`` (forked by its preloaded
        fork server) or ``"spawn"`` (fresh interpreters); see ``LocalWorkers.start_method``.
        (``trio_bridge.testing``'s pools say ``"threads"`` or ``"custom"``.)"""
        return self._start_method()

    @property
    def size(self) -> int:
        """The number of worker slots it keeps filled: the local ones and one per remote worker
        (fixed, found through DNS, or joined; a slot whose worker's address left DNS, or whose
        joined worker is gone, is gone)."""
        return self._supervisor.size

    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each slot's current worker, ordered by slot; then any worker started
        ahead to replace a slot's worker that is due for recycling (it takes calls already, and
        has that slot); then the recycled workers still finishing their calls (``"draining"``)."""
        return self._supervisor.workers()

    async def wait_for_workers(self, count: int) -> None:
        """Wait until at least ``count`` workers are ready (remote ones come and go, and join:
        a pool with ``listen`` grows by one slot per worker that joins, and one with a ``dns://``
        name by one per address it finds). Bound it with the
        caller's cancel scope (``trio.fail_after``).

        Raises:
            InvalidArgumentError: ``count`` is not a whole number >= 0.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgumentError(f"count must be a whole number >= 0, not {short_repr(count)}")
        while self._supervisor.ready < count:
            await trio.sleep(_WORKER_POLL)

    def statistics(self) -> PoolStatistics:
        """Queue length, calls in flight, call outcomes, restarts, latency percentiles, and each
        session's queue (``PoolStatistics.sessions``)."""
        return self._metrics.snapshot(
            size=self.size, workers_ready=self._supervisor.ready, queued=self._dispatcher.queued,
            in_flight=self._supervisor.in_flight, recycles=self._supervisor.recycles,
            sessions=self._dispatcher.sessions(),
        )

    # ---- tools ----
    @overload
    def tools(self, format: None = None) -> list[ToolInfo]: ...
    @overload
    def tools(self, format: Literal["openai", "anthropic", "mcp"]) -> list[dict[str, Any]]: ...
    def tools(self, format: Literal["openai", "anthropic", "mcp"] | None = None) -> list[ToolInfo] | list[dict[str, Any]]:
        """Worker tools (as the workers reported them) and global host tools, sorted by name.
        ``ToolInfo.side`` tells them apart; ``ToolInfo.parameters_schema`` is the arguments'
        JSON Schema.

        With ``format``, the same tools as plain dicts in the shape an LLM API takes, each with
        its arguments' JSON Schema (draft 2020-12):

        - ``"openai"`` (Chat Completions ``tools=``): ``{"type": "function", "function":
          {"name", "description", "parameters"}}``;
        - ``"anthropic"`` (Messages ``tools=``): ``{"name", "description", "input_schema"}``;
        - ``"mcp"`` (a Model Context Protocol ``Tool``): ``{"name", "description", "inputSchema"}``.

        A streaming tool's description ends with a note that its result is the list of its
        chunks (collect them: ``[c async for c in chunks]`` in ``pool.stream``). A host tool named
        like a worker tool is left out of these (names must be unique there), so a call by
        that name runs the worker tool: dispatch a worker tool with :meth:`execute` (or
        :meth:`stream`), a host tool with :meth:`call_host_tool`. OpenAI and Anthropic take names
        of ``[A-Za-z0-9_-]`` only: a host tool named with a dot is refused there.

        Raises:
            InvalidArgumentError: ``format`` is none of ``"openai"``, ``"anthropic"``, ``"mcp"``.
        """
        tools = list(self._tools.worker_tools.values())
        tools += [t.info() for t in self._tools.host_tools(None)]
        tools.sort(key=lambda t: t.name)
        return tools if format is None else tool_dicts(tools, format)

    async def call_host_tool(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run the global host tool ``name`` here on the host, as a worker's call would run it
        (arguments checked; async ones on the Trio loop, plain ones in a thread) and return its
        result; a streaming host tool's chunks come back as a list. For programs that run an
        LLM's tool calls by name (see :meth:`tools`).

        Raises:
            ToolNotFoundError: no global host tool has that name (it names those there are).
            InvalidArgumentError: the arguments do not fit the tool's parameters.
            Exception: what the tool raised, as itself.
        """
        return await call_host_tool_here(self._tools.host_tool(name, ""), arguments)

    @overload
    def host_tool(self, function: F, /) -> F: ...
    @overload
    def host_tool(
        self, /, *, name: str | None = None, description: str | None = None, streaming: bool | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Callable[[F], F]: ...
    def host_tool(
        self,
        function: F | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        streaming: bool | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> F | Callable[[F], F]:
        """Register a host tool that workers can call (``ctx.call_host_tool(name, ...)``). Use as
        ``@pool.host_tool`` or ``@pool.host_tool(description=...)``, or call it with the function;
        the function is returned unchanged.

        Host tools may be ``async def`` (run on the Trio loop), plain functions (run in a thread)
        or (async) generators (streaming: workers use ``ctx.stream_host_tool``). Parameters are
        derived from the signature and checked before each call. A host tool may call the pool
        itself; a call that could only deadlock (every worker slot is held by calls waiting on
        host tools) raises :class:`PoolSaturatedError` instead of hanging.

        Raises:
            InvalidArgumentError: bad or duplicate name, over-long description or metadata, or a
                ``streaming`` flag that contradicts the callable.
        """

        def register(fn: F) -> F:
            self._tools.register(fn, name=name, description=description, streaming=streaming, metadata=metadata)
            return fn

        return register(function) if function is not None else register


@dataclass(frozen=True)
class PoolParts:
    """What serves the workers' calls back to the host needs of a running pool (given to the
    ``serve`` hook of :func:`compose`)."""

    state: StateBackend
    calls: Calls
    tools: ToolRegistry
    supervisor: Supervisor
    route_for: Callable[[str], Route]
    plane: SharedMemoryPlane | None
    metrics: Metrics


def open_pool(
    adapter: str,
    *,
    size: int | None = DEFAULT,
    concurrency: int = DEFAULT,
    max_queue: int = DEFAULT,
    transport: Transport = DEFAULT,
    adapter_options: dict[str, Any] | None = None,
    state: StateBackend | str | None = DEFAULT,
    lifecycle: Lifecycle | None = None,
    recycling: Recycling | None = None,
    state_limits: StateLimits | None = None,
    monitoring: Monitoring | None = None,
    local: LocalWorkers | None = None,
    remote: RemoteWorkers | None = None,
    **deprecated: Any,
) -> AbstractAsyncContextManager[Pool]:
    """Start a pool of worker processes hosting ``adapter`` and yield it::

        async with trio_bridge.open_pool("myapp.adapters:Inference", size=4) as pool:
            ...

    All workers start at once; the block runs when every one of them is ready. Leaving the block
    -- normally, by error, by cancellation or Ctrl-C -- drains the workers (up to
    ``Lifecycle.shutdown_timeout``), then terminates and kills what is left, with the processes
    their tools started. An exception raised in the block leaves it as itself, never wrapped in
    a group.

    Args:
        adapter: ``"package.module:ClassName"`` of an :class:`~trio_bridge.worker.Adapter`.
        size: number of local worker processes (default: one per CPU the host may use: its
            affinity, at most a container's CPU quota; none beside ``remote`` workers;
            ``TRIO_BRIDGE_WORKERS``).
        concurrency: calls each worker serves at once (its thread pool size); a remote worker
            takes its own ``--concurrency`` (default 1; ``TRIO_BRIDGE_CONCURRENCY``).
        max_queue: calls that may wait for a free worker; beyond it, ``PoolSaturatedError``
            (default 1024; ``TRIO_BRIDGE_MAX_QUEUE``).
        transport: ``"unix"`` (Linux: an abstract-namespace socket, nothing on disk; elsewhere
            a socket in a private 0700 directory) or ``"tcp"`` (loopback) (default ``"unix"``;
            ``TRIO_BRIDGE_TRANSPORT``).
        adapter_options: JSON-able options the adapter reads as ``self.options`` (set before
            ``setup()``), e.g. ``{"allow": ["numpy"]}`` for ``PythonAdapter``.
        state: where sessions and variables live: a backend, or a Redis URL
            (``"redis://host:6379/0"``: a :class:`RedisBackend`, shared by every host that uses
            it); default: a new in-memory backend (``TRIO_BRIDGE_STATE``). Both get the quotas
            of ``state_limits``.
        lifecycle: start-up, shutdown, cancellation grace, health checks, heartbeats, restart
            backoff, signals: a :class:`Lifecycle`.
        recycling: when a worker is replaced by a fresh one: a :class:`Recycling`.
        state_limits: the quotas of the backend made from ``state``: a :class:`StateLimits`.
        monitoring: the Prometheus metrics and ``/status``: a :class:`Monitoring`.
        local: how local workers start (interpreter, environment, GPUs, start method, allowed
            uids, shared memory): a :class:`LocalWorkers`.
        remote: workers on other machines: a :class:`RemoteWorkers`.
        deprecated: the keywords of before the groups (``max_calls_per_worker=``,
            ``shutdown_timeout=``, ...), taken for one more release with a
            ``DeprecationWarning`` that names the new spelling.

    An option left out (here or in a group) takes its ``TRIO_BRIDGE_*`` variable's value where
    that is set (the README's "Configuration from the environment" lists them), e.g.
    ``TRIO_BRIDGE_WORKERS=8`` for ``size``: a deployment configures a program that way; an
    option the program passes wins, even one equal to its default.

    Raises:
        InvalidArgumentError: an option is out of range, options do not fit together (a
            ``Monitoring.address`` beyond loopback with neither a token nor
            ``status_public=True``, ``size=0`` without remote workers), a deprecated keyword is
            given with its group, or a ``TRIO_BRIDGE_*`` variable does not parse (naming it);
            all raised at once, before anything starts.
        TypeError: a keyword ``open_pool`` does not have.
        WorkerStartError: a worker could not start (bad adapter path, ``setup()`` raised, no
            ready line in time, another trio-bridge wire contract); carries the worker's stderr
            tail, e.g. the ImportError.
        RuntimeError: not called under Trio.
    """
    options = pool_options(adapter, {
        "size": size, "concurrency": concurrency, "max_queue": max_queue, "transport": transport,
        "adapter_options": adapter_options, "state": state, "lifecycle": lifecycle, "recycling": recycling,
        "state_limits": state_limits, "monitoring": monitoring, "local": local, "remote": remote, **deprecated,
    })
    return open_pool_of(options)


LocalConnector = Callable[[WorkerSpec, int], Connector]
"""Makes the connector of a local slot's worker: ``local_connector(spec, slot)``. Its
``start_method`` attribute, if any, is what ``Pool.start_method`` says."""


def open_pool_of(
    options: PoolOptions, launch: Launch = WorkerProcess.spawn, *, local_connector: LocalConnector | None = None,
) -> AbstractAsyncContextManager[Pool]:
    """:func:`open_pool` of ``options`` (from :func:`pool_options`), whose local workers are
    processes started by ``launch(command, env)`` (default: spawned, or forked by a fork server
    where it is safe); or, given ``local_connector``, whatever it connects to (no launcher and
    no fork server then: ``trio_bridge.testing.open_pool_in_threads`` runs workers in threads)."""
    stop = SignalStop(options.lifecycle.handle_signals)
    return _stopping_on_signals(stop, _open_pool(options, stop, launch, local_connector))


@asynccontextmanager
async def _stopping_on_signals(stop: SignalStop, pool: AbstractAsyncContextManager[Pool]) -> AsyncIterator[Pool]:
    """Receive SIGINT/SIGTERM while the pool is open; raise what they mean once it is closed."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise RuntimeError(
            "trio-bridge runs under Trio: use trio.run(main) (from asyncio code, in a thread: await asyncio.to_thread(trio.run, main))"
        ) from None
    with stop.installed():
        try:
            async with pool as opened:
                yield opened
        except BaseException as exc:
            stop.check(exc)
            raise
        stop.check()


@asynccontextmanager
async def _open_pool(
    options: PoolOptions, stop: SignalStop, base_launch: Launch, local_connector: LocalConnector | None,
) -> AsyncIterator[Pool]:
    adapter, size, concurrency, transport = options.adapter, options.size, options.concurrency, options.transport
    local, lifecycle = options.local, options.lifecycle
    python, env, start_method, shared_memory_threshold = local.python, local.env, local.start_method, local.shared_memory_threshold
    startup_timeout, heartbeat_interval, options_json = lifecycle.startup_timeout, lifecycle.heartbeat_interval, options.adapter_options_json
    remote = options.remote
    reaching = bool(remote.addresses) or remote.listen is not None  # remote workers (fixed or found), or workers that join
    remote_tls = remote.tls.client_context() if reaching and remote.tls is not None else None  # once: it reads files
    remote_token = remote.token or ""  # (RemoteWorkers refuses addresses or listen without one)
    peers = frozenset(local.allowed_uids)
    slot_envs = slot_environments(size, worker_env=local.slot_env, gpus_per_worker=local.gpus_per_worker, gpus=local.gpus)
    janitor = Janitor.start()
    plane = None
    tracker = UserErrorTracker()
    on_disk: list[str] = []  # what the janitor removes should this host die uncleanly
    buffers.pool_opened()
    try:
        if sys.platform.startswith("linux"):
            # Abstract-namespace sockets: nothing on disk to leave behind (the pool secret guards them).
            socket_dir = f"@trio-bridge-{os.getpid()}-{secrets.token_hex(8)}"
            host_address = f"unix:{socket_dir}-host"
        else:
            socket_dir = tempfile.mkdtemp(prefix="trio-bridge-")  # created 0700
            host_address = f"unix:{os.path.join(socket_dir, 'host.sock')}"
            on_disk.append(socket_dir)
        if transport == "unix" and shared_memory_threshold is not None:
            SharedMemoryPlane.reclaim_abandoned()
            plane = SharedMemoryPlane.create(shared_memory_threshold)
            if plane is not None:
                on_disk.append(plane.directory)
        for path in on_disk:
            janitor.watch_path(path)
        threads, slot_envs = with_library_threads(local.library_threads, size, host=os.environ, env=env or {}, slot_envs=slot_envs)
        worker_env = {**(env or {}), **(plane.environment() if plane else {}), ALLOWED_UIDS_ENV: ",".join(map(str, sorted(peers)))}
        launching = open_launcher(
            base_launch, requested=start_method, python=python or sys.executable, adapter=adapter, env={**threads, **worker_env},
            local_workers=size, startup_timeout=startup_timeout,
        ) if local_connector is None else contextlib.nullcontext(base_launch)  # its connectors start the workers
        connect = local_connector if local_connector is not None else partial(LocalProcess, janitor=janitor, plane=plane)
        with tracker.resolve_groups():
            async with launching as launch, _aio.open_boundary() as boundary:
                secret = secrets.token_urlsafe(32)
                spec = WorkerSpec(
                    adapter=adapter, python=python or sys.executable, concurrency=concurrency,
                    transport=transport, socket_dir=socket_dir, secret=secret, host_address=host_address,
                    env=worker_env, launch=launch, slot_env=slot_envs,
                    startup_timeout=startup_timeout, heartbeat_interval=heartbeat_interval, adapter_options=options_json,
                )

                callback = [""]  # where remote workers call the host back, once it listens
                fixed = {size + i: RemoteTarget(address) for i, address in enumerate(remote.fixed)}
                remote_slots = {target.address: slot for slot, target in fixed.items()}  # every remote slot, by address
                targets = {target.address: target for target in fixed.values()}  # every remote worker seen, by address

                def remote_worker(target: RemoteTarget) -> WorkerFactory:
                    """The worker factory of a remote slot: a gRPC worker that dials ``target``."""
                    def make(worker_id: str, slot: int) -> Worker:
                        return GrpcWorker(
                            worker_id, slot, RemoteDial(target, remote.connect_timeout), boundary, secret=remote_token,
                            concurrency=concurrency, startup_timeout=startup_timeout, tls=remote_tls,
                            callback_address=callback[0],
                        )
                    return make

                health_bound: list[str | None] = [None]  # where Monitoring.health_address serves, once it does

                def new_worker(worker_id: str, slot: int) -> Worker:
                    """The pool's worker factory: a gRPC worker, whose far end is a local
                    process (slots below ``size``) or a remote worker at a fixed address."""
                    if slot < size:
                        return GrpcWorker(
                            worker_id, slot, connect(spec, slot), boundary,
                            secret=secret, concurrency=concurrency, startup_timeout=startup_timeout,
                        )
                    return remote_worker(fixed[slot])(worker_id, slot)

                @asynccontextmanager
                async def serve(parts: PoolParts) -> AsyncIterator[None]:
                    """What the workers call (host tools, variables, routed calls), while the pool runs."""
                    def add_remote(address: str, server_name: str | None, *, joined: bool = False) -> int | None:
                        """A slot for the remote worker at ``address`` (``None``: it has one). A
                        joined one's slot leaves once its worker is gone: it offers itself again."""
                        if address in remote_slots or parts.supervisor.closing:
                            return None
                        target = targets.setdefault(address, RemoteTarget(address, server_name))  # its abandoned calls too

                        def gone(why: str) -> None:
                            if remote_slots.get(address) == slot:
                                del remote_slots[address]

                        slot = parts.supervisor.add_slot(remote_worker(target), on_gone=gone if joined else None)
                        remote_slots[address] = slot
                        return slot

                    def remove_remote(address: str, why: str) -> None:
                        slot = remote_slots.pop(address, None)
                        if slot is not None:
                            parts.supervisor.remove_slot(slot, why)

                    async def join(address: str, adapter_path: str, tools: list[str]) -> None:
                        """A remote worker offers itself (``trio-bridge worker --join``): dial it."""
                        address = check_joining(address, adapter_path, tools, adapter=adapter, known=parts.tools.worker_tools)
                        slot = add_remote(address, None, joined=True)
                        if slot is not None:
                            _logger.info("worker at %s joined the pool (slot %d)", address, slot)

                    service = HostService(
                        boundary, parts.state, calls=parts.calls, tools=parts.tools, plane=plane,
                        heartbeat=partial(heartbeat, parts.supervisor), route_for=parts.route_for,
                        count_host_tool_call=parts.metrics.host_tool_call,
                        join=join if remote.listen is not None else None,
                    )
                    async with boundary.serve([service], host_address, secret, allowed_uids=peers), contextlib.AsyncExitStack() as stack:
                        if remote.listen is not None:
                            bound = await stack.enter_async_context(
                                boundary.serve([service], remote.listen, remote_token, remote.tls.server_context() if remote.tls else None, peers)
                            )
                            callback[0] = advertised_address(remote.advertise, bound)  # where remote workers call the host
                        if options.monitoring.health_address is not None:
                            health_bound[0] = await stack.enter_async_context(
                                serving_health(boundary, options.monitoring.health_address, parts.supervisor)
                            )
                        async with trio.open_nursery() as discovering:
                            for entry in remote.names:
                                discovery = Discovery(
                                    entry, add=add_remote, remove=remove_remote, interval=remote.resolve_interval,
                                    nameservers=remote.nameservers,
                                )
                                discovering.start_soon(discovery.run)
                            yield
                            discovering.cancel_scope.cancel()

                async with compose(
                    options, spec=spec, new_worker=new_worker, serve=serve, plane=plane, tracker=tracker, stop=stop,
                    before_start=lambda: settle(launch),  # the fork server has been importing meanwhile
                    start_method=lambda: start_method_of(local_connector or launch),
                    fresh_code=lambda: fresh_code(launch),  # a reload's new workers: a fresh preload
                ) as pool:
                    pool.health_address = health_bound[0]
                    yield pool
    finally:
        if plane is not None:
            plane.close()  # unmapped now; arrays the program still holds keep their pages
        buffers.pool_closed()  # the last pool's free receive buffers go now (results the program holds stay its own)
        for path in on_disk:
            shutil.rmtree(path, ignore_errors=True)
            janitor.forget_path(path)
        janitor.close()


def default_state(state: StateBackend | str | None, limits: StateLimits) -> StateBackend:
    """The given backend; a :class:`RedisBackend` for a URL; or a new in-memory one. Made ones
    get the quotas of ``limits``."""
    if isinstance(state, StateBackend):
        return state
    if state is not None:
        from trio_bridge._state.redis import RedisBackend

        return RedisBackend(
            state, max_sessions=limits.max_sessions, max_variables_per_session=limits.max_variables_per_session,
            max_value_bytes=limits.max_value_bytes, history_limit=limits.history_limit,
            idempotency_ttl=limits.idempotency_ttl,
        )
    return MemoryBackend(SessionStore(
        max_sessions=limits.max_sessions, max_variables_per_session=limits.max_variables_per_session,
        max_value_bytes=limits.max_value_bytes, history_limit=limits.history_limit,
    ), idempotency_ttl=limits.idempotency_ttl, max_idempotency_records=limits.max_idempotency_records)


@asynccontextmanager
async def compose(
    options: PoolOptions, *, spec: WorkerSpec, new_worker: WorkerFactory,
    plane: SharedMemoryPlane | None = None, serve: Callable[[PoolParts], AbstractAsyncContextManager[None]] | None = None,
    tracker: UserErrorTracker | None = None, stop: SignalStop | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None, start_method: Callable[[], str] | None = None,
    fresh_code: Callable[[], AbstractAsyncContextManager[None]] | None = None,
) -> AsyncIterator[Pool]:
    """Wire the pool's parts together, start ``options.slots`` workers made by ``new_worker``
    and yield the pool; on the way out, shut the workers down.

    The one composition of a pool, for real processes (`_open_pool`, which brings the
    asyncio boundary (its loop and thread), the shared-memory plane and, as ``serve``, the host service the workers
    call) and for ``trio_bridge.testing``'s fake workers (no loop, no service). Each part gets
    the group of ``options`` it uses, whole.

    Args:
        options: the pool's options, complete and checked (:func:`pool_options`).
        spec: how workers start (the fakes' is nominal; kept as ``Pool._spec``).
        new_worker: ``new_worker(worker_id, slot)`` makes a slot's next worker (any
            :class:`~trio_bridge._host._worker.Worker`: gRPC workers here, fakes in ``trio_bridge.testing``).
        serve: given the pool's parts before any worker starts, runs what the workers call
            back while the pool runs (``None``: nothing).
        tracker: the exception-group policy of the caller's block (default: a new one).
        stop: what SIGINT/SIGTERM do (default: nothing; see ``Lifecycle.handle_signals``).
        before_start: awaited just before the workers start, where a signal cancels the
            start-up (the launcher learns whether its fork server forks).
        start_method: what ``Pool.start_method`` says, now (default: that of ``spec.launch``).
        fresh_code: for ``Pool.reload``, the block in which new local workers import the
            adapter's code afresh (default: nothing to do, as for spawned workers).
    """
    tracker = tracker if tracker is not None else UserErrorTracker()
    stop = stop if stop is not None else SignalStop(enabled=False)
    adapter, size, lifecycle, monitoring = options.adapter, options.slots, options.lifecycle, options.monitoring
    state = default_state(options.state, options.state_limits)
    dispatcher: Dispatcher[Worker] = Dispatcher(options.max_queue)
    metrics = Metrics()
    tools = ToolRegistry()
    supervisor = Supervisor(
        new_worker=new_worker, size=size, dispatcher=dispatcher, metrics=metrics, tools=tools,
        lifecycle=lifecycle, recycling=options.recycling, plane=plane,
    )
    router = Router(dispatcher, state)
    calls = Calls(supervisor=supervisor, router=router, metrics=metrics, state=state, plane=plane, lifecycle=lifecycle)
    reloader = Reloader(
        supervisor, adapter=adapter, local_slots=options.size,
        fresh_code=fresh_code if fresh_code is not None else contextlib.nullcontext,
    )
    pool = Pool._create(
        adapter=adapter, supervisor=supervisor, calls=calls, router=router, metrics=metrics,
        dispatcher=dispatcher, tools=tools, state=state, spec=spec,
        start_method=start_method if start_method is not None else lambda: start_method_of(spec.launch),
        reloader=reloader,
    )
    registry = monitoring.registry if monitoring.registry is not None else default_registry()
    endpoint = metrics_endpoint(monitoring.address, token=options.status_token, status_public=monitoring.status_public)
    source = PoolSource(
        metrics=metrics, supervisor=supervisor, dispatcher=dispatcher, state=state, plane=plane,
        session_metrics=monitoring.session_metrics,
    )
    state.on_session_end.append(pool._session_ended)  # a shared backend outlives the pool
    try:
        with tracker.resolve_groups(), PoolsCollector.registered(registry, adapter, source):
            parts = PoolParts(
                state=state, calls=calls, tools=tools, supervisor=supervisor, route_for=pool._route_for, plane=plane,
                metrics=metrics,
            )
            status = partial(
                pool_status, adapter=adapter, workers=pool.workers, statistics=pool.statistics,
                recent_errors=lambda: metrics.recent_errors, gauges=state.gauges,
            )
            async with (
                serving(registry, endpoint, status) if endpoint is not None else contextlib.nullcontext(None)
            ) as bound, serve(parts) if serve is not None else contextlib.nullcontext():
                pool.metrics_address = bound
                async with trio.open_nursery() as nursery:
                    router.attach(nursery)
                    calls.attach(nursery)
                    await nursery.start(state.run)
                    stop.listen(nursery, force=lambda: supervisor.kill_all("a second signal skipped the drain"))
                    started = False
                    try:
                        with stop.scope:  # the first SIGINT/SIGTERM cancels the start-up or the block
                            try:
                                if before_start is not None:
                                    await before_start()
                                await supervisor.start(nursery)
                                started = True
                            except BaseException:
                                if not stop.received:
                                    raise
                            else:
                                with tracker.user_block():
                                    yield pool
                    finally:
                        with stop.shutdown_scope:  # shielded; a second signal cancels the drain
                            with trio.move_on_after(lifecycle.shutdown_timeout + 0.5):
                                await supervisor.shutdown()
                            supervisor.kill_all("it was still running after the shutdown timeout")
                        nursery.cancel_scope.cancel()
                    if not started:
                        raise StoppedBySignal("a signal stopped the pool while its workers were starting")
    finally:
        state.on_session_end.remove(pool._session_ended)

