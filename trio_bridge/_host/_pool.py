"""The pool: a thin facade over its parts, and :func:`open_pool`, which wires them together.

The parts, each in its own module: ``_process`` (a worker's OS process), ``_forkserver`` (the
pool's start method: workers forked by a preloaded fork server, or spawned), ``_worker`` (a worker
as the host sees it: state, RPCs, life), ``_supervisor`` (start, restart, recycling, health,
shutdown), ``_gpus`` (each slot's own environment), ``_environment`` (options from ``TRIO_BRIDGE_*``),
``_dispatch`` (slots and the wait queue), ``_router`` (session affinity), ``_calls`` (unary and
streaming calls, cancellation grace, re-entrancy), ``_metrics`` (statistics), ``_tools`` (host
tools), ``_host_service`` (what workers call), ``_groups`` (the exception-group policy),
``_janitor`` (cleanup after a host that died uncleanly); the asyncio boundary is ``trio_bridge/_aio.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, TypeVar, final, overload

import trio
from prometheus_client.registry import CollectorRegistry

from trio_bridge import _aio
from trio_bridge._errors import InvalidArgumentError, PoolClosedError, SessionExistsError
from trio_bridge._host._calls import Calls
from trio_bridge._host._dispatch import AFFINITIES, Affinity, Dispatcher
from trio_bridge._host._endpoint import Endpoint, checked_metrics_address, pool_status, serving
from trio_bridge._host._environment import default, with_environment
from trio_bridge._host._forkserver import StartMethod, check_start_method, open_launcher, settle, start_method_of
from trio_bridge._host._gpus import slot_environments
from trio_bridge._host._groups import UserErrorTracker
from trio_bridge._host._host_service import HostService
from trio_bridge._host._janitor import Janitor
from trio_bridge._host._metrics import Metrics, PoolStatistics
from trio_bridge._host._process import launcher
from trio_bridge._host._prometheus import PoolsCollector, PoolSource, default_registry
from trio_bridge._host._remote import RemoteWorker, check_joining, remote_setup
from trio_bridge._host._router import Route, Router
from trio_bridge._host._session import Session
from trio_bridge._host._signals import SignalStop, StoppedBySignal
from trio_bridge._host._supervisor import RecycleLimits, Supervisor, heartbeat
from trio_bridge._host._tools import ToolInfo, ToolRegistry, call_host_tool_here, tool_dicts, tool_info
from trio_bridge._host._worker import WorkerHandle, WorkerInfo, WorkerSpec
from trio_bridge._state.backend import MemoryBackend, StateBackend
from trio_bridge._state.sessions import SessionStore
from trio_bridge._util import NoPublicConstructor, public_module
from trio_bridge._wire.auth import checked_allowed_uids
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.contract import ALLOWED_UIDS_ENV
from trio_bridge._wire.shared_memory import SharedMemoryPlane
from trio_bridge._wire.tls import TLSConfig

_logger = logging.getLogger("trio_bridge")
_WORKER_POLL = 0.05  # seconds between looks while waiting for workers
F = TypeVar("F", bound=Callable[..., Any])
Transport = Literal["unix", "tcp"]


@final
@public_module
class Pool(metaclass=NoPublicConstructor):
    """A pool of worker processes hosting one adapter. Made by :func:`open_pool`.

    Attributes:
        size: the number of worker slots it keeps filled.
        adapter: the adapter's ``"package.module:ClassName"``.
    """

    def __init__(
        self, *, adapter: str, size: int, supervisor: Supervisor, calls: Calls, router: Router, metrics: Metrics,
        dispatcher: Dispatcher[WorkerHandle], tools: ToolRegistry, state: StateBackend, spec: WorkerSpec,
    ) -> None:
        self.adapter: Final[str] = adapter
        self.size: Final[int] = size
        self._supervisor = supervisor
        self._calls = calls
        self._router = router
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._tools = tools
        self._state = state
        self._routes: dict[str, Route] = {}  # open sessions' routes, for calls routed by workers
        self._spec = spec  # for tests that speak the wire contract directly
        self._plane = supervisor.plane
        self.metrics_address: str | None = None
        """``"HOST:PORT"`` where its Prometheus metrics are served (``open_pool(metrics_address=)``), once open."""

    def __repr__(self) -> str:
        state = "closing" if self._supervisor.closing else "open"
        return f"<Pool {self.adapter} {state} ready={self._supervisor.ready}/{self.size} queued={self._dispatcher.queued}>"

    # ---- calls ----
    async def execute(self, tool: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``tool`` on a free worker and return its result.

        The caller's cancel scope is the timeout: its deadline is sent to the worker, and
        cancelling the call cancels it in the worker (async tools are cancelled, sync tools see
        ``ctx.cancelled``). A worker that does not free its slot within ``cancel_grace`` seconds
        after a cancellation is recycled.

        Args:
            tool: the tool's name.
            arguments: keyword arguments, encodable values (``None``, ``bool``, ``int`` of any
                size, ``float``, ``str``, ``bytes``, lists, tuples, ``str``-keyed dicts, numpy arrays).

        Raises:
            ToolNotFoundError, InvalidArgumentError, EncodeError: the call was wrong; nothing ran.
            ToolError: the tool raised; carries the remote type, message and traceback.
            WorkerCrashedError: the worker died during the call (exit code, signal, stderr tail).
            WorkerStartError: no worker is running and none could start within ``no_worker_timeout``.
            PoolSaturatedError: the wait queue is full. PoolClosedError: the pool is closing.
        """
        return await self._calls.execute(tool, arguments)

    async def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """With the ``PythonAdapter``: call (or read) ``target``, a dotted path in an allowed
        module, and return the result: ``await pool.call("numpy.linalg.norm", [3, 4])``. To keep
        objects in a worker, use :meth:`Session.call` with ``store_as``."""
        return await self._calls.execute("call", {"target": target, "args": list(args), "kwargs": kwargs})

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

        Raises:
            InvalidArgumentError: a malformed id, ttl, metadata or affinity; or joining an
                existing session with a ``ttl`` or ``metadata`` other than its own.
            QuotaExceededError: the pool has ``max_sessions`` sessions.
            PoolClosedError: the pool is closing.
        """
        if not isinstance(affinity, str) or affinity not in AFFINITIES:
            raise InvalidArgumentError(f"affinity must be one of {', '.join(AFFINITIES)}, not {short_repr(affinity)}")
        return self._session(session_id, ttl, affinity, metadata)

    @asynccontextmanager
    async def _session(
        self, session_id: str | None, ttl: float | None, affinity: Affinity, metadata: dict[str, Any] | None
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
        self._routes[session.id] = route
        try:
            yield session
        finally:
            self._routes.pop(session.id, None)
            if owned:
                with trio.CancelScope(shield=True):
                    await self._state.cleanup_session(session.id)

    def _route_for(self, session_id: str) -> Route:
        """The route of an open session, or a fresh one (a session joined by a worker's routed call)."""
        route = self._routes.get(session_id)
        return route if route is not None else Route(session_id, "prefer")

    def _session_ended(self, session_id: str) -> None:
        """Drop its host tools, and tell the workers (so they drop per-session objects and caches)."""
        self._tools.drop_session(session_id)
        self._router.session_ended(session_id, self._supervisor.live_handles())

    # ---- state of the pool ----
    @property
    def start_method(self) -> str:
        """How the pool starts its local workers now: ``"forkserver"`` (forked by its preloaded
        fork server) or ``"spawn"`` (fresh interpreters); see ``open_pool(start_method=...)``.
        (``trio_bridge.testing``'s pools say ``"threads"`` or ``"custom"``.)"""
        return start_method_of(self._spec.launch)

    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each slot's current worker, ordered by slot; then any worker started
        ahead to replace a slot's worker that is due for recycling (it takes calls already, and
        has that slot); then the recycled workers still finishing their calls (``"draining"``)."""
        return self._supervisor.workers()

    async def wait_for_workers(self, count: int) -> None:
        """Wait until at least ``count`` workers are ready (remote ones come and go, and join:
        a pool with ``listen`` grows by one slot per worker that joins). Bound it with the
        caller's cancel scope (``trio.fail_after``).

        Raises:
            InvalidArgumentError: ``count`` is not a whole number >= 0.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgumentError(f"count must be a whole number >= 0, not {short_repr(count)}")
        while self._supervisor.ready < count:
            await trio.sleep(_WORKER_POLL)

    def statistics(self) -> PoolStatistics:
        """Queue length, calls in flight, call outcomes, restarts and latency percentiles."""
        return self._metrics.snapshot(
            size=self.size, workers_ready=self._supervisor.ready, queued=self._dispatcher.queued,
            in_flight=self._supervisor.in_flight, recycles=self._supervisor.recycles,
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
        tools = [tool_info(spec) for spec in self._tools.worker_tools.values()]
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
    size: int | None = None,
    concurrency: int = default(1),
    max_queue: int = default(1024),
    startup_timeout: float = default(60.0),
    shutdown_timeout: float = default(5.0),
    cancel_grace: float = default(5.0),
    health_check_interval: float = default(10.0),
    heartbeat_interval: float = default(5.0),
    restart_backoff: tuple[float, float] = (0.1, 5.0),
    no_worker_timeout: float = default(30.0),
    transport: Transport = default("unix"),
    python: str | None = None,
    env: dict[str, str] | None = None,
    adapter_options: dict[str, Any] | None = None,
    shared_memory_threshold: int | None = default(1 << 20),
    state: StateBackend | str | None = None,
    max_sessions: int = 10_000,
    max_variables_per_session: int = 1000,
    max_value_bytes: int = 64 * 2**20,
    history_limit: int = 50,
    handle_signals: bool = True,
    remote_workers: Sequence[str] = (),
    listen: str | None = None,
    advertise: str | None = None,
    token: str | None = None,
    tls: TLSConfig | None = None,
    insecure: bool = False,
    start_method: StartMethod | None = None,
    max_calls_per_worker: int | None = None,
    max_worker_age: float | None = None,
    max_worker_memory: int | None = None,
    worker_env: Callable[[int], Mapping[str, str]] | None = None,
    gpus_per_worker: int | None = None,
    gpus: Sequence[int | str] | None = None,
    metrics_registry: CollectorRegistry | None = None,
    metrics_address: str | None = None,
    allowed_uids: Collection[int] = (),
    status_public: bool | None = None,
) -> AbstractAsyncContextManager[Pool]:
    """Start a pool of worker processes hosting ``adapter`` and yield it::

        async with trio_bridge.open_pool("myapp.adapters:Inference", size=4) as pool:
            ...

    All workers start at once; the block runs when every one of them is ready. Leaving the block
    -- normally, by error, by cancellation or Ctrl-C -- drains the workers (up to
    ``shutdown_timeout``), then terminates and kills what is left, with the processes their tools
    started. An exception raised in the block leaves it as itself, never wrapped in a group.

    Args:
        adapter: ``"package.module:ClassName"`` of an :class:`~trio_bridge.worker.Adapter`.
        size: number of worker processes (default: one per CPU core).
        concurrency: calls each worker serves at once (its thread pool size); a remote worker
            takes its own ``--concurrency``.
        max_queue: calls that may wait for a free worker; beyond it, ``PoolSaturatedError``.
        startup_timeout: seconds a worker may take to import its adapter, run ``setup()`` and
            report ready.
        shutdown_timeout: seconds workers get to finish their calls when the pool closes.
        cancel_grace: seconds a worker gets to free its slot after a call was cancelled before
            it is recycled.
        health_check_interval: seconds between pings of each worker (0 disables them); a worker
            that does not answer within that time is recycled.
        heartbeat_interval: seconds between the workers' heartbeats to the host.
        restart_backoff: (first, longest) delay in seconds before restarting a worker that
            failed again within 10 s of its restart (or start); it doubles on each failure in a
            row. A worker's first failure after a stable run is restarted at once.
        no_worker_timeout: seconds a call waits while no worker runs and the last start failed;
            then it raises ``WorkerStartError`` carrying that failure.
        transport: ``"unix"`` (Linux: an abstract-namespace socket, nothing on disk; elsewhere
            a socket in a private 0700 directory) or ``"tcp"`` (loopback).
        python: the interpreter for workers (default: the host's).
        env: extra environment variables for the workers.
        adapter_options: JSON-able options the adapter reads as ``self.options`` (set before
            ``setup()``), e.g. ``{"allow": ["numpy"]}`` for ``PythonAdapter``.
        shared_memory_threshold: numpy arrays of at least this many bytes travel through
            shared-memory segments on ``/dev/shm`` instead of the gRPC stream (Unix transport
            only; ``None`` disables), and arrive as read-only views of them, not copies.
        state: where sessions and variables live: a backend, or a Redis URL
            (``"redis://host:6379/0"``: a :class:`RedisBackend`, shared by every host that uses
            it); default: a new in-memory backend. Both get the quotas below.
        max_sessions: sessions that may exist at once (a quota of the backend made from
            ``state``, as are the next three).
        max_variables_per_session: variables a session may hold.
        max_value_bytes: the largest encoded value a variable may hold, in bytes.
        history_limit: past values kept per variable.
        handle_signals: while the pool is open, SIGINT and SIGTERM -- where the process still
            has Python's default handlers for them and the pool runs in the main thread --
            cancel the block and close the pool in order, then ``KeyboardInterrupt`` (SIGINT) or
            ``SystemExit(143)`` (SIGTERM) leaves the ``async with``; a second signal skips the
            drain. Without it (or with handlers of your own) SIGTERM ends the process at once,
            and the workers die with it.
        remote_workers: ``tcp://HOST:PORT`` of ``trio-bridge worker`` processes serving the
            same adapter elsewhere, one slot each on top of the ``size`` local ones (``size``
            may then be 0). Calls are dispatched over local and remote workers alike. A remote
            worker the host loses (health checks every ``min(health_check_interval, 2)``
            seconds, or a failed call) fails only its own calls, with ``WorkerCrashedError``
            ("lost connection to worker at ADDR"); its slot dials it again, with backoff, so
            it rejoins when it is back. Shared memory is off in such a pool (arrays travel
            in-band).
        listen: ``tcp://HOST:PORT`` where remote workers call the host back (host tools,
            variables, worker-to-worker calls); port 0 picks a free port.
        advertise: ``HOST`` or ``HOST:PORT`` remote workers use to reach ``listen`` (default:
            its host, or this machine's name when it listens on all addresses).
        token: the shared secret of the host and its remote workers (>= 16 characters), sent
            as gRPC metadata both ways and compared in constant time.
        tls: certificates for TLS both ways (mutual when it has a ``ca``).
        insecure: allow plain TCP beyond loopback (without it, ``tls`` is required there).
        start_method: how local workers start (multiprocessing's terms): ``"forkserver"`` --
            one preloaded process per pool imports the worker and the adapter's module once,
            and forks each worker and each replacement (milliseconds instead of an
            interpreter's start-up); ``"spawn"`` -- each worker is a fresh interpreter. Default
            (``None``): ``"forkserver"`` where it is safe, else ``"spawn"``: the pool spawns on
            other platforms than Linux, and when the fork server has more than one thread after
            importing the adapter's module (numpy's BLAS, torch), among other cases listed in
            ``trio_bridge._host._forkserver``. ``Pool.start_method`` says which it uses; a
            forked worker keeps every guarantee of a spawned one (own process group, dies with
            the host, exit status and stderr reported).
        max_calls_per_worker: recycle a worker once it has been given that many calls
            (``None``, the default: no such limit; nor for the next two).
        max_worker_age: recycle a worker once it has run that many seconds.
        max_worker_memory: recycle a worker once its process's RSS reaches that many bytes
            (sampled every second with psutil; local workers only). Recycling fails no call and never lowers
            capacity: the replacement starts first and takes the worker's place (the old worker
            serves on meanwhile, so it may pass the limit by the calls of one start-up), then
            the old worker finishes its calls, however long they take, and exits. What the old
            worker kept in memory (objects stored with ``store_as``) goes with it, as on a
            restart. ``WorkerInfo.last_recycle_reason`` says why; the log says it once.
        worker_env: ``worker_env(slot) -> {name: value}``, extra environment variables of each
            local slot's workers (``slot``: 0 .. size-1), e.g. to pin each to a device. Called
            once per slot when the pool opens; the slot's replacements get the same.
        gpus_per_worker: give each local slot that many GPUs of ``gpus`` in
            ``CUDA_VISIBLE_DEVICES`` (slot ``i`` gets the ``gpus_per_worker`` from
            ``i * gpus_per_worker`` on; with more slots than GPUs, slots share them
            round-robin), so a pool spreads model replicas over a machine's GPUs;
            ``worker_env`` applies after it.
        gpus: the GPUs ``gpus_per_worker`` shares out, as ``CUDA_VISIBLE_DEVICES`` names them
            (indices or UUIDs); default: the host's own ``CUDA_VISIBLE_DEVICES`` if set, else
            what ``nvidia-smi`` lists.
        metrics_registry: the prometheus_client registry the pool's metrics are on while it is
            open (default: prometheus_client's global ``REGISTRY``); see the README's
            "Metrics" for the metrics, each labelled with ``pool`` (the adapter).
        metrics_address: ``"HOST:PORT"`` where the pool serves ``metrics_registry`` as
            Prometheus text (``http://HOST:PORT/metrics``) while it is open (port 0: a free
            one; ``Pool.metrics_address`` says which); ``None``: not served. The same address
            serves ``/status`` (what ``trio-bridge top`` shows: pids, addresses, recent error
            text), open on loopback; on any other address (``0.0.0.0`` included) only to a
            request bearing ``token`` (``Authorization: Bearer TOKEN``), so such an address
            needs ``token`` or ``status_public``. ``/metrics`` is open to anyone who reaches it.
        status_public: serve ``/status`` without a token on an address beyond loopback too
            (``None``, the default: ``False``, unless ``TRIO_BRIDGE_STATUS_PUBLIC`` says otherwise).
        allowed_uids: uids besides this process's (and root's) whose processes may connect to
            the host's and the workers' Unix sockets (the pool's sockets are in Linux's abstract
            namespace, which any local user can reach: a connection from another uid is closed
            before its first byte, health checks included). TCP is not checked this way: the
            ``token`` and TLS guard it. Workers get it in ``TRIO_BRIDGE_ALLOWED_UIDS`` (this
            option wins over that variable in ``env`` or the host's environment).

    Every option marked in the README's "Configuration from the environment" that the call
    leaves out (or at ``None``) takes its ``TRIO_BRIDGE_*`` variable's value where that is set,
    e.g. ``TRIO_BRIDGE_WORKERS=8`` for ``size``: a deployment configures a program that way;
    an argument the program passes wins.

    Raises:
        InvalidArgumentError: an option is out of range, or the remote-worker options do not
            fit together (raised when the block is entered); a ``TRIO_BRIDGE_*`` variable does
            not parse (raised at once, naming it); ``metrics_address`` is beyond loopback
            with neither ``token`` nor ``status_public=True`` (raised at once).
        WorkerStartError: a worker could not start (bad adapter path, ``setup()`` raised, no
            ready line in time, another trio-bridge wire contract); carries the worker's stderr
            tail, e.g. the ImportError.
        RuntimeError: not called under Trio.
    """
    o = with_environment({
        "size": size, "concurrency": concurrency, "max_queue": max_queue, "startup_timeout": startup_timeout,
        "shutdown_timeout": shutdown_timeout, "cancel_grace": cancel_grace,
        "health_check_interval": health_check_interval, "heartbeat_interval": heartbeat_interval,
        "no_worker_timeout": no_worker_timeout, "transport": transport, "shared_memory_threshold": shared_memory_threshold,
        "state": state, "start_method": start_method, "max_calls_per_worker": max_calls_per_worker,
        "max_worker_age": max_worker_age, "max_worker_memory": max_worker_memory, "metrics_address": metrics_address,
        "status_public": status_public,
        "gpus_per_worker": gpus_per_worker,
    })
    stop = SignalStop(handle_signals)
    return _stopping_on_signals(stop, _open_pool(
        adapter, size=o["size"], concurrency=o["concurrency"], max_queue=o["max_queue"],
        startup_timeout=o["startup_timeout"], shutdown_timeout=o["shutdown_timeout"], cancel_grace=o["cancel_grace"],
        health_check_interval=o["health_check_interval"], heartbeat_interval=o["heartbeat_interval"],
        restart_backoff=restart_backoff, no_worker_timeout=o["no_worker_timeout"], transport=o["transport"],
        python=python, env=env, adapter_options=adapter_options, shared_memory_threshold=o["shared_memory_threshold"],
        state=o["state"], max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
        max_value_bytes=max_value_bytes, history_limit=history_limit, stop=stop,
        remote=(remote_workers, listen, advertise, token, tls, insecure), start_method=o["start_method"],
        recycle=RecycleLimits.checked(
            max_calls_per_worker=o["max_calls_per_worker"], max_worker_age=o["max_worker_age"],
            max_worker_memory=o["max_worker_memory"],
        ),
        slot_env=(worker_env, o["gpus_per_worker"], gpus), allowed_uids=allowed_uids,
        prometheus=(metrics_registry, checked_metrics_address(
            o["metrics_address"], token=token, status_public=o["status_public"],
        )),
    ))


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


def check_options(
    *, adapter: Any, size: int, concurrency: int, max_queue: int, transport: Any, adapter_options: Any,
    timeouts: dict[str, Any], restart_backoff: Any, remote_workers: int = 0,
) -> str:
    """Refuse bad options with one clear error; return the adapter options as JSON. ``size``
    may be 0 when there are ``remote_workers``."""
    if not isinstance(adapter, str) or ":" not in adapter:
        raise InvalidArgumentError(f"adapter must be 'package.module:ClassName', not {short_repr(adapter)}")
    for name, value, least in (("size", size, 0 if remote_workers else 1), ("concurrency", concurrency, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(f"{name} must be a whole number >= {least}, not {short_repr(value)}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise InvalidArgumentError(f"max_queue must be a whole number >= 0, not {short_repr(max_queue)}")
    if not isinstance(transport, str) or transport not in ("unix", "tcp"):
        raise InvalidArgumentError(f"transport must be 'unix' or 'tcp', not {short_repr(transport)}")
    for name, value in timeouts.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise InvalidArgumentError(f"{name} must be a number of seconds >= 0, not {short_repr(value)}")
    try:
        low, high = restart_backoff
        if not 0 <= low <= high or math.isinf(high):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"restart_backoff must be (first, longest) seconds, 0 <= first <= longest, not {short_repr(restart_backoff)}") from None
    try:
        return json.dumps(adapter_options or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"adapter_options must be JSON-able: {exc}") from None


@asynccontextmanager
async def _open_pool(
    adapter: str, *, size: int | None, concurrency: int, max_queue: int, startup_timeout: float,
    shutdown_timeout: float, cancel_grace: float, health_check_interval: float, heartbeat_interval: float,
    restart_backoff: tuple[float, float], no_worker_timeout: float, transport: Transport, python: str | None,
    env: dict[str, str] | None, adapter_options: dict[str, Any] | None, shared_memory_threshold: int | None,
    state: StateBackend | str | None, max_sessions: int, max_variables_per_session: int, max_value_bytes: int,
    history_limit: int, stop: SignalStop, remote: tuple[Any, ...], start_method: StartMethod | None = None,
    recycle: RecycleLimits | None = None, slot_env: tuple[Any, Any, Any] = (None, None, None),
    allowed_uids: Collection[int] = (),
    prometheus: tuple[CollectorRegistry | None, Endpoint | None] = (None, None),
) -> AsyncIterator[Pool]:
    remote_workers, listen, advertise, token, tls, insecure = remote
    setup = remote_setup(remote_workers, listen=listen, advertise=advertise, token=token, tls=tls, insecure=insecure)
    if setup is not None:
        shared_memory_threshold = None  # remote workers cannot read this machine's /dev/shm
        if health_check_interval > 2.0:
            health_check_interval = 2.0  # a lost remote worker is noticed within seconds
    size = size if size is not None else (0 if setup is not None and setup.addresses else os.cpu_count() or 1)
    options_json = check_options(
        adapter=adapter, size=size, concurrency=concurrency, max_queue=max_queue, transport=transport,
        adapter_options=adapter_options, restart_backoff=restart_backoff,
        remote_workers=len(setup.addresses) if setup is not None else 0,
        timeouts={
            "startup_timeout": startup_timeout, "shutdown_timeout": shutdown_timeout, "cancel_grace": cancel_grace,
            "health_check_interval": health_check_interval, "heartbeat_interval": heartbeat_interval,
            "no_worker_timeout": no_worker_timeout,
        },
    )
    check_start_method(start_method)
    peers = checked_allowed_uids(allowed_uids)
    env_of_slot, gpus_per_worker, gpus = slot_env
    slot_envs = slot_environments(size, worker_env=env_of_slot, gpus_per_worker=gpus_per_worker, gpus=gpus)
    janitor = Janitor.start()
    plane = None
    tracker = UserErrorTracker()
    on_disk: list[str] = []  # what the janitor removes should this host die uncleanly
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
        worker_env = {**(env or {}), **(plane.environment() if plane else {}), ALLOWED_UIDS_ENV: ",".join(map(str, sorted(peers)))}
        with tracker.resolve_groups():
            async with open_launcher(
                launcher.get(), requested=start_method, python=python or sys.executable, adapter=adapter, env=worker_env,
                local_workers=size, startup_timeout=startup_timeout,
            ) as launch, _aio.open_boundary() as boundary:
                secret = secrets.token_urlsafe(32)
                spec = WorkerSpec(
                    adapter=adapter, python=python or sys.executable, concurrency=concurrency,
                    transport=transport, socket_dir=socket_dir, secret=secret, host_address=host_address,
                    env=worker_env, launch=launch, slot_env=slot_envs,
                    startup_timeout=startup_timeout, heartbeat_interval=heartbeat_interval, adapter_options=options_json,
                )

                callback = [""]  # where remote workers call the host back, once it listens
                remote_addresses = list(setup.addresses) if setup is not None else []  # slot size + i: the i-th

                def new_worker(worker_id: str, slot: int) -> WorkerHandle:
                    if setup is None or slot < size:
                        return WorkerHandle(worker_id, slot, spec, boundary, janitor)
                    remote_spec = dataclasses.replace(
                        spec, transport="tcp", secret=setup.token, tls=setup.client_context, callback_address=callback[0],
                        launch=RemoteWorker.launcher(remote_addresses[slot - size]),
                    )
                    return WorkerHandle(worker_id, slot, remote_spec, boundary)

                @asynccontextmanager
                async def serve(parts: PoolParts) -> AsyncIterator[None]:
                    """What the workers call (host tools, variables, routed calls), while the pool runs."""
                    async def join(address: str, adapter_path: str, tools: list[str]) -> None:
                        """A remote worker offers itself (``trio-bridge worker --join``): dial it."""
                        assert setup is not None
                        address = check_joining(address, adapter_path, tools, adapter=adapter, known=parts.tools.worker_tools)
                        if address not in remote_addresses:
                            remote_addresses.append(address)
                            slot = parts.supervisor.add_slot()
                            _logger.info("worker at %s joined the pool (slot %d)", address, slot)

                    service = HostService(
                        boundary, parts.state, calls=parts.calls, tools=parts.tools, plane=plane,
                        heartbeat=partial(heartbeat, parts.supervisor), route_for=parts.route_for,
                        count_host_tool_call=parts.metrics.host_tool_call,
                        join=join if setup is not None and setup.listen is not None else None,
                    )
                    async with boundary.serve([service], host_address, secret, allowed_uids=peers), contextlib.AsyncExitStack() as stack:
                        if setup is not None and setup.listen is not None:
                            bound = await stack.enter_async_context(
                                boundary.serve([service], setup.listen, setup.token, setup.server_context, peers)
                            )
                            callback[0] = setup.callback_address(bound)
                        yield

                async with compose(
                    adapter=adapter, size=size + (len(setup.addresses) if setup else 0), spec=spec, new_worker=new_worker, serve=serve, plane=plane,
                    state=default_state(
                        state, max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
                        max_value_bytes=max_value_bytes, history_limit=history_limit,
                    ),
                    max_queue=max_queue, cancel_grace=cancel_grace, no_worker_timeout=no_worker_timeout,
                    health_check_interval=health_check_interval, restart_backoff=restart_backoff,
                    shutdown_timeout=shutdown_timeout, tracker=tracker, stop=stop, recycle=recycle, prometheus=prometheus,
                    before_start=lambda: settle(launch),  # the fork server has been importing meanwhile
                ) as pool:
                    yield pool
    finally:
        if plane is not None:
            plane.close()  # unmapped now; arrays the program still holds keep their pages
        for path in on_disk:
            shutil.rmtree(path, ignore_errors=True)
            janitor.forget_path(path)
        janitor.close()


def default_state(
    state: StateBackend | str | None, *, max_sessions: int, max_variables_per_session: int, max_value_bytes: int,
    history_limit: int,
) -> StateBackend:
    """The given backend; a :class:`RedisBackend` for a URL; or a new in-memory one. Made ones
    get these quotas.

    Raises:
        InvalidArgumentError: ``state`` is neither a backend, a Redis URL nor None.
    """
    if isinstance(state, StateBackend):
        return state
    if isinstance(state, str):
        from trio_bridge._state.redis import RedisBackend

        return RedisBackend(
            state, max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
            max_value_bytes=max_value_bytes, history_limit=history_limit,
        )
    if state is not None:
        raise InvalidArgumentError(f"state must be a StateBackend, a Redis URL or None, not {short_repr(state)}")
    return MemoryBackend(SessionStore(
        max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
        max_value_bytes=max_value_bytes, history_limit=history_limit,
    ))


@asynccontextmanager
async def compose(
    *, adapter: str, size: int, spec: WorkerSpec, new_worker: Callable[[str, int], WorkerHandle],
    state: StateBackend, max_queue: int, cancel_grace: float, no_worker_timeout: float,
    health_check_interval: float, restart_backoff: tuple[float, float], shutdown_timeout: float,
    plane: SharedMemoryPlane | None = None, serve: Callable[[PoolParts], AbstractAsyncContextManager[None]] | None = None,
    tracker: UserErrorTracker | None = None, stop: SignalStop | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None, recycle: RecycleLimits | None = None,
    prometheus: tuple[CollectorRegistry | None, Endpoint | None] = (None, None),
) -> AsyncIterator[Pool]:
    """Wire the pool's parts together, start ``size`` workers made by ``new_worker`` and yield
    the pool; on the way out, shut the workers down.

    The one composition of a pool, for real processes (`_open_pool`, which brings the
    asyncio boundary (its loop and thread), the shared-memory plane and, as ``serve``, the host service the workers
    call) and for ``trio_bridge.testing``'s fake workers (no loop, no service). Options are
    checked by the caller.

    Args:
        spec: how workers start (the fakes' is nominal; kept as ``Pool._spec``).
        new_worker: ``new_worker(worker_id, slot)`` makes the handle of a slot's next worker.
        serve: given the pool's parts before any worker starts, runs what the workers call
            back while the pool runs (``None``: nothing).
        tracker: the exception-group policy of the caller's block (default: a new one).
        stop: what SIGINT/SIGTERM do (default: nothing; see ``open_pool(handle_signals=...)``).
        before_start: awaited just before the workers start, where a signal cancels the
            start-up (the launcher learns whether its fork server forks).
    """
    tracker = tracker if tracker is not None else UserErrorTracker()
    stop = stop if stop is not None else SignalStop(enabled=False)
    dispatcher: Dispatcher[WorkerHandle] = Dispatcher(max_queue)
    metrics = Metrics()
    tools = ToolRegistry()
    supervisor = Supervisor(
        new_worker=new_worker, size=size, dispatcher=dispatcher, metrics=metrics, tools=tools,
        health_check_interval=health_check_interval, restart_backoff=restart_backoff,
        shutdown_timeout=shutdown_timeout, plane=plane, recycle=recycle,
    )
    router = Router(dispatcher, state)
    calls = Calls(
        supervisor=supervisor, router=router, metrics=metrics, state=state, plane=plane,
        cancel_grace=cancel_grace, no_worker_timeout=no_worker_timeout,
    )
    pool = Pool._create(
        adapter=adapter, size=size, supervisor=supervisor, calls=calls, router=router, metrics=metrics,
        dispatcher=dispatcher, tools=tools, state=state, spec=spec,
    )
    registry, metrics_address = prometheus
    registry = registry if registry is not None else default_registry()
    if not isinstance(registry, CollectorRegistry):
        raise InvalidArgumentError(f"metrics_registry must be a prometheus_client CollectorRegistry, not {short_repr(registry)}")
    source = PoolSource(metrics=metrics, supervisor=supervisor, dispatcher=dispatcher, state=state, plane=plane)
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
                serving(registry, metrics_address, status) if metrics_address is not None else contextlib.nullcontext(None)
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
                            with trio.move_on_after(shutdown_timeout + 0.5):
                                await supervisor.shutdown()
                            supervisor.kill_all("it was still running after the shutdown timeout")
                        nursery.cancel_scope.cancel()
                    if not started:
                        raise StoppedBySignal("a signal stopped the pool while its workers were starting")
    finally:
        state.on_session_end.remove(pool._session_ended)

