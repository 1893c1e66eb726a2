"""The pool: worker supervision, dispatch, calls, streams, health and shutdown."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, final

import trio

from trio_bridge._errors import (
    InvalidArgumentError,
    PoolClosedError,
    PoolSaturatedError,
    TrioBridgeError,
    WorkerCrashedError,
    WorkerStartError,
)
from trio_bridge._host import _aio
from trio_bridge._host._dispatch import AFFINITIES, Dispatcher
from trio_bridge._host._host_service import HostService
from trio_bridge._host._session import Session
from trio_bridge._host._tools import ToolInfo, ToolRegistry, in_worker_callback, tool_info
from trio_bridge._host._worker import WorkerHandle, WorkerInfo, WorkerSpec
from trio_bridge._state.backend import MemoryBackend, StateBackend
from trio_bridge._state.sessions import SessionStore
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.errors import exception_from
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.shared_memory import SharedMemoryPlane

_logger = logging.getLogger("trio_bridge")
_LATENCY_WINDOW = 4096  # calls kept for the latency percentiles
_STABLE_AFTER = 10.0    # seconds a worker must live before its slot's restart backoff resets
_SWEEP_INTERVAL = 60.0  # seconds between sweeps of unread shared-memory files
_SWEEP_AGE = 600.0      # seconds after which an unread shared-memory file is removed


@final
@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot from :meth:`Pool.statistics`. Latencies are in seconds, over the last 4,096
    completed calls (``None`` before the first)."""

    size: int
    workers_ready: int
    queued: int
    in_flight: int
    calls_completed: int
    calls_failed: int
    calls_cancelled: int
    restarts: int
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None


@final
class Pool:
    """A pool of worker processes hosting one adapter. Made by :func:`open_pool`, not by users."""

    def __init__(
        self,
        *,
        spec: WorkerSpec,
        size: int,
        max_queue: int,
        boundary: _aio.Boundary,
        shutdown_timeout: float,
        cancel_grace: float,
        health_check_interval: float,
        restart_backoff: tuple[float, float],
        state: StateBackend,
        plane: SharedMemoryPlane | None,
    ) -> None:
        self._spec = spec
        self._state = state
        self._plane = plane
        self.size = size
        self._boundary = boundary
        self._dispatcher: Dispatcher[WorkerHandle] = Dispatcher(max_queue)
        self._shutdown_timeout = shutdown_timeout
        self._cancel_grace = cancel_grace
        self._health_check_interval = health_check_interval
        self._restart_backoff = restart_backoff
        self._handles: dict[int, WorkerHandle] = {}
        self._worker_ids = itertools.count()
        self._call_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._restarts = 0
        self._tools = ToolRegistry()
        self._open_sessions: dict[str, Session] = {}
        self._parked_calls: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        ready = sum(h.state == "ready" for h in self._handles.values())
        state = "closing" if self._closing else "open"
        return f"<Pool {self._spec.adapter} {state} ready={ready}/{self.size} queued={self._dispatcher.queued}>"

    # ---- public API ----
    async def execute(self, tool: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``tool`` on a free worker and return its result.

        The caller's cancel scope is the timeout: its deadline is sent to the worker, and
        cancelling the call cancels it in the worker (async tools are cancelled, sync tools see
        ``ctx.cancelled``). A worker that does not free its slot within ``cancel_grace`` seconds
        after a cancellation is recycled.

        Args:
            tool: the tool's name.
            arguments: keyword arguments, encodable values (see ``trio_bridge._wire.codec``).

        Raises:
            ToolNotFoundError, InvalidArgumentError, EncodeError: the call was wrong; nothing ran.
            ToolError: the tool raised; carries the remote type, message and traceback.
            WorkerCrashedError: the worker died during the call (exit code, signal, stderr tail).
            PoolSaturatedError: the wait queue is full. PoolClosedError: the pool is closing.
        """
        return await self._execute(tool, arguments, None)

    async def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """With the ``PythonAdapter``: call (or read) ``target``, a dotted path in an allowed
        module, and return the result: ``await pool.call("numpy.linalg.norm", [3, 4])``. To keep
        objects in a worker, use :meth:`Session.call` with ``store_as``."""
        return await self._execute("call", {"target": target, "args": list(args), "kwargs": kwargs}, None)

    async def _execute(
        self, tool: str, arguments: dict[str, Any] | None, session: Session | None, affinity: str | None = None
    ) -> Any:
        request = await self._request(tool, arguments, session)
        worker = await self._acquire(session, affinity)
        started = trio.current_time()
        finished = False
        try:
            await self._enter_session(worker, session)
            reply = await worker.call(lambda stub: stub.execute_tool(request))
            finished = True
            if reply.error is not None:
                self._failed += 1
                worker.calls_failed += 1
                raise exception_from(reply.error, tool)
            result = decode(reply.result, plane=self._plane)
            self._completed += 1
            worker.calls_served += 1
            self._latencies.append(trio.current_time() - started)
            return result
        except WorkerCrashedError:
            finished = True
            self._failed += 1
            raise
        finally:
            self._finish_call(worker, request.call_id, finished)

    def stream(self, tool: str, arguments: dict[str, Any] | None = None, *, buffer_size: int = 64) -> Any:
        """Run a streaming tool; the block gets an async iterator over its chunks::

            async with pool.stream("train", {"epochs": 5}) as chunks:
                async for chunk in chunks:
                    ...

        Chunks reach the block through a bounded Trio memory channel of ``buffer_size`` chunks:
        a slow consumer pauses the worker's generator (backpressure; memory stays flat). Leaving
        the block early cancels the stream and stops the generator at its current ``yield``.

        Raises:
            The errors of :meth:`execute`, from the iterator; a tool error ends the iteration
            after the chunks produced before it.
        """
        return self._stream(tool, arguments, buffer_size, None)

    @asynccontextmanager
    async def _stream(
        self, tool: str, arguments: dict[str, Any] | None, buffer_size: int, session: Session | None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        request = await self._request(tool, arguments, session)
        worker = await self._acquire(session)
        send, receive = trio.open_memory_channel[Any](buffer_size)
        done = trio.Event()
        try:
            await self._enter_session(worker, session)
            with _collapse_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_stream, worker, request, send, done)
                    async with receive:
                        yield _Chunks(receive)
                    nursery.cancel_scope.cancel()
        finally:
            self._finish_call(worker, request.call_id, done.is_set())

    @asynccontextmanager
    async def session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        affinity: str = "prefer",
        metadata: dict[str, Any] | None = None,
    ) -> AsyncIterator[Session]:
        """Open a session for the block: typed variables shared with the workers, and calls
        that stick to one worker.

        Args:
            session_id: reuse this id (an existing session is joined and left as it is at the
                end; a new one is created and cleaned up at the end). Default: a random id.
            ttl: seconds without use after which the session expires (default: none).
            affinity: ``"prefer"`` (its worker when free, else any), ``"strict"`` (wait for its
                worker) or ``"strict_fail_fast"`` (``WorkerBusyError`` when it is busy).
            metadata: free-form, kept with the session.

        Raises:
            QuotaExceededError: the pool has ``max_sessions`` sessions.
        """
        if affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {', '.join(AFFINITIES)}, not {affinity!r}")
        if self._closing:
            raise PoolClosedError("the pool is closed")
        owned = True
        try:
            info = await self._state.create_session(session_id, ttl=ttl, metadata=metadata)
        except InvalidArgumentError:
            if session_id is None:
                raise
            info = await self._state.get_session(session_id)  # join the existing session
            owned = False
        session = Session(self, self._state, info.id, affinity)
        self._open_sessions[session.id] = session
        try:
            yield session
        finally:
            self._open_sessions.pop(session.id, None)
            if owned:
                with trio.CancelScope(shield=True):
                    await self._state.cleanup_session(session.id)

    def _session_ended(self, session_id: str) -> None:
        """Drop its host tools, and tell the workers (so they drop per-session objects and caches)."""
        self._tools.drop_session(session_id)
        if self._nursery is None:
            return
        request = pb.CleanupSessionRequest(session_id=session_id)
        for handle in list(self._handles.values()):
            if session_id in handle.sessions:
                handle.sessions.discard(session_id)
                if handle.alive:
                    self._nursery.start_soon(self._cleanup_on, handle, request)

    async def _cleanup_on(self, handle: WorkerHandle, request: pb.CleanupSessionRequest) -> None:
        with trio.move_on_after(5):
            try:
                await handle.call(lambda stub: stub.cleanup_session(request))
            except WorkerCrashedError:
                pass

    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each slot's current worker, ordered by slot."""
        return [self._handles[slot].info() for slot in sorted(self._handles)]

    def statistics(self) -> PoolStatistics:
        """Queue length, calls in flight, totals, restarts and latency percentiles."""
        latencies = sorted(self._latencies)
        return PoolStatistics(
            size=self.size,
            workers_ready=sum(h.state == "ready" for h in self._handles.values()),
            queued=self._dispatcher.queued,
            in_flight=sum(h.busy for h in self._handles.values()),
            calls_completed=self._completed,
            calls_failed=self._failed,
            calls_cancelled=self._cancelled,
            restarts=self._restarts,
            latency_p50=_percentile(latencies, 0.50),
            latency_p90=_percentile(latencies, 0.90),
            latency_p99=_percentile(latencies, 0.99),
        )

    def tools(self) -> list[ToolInfo]:
        """Worker tools (as the workers reported them) and global host tools, sorted by name.
        ``ToolInfo.side`` tells them apart."""
        tools = [tool_info(spec) for spec in self._tools.worker_tools.values()]
        tools += [t.info() for t in self._tools.host_tools(None)]
        return sorted(tools, key=lambda t: t.name)

    def host_tool(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        streaming: bool | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Register a host tool that workers can call (``ctx.call_host_tool(name, ...)``). Use as
        ``@pool.host_tool`` or ``@pool.host_tool(description=...)``, or call it with the function.

        Host tools may be ``async def`` (run on the Trio loop), plain functions (run in a thread)
        or (async) generators (streaming: workers use ``ctx.stream_host_tool``). Parameters are
        derived from the signature and checked before each call. A host tool may call the pool
        itself; a call that could only deadlock (every worker slot is held by calls waiting on
        host tools) raises :class:`PoolSaturatedError` instead of hanging.

        Raises:
            InvalidArgumentError: bad or duplicate name, over-long description or metadata, or a
                ``streaming`` flag that contradicts the callable.
        """

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._tools.register(fn, name=name, description=description, streaming=streaming, metadata=metadata)
            return fn

        return register(function) if function is not None else register

    # ---- calls ----
    async def _request(self, tool: str, arguments: dict[str, Any] | None, session: Session | None) -> pb.ExecuteToolRequest:
        if self._closing:
            raise PoolClosedError("the pool is closed")
        payload = encode({} if arguments is None else arguments, path="arguments", plane=self._plane)  # fails before any wait
        session_id, state_version = "", 0
        if session is not None:
            info = await self._state.touch_session(session.id)  # SessionNotFoundError once it ended
            session_id, state_version = info.id, info.state_version
        deadline = trio.current_effective_deadline()
        timeout = 0.0 if math.isinf(deadline) else max(deadline - trio.current_time(), 1e-3)
        return pb.ExecuteToolRequest(
            tool_name=tool, arguments=payload, call_id=f"c{next(self._call_ids)}", timeout_seconds=timeout,
            session_id=session_id, session_state_version=state_version,
        )

    @contextmanager
    def _parked(self, call_id: str) -> Iterator[None]:
        """While a worker's call ``call_id`` waits on the host (a host tool, a routed call), its
        slot cannot free; pool calls made meanwhile from there are re-entrant."""
        self._parked_calls[call_id] += 1
        token = in_worker_callback.set(True)
        try:
            yield
        finally:
            in_worker_callback.reset(token)
            self._parked_calls[call_id] -= 1
            if not self._parked_calls[call_id]:
                del self._parked_calls[call_id]

    def _check_reentrancy(self) -> None:
        if not in_worker_callback.get():
            return
        capacity = sum(h.concurrency for h in self._handles.values() if h.accepting)
        if len(self._parked_calls) >= capacity:
            raise PoolSaturatedError(
                f"a host tool (or a worker-to-worker call) called the pool while all {capacity} worker slot(s) "
                "are held by calls waiting on the host: waiting would deadlock. Open the pool with more "
                "workers or a higher concurrency, or do not call the pool from this host tool."
            )

    async def _enter_session(self, worker: WorkerHandle, session: Session | None) -> None:
        """Before a session's first call on a worker: InitializeSession, with its metadata."""
        if session is None or session.id in worker.sessions:
            return
        info = await self._state.get_session(session.id)
        request = pb.InitializeSessionRequest(session_id=session.id, metadata=encode(dict(info.metadata), path="session metadata"))
        await worker.call(lambda stub: stub.initialize_session(request))
        worker.sessions.add(session.id)

    def _session_for(self, session_id: str) -> Session:
        session = self._open_sessions.get(session_id)
        return session if session is not None else Session(self, self._state, session_id, "prefer")

    async def _acquire(self, session: Session | None, affinity: str | None = None) -> WorkerHandle:
        self._check_reentrancy()
        if session is None:
            return await self._dispatcher.acquire()
        home = session._worker
        worker = await self._dispatcher.acquire(home, affinity or session.affinity)
        if home is None or (home is not worker and not self._dispatcher.has(home)):
            if home is not None:
                session.moves += 1
                _logger.warning(
                    "session %s moved from worker %s, which is gone (exit code %s), to worker %s",
                    session.id, home.id, home.exit_code, worker.id,
                )
            session._worker = worker
        return worker

    def _finish_call(self, worker: WorkerHandle, call_id: str, finished: bool) -> None:
        if finished or not worker.alive:
            self._dispatcher.release(worker)
            return
        # Cancelled mid-call: the slot stays taken until the worker really lets go of the call.
        self._cancelled += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._hold_until_released, worker, call_id)

    async def _hold_until_released(self, worker: WorkerHandle, call_id: str) -> None:
        try:
            with trio.move_on_after(self._cancel_grace) as grace:
                delay = 0.005
                while worker.alive:
                    try:
                        with trio.fail_after(max(self._cancel_grace, 1)):
                            reply = await worker.call(lambda stub: stub.ping(pb.PingRequest()))
                    except (WorkerCrashedError, trio.TooSlowError):
                        break
                    if call_id not in reply.active_calls:
                        break
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.2)
            if grace.cancelled_caught:
                worker.kill(f"it did not free its slot within {self._cancel_grace:g} s after call {call_id} was cancelled")
        finally:
            self._dispatcher.release(worker)

    async def _pump_stream(
        self, worker: WorkerHandle, request: pb.ExecuteToolRequest, send: trio.MemorySendChannel[Any], done: trio.Event
    ) -> None:
        async with send:
            try:
                async with worker.open_stream(request) as receive:
                    while True:
                        batch = await worker.receive_batch(receive)
                        if batch is None:
                            break
                        for chunk in batch.chunks:
                            await send.send(decode(chunk, plane=self._plane))
                        if batch.error is not None:
                            raise exception_from(batch.error, request.tool_name)
                worker.calls_served += 1
                self._completed += 1
            except TrioBridgeError as exc:
                self._failed += 1
                worker.calls_failed += 1
                done.set()
                await send.send(_Failure(exc))
                return
            done.set()

    # ---- supervision ----
    async def _start(self) -> None:
        assert self._nursery is not None
        errors: list[WorkerStartError] = []

        async def start_one(slot: int) -> None:
            try:
                await self._nursery.start(self._supervise, slot)  # type: ignore[union-attr]
            except BaseException as exc:
                error = _only_start_error(exc)
                if error is None:
                    raise
                errors.append(error)

        async with trio.open_nursery() as starters:  # all workers start at once
            for slot in range(self.size):
                starters.start_soon(start_one, slot)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"({len(errors)} of {self.size} workers failed to start)")
            raise errors[0]
        self._nursery.start_soon(self._health_check)
        if self._plane is not None:
            self._nursery.start_soon(self._sweep_shared_memory)

    async def _supervise(self, slot: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker of one slot: start it, and restart it with backoff when it dies."""
        failures = 0
        first = True
        while not self._closing:
            handle = WorkerHandle(f"w{next(self._worker_ids)}", slot, self._spec, self._boundary)
            self._handles[slot] = handle
            lived_from = trio.current_time()
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(handle.run)
                    self._tools.worker_tools = handle.tools
                    if first:
                        task_status.started()
                        first = False
                    self._dispatcher.add(handle)
                    await handle.exited.wait()
            except BaseException as exc:
                error = _only_start_error(exc)
                if error is None:
                    raise
                if first:
                    raise error from None
                _logger.warning("restart of slot %d failed: %s", slot, error)
            finally:
                self._dispatcher.remove(handle)
            if self._closing:
                return
            self._restarts += 1
            failures = 1 if trio.current_time() - lived_from > _STABLE_AFTER else failures + 1
            low, high = self._restart_backoff
            await trio.sleep(min(low * 2 ** (failures - 1), high))

    async def _sweep_shared_memory(self) -> None:
        """Files of messages nobody read (cancelled calls) must not pile up."""
        assert self._plane is not None
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            self._plane.sweep(_SWEEP_AGE)

    async def _health_check(self) -> None:
        if self._health_check_interval <= 0:
            return
        while True:
            await trio.sleep(self._health_check_interval)
            for handle in list(self._handles.values()):
                if handle.state == "ready":
                    self._nursery.start_soon(self._ping, handle)  # type: ignore[union-attr]

    async def _ping(self, handle: WorkerHandle) -> None:
        try:
            with trio.fail_after(self._health_check_interval):
                await handle.call(lambda stub: stub.ping(pb.PingRequest()))
        except (trio.TooSlowError, WorkerCrashedError):
            handle.kill("it failed its health check")

    def _heartbeat(self, message: pb.HeartbeatRequest) -> bool:
        return any(h.id == message.worker_id and h.alive for h in self._handles.values())

    async def _shutdown(self) -> None:
        """Drain (workers finish their calls), then terminate, then kill."""
        self._closing = True
        self._dispatcher.close("the pool is closed")
        async with trio.open_nursery() as nursery:
            for handle in list(self._handles.values()):
                nursery.start_soon(handle.shutdown, self._shutdown_timeout)


@asynccontextmanager
async def open_pool(
    adapter: str,
    *,
    size: int | None = None,
    concurrency: int = 1,
    max_queue: int = 1024,
    startup_timeout: float = 60.0,
    shutdown_timeout: float = 5.0,
    cancel_grace: float = 5.0,
    health_check_interval: float = 10.0,
    heartbeat_interval: float = 5.0,
    restart_backoff: tuple[float, float] = (0.1, 5.0),
    transport: str = "unix",
    python: str | None = None,
    env: dict[str, str] | None = None,
    adapter_options: dict[str, Any] | None = None,
    shared_memory_threshold: int | None = 1 << 20,
    state: StateBackend | None = None,
    max_sessions: int = 10_000,
    max_variables_per_session: int = 1000,
    max_value_bytes: int = 64 * 2**20,
    history_limit: int = 50,
) -> AsyncIterator[Pool]:
    """Start a pool of worker processes hosting ``adapter`` and yield it.

    All workers start at once; the block runs when every one of them is ready. Leaving the block
    -- normally, by error, by cancellation or Ctrl-C -- drains the workers (up to
    ``shutdown_timeout``), then terminates and kills what is left, and removes the socket files.

    Args:
        adapter: ``"package.module:ClassName"`` of an :class:`~trio_bridge.worker.Adapter`.
        size: number of worker processes (default: one per CPU core).
        concurrency: calls each worker serves at once (its thread pool size).
        max_queue: calls that may wait for a free worker; beyond it, ``PoolSaturatedError``.
        startup_timeout: seconds a worker may take to import its adapter, run ``setup()`` and
            report ready.
        shutdown_timeout: seconds workers get to finish their calls when the pool closes.
        cancel_grace: seconds a worker gets to free its slot after a call was cancelled before
            it is recycled.
        health_check_interval: seconds between pings of each worker (0 disables them); a worker
            that does not answer within that time is recycled.
        heartbeat_interval: seconds between the workers' heartbeats to the host.
        restart_backoff: (first, longest) delay in seconds before restarting a crashed worker;
            it doubles on each failure in a row.
        transport: ``"unix"`` (a socket in a private 0700 directory) or ``"tcp"`` (loopback).
        python: the interpreter for workers (default: the host's).
        env: extra environment variables for the workers.
        adapter_options: JSON-able options the adapter reads as ``self.options`` (set before
            ``setup()``), e.g. ``{"allow": ["numpy"]}`` for ``PythonAdapter``.
        shared_memory_threshold: numpy arrays of at least this many bytes travel through files
            on ``/dev/shm`` instead of the gRPC stream (Unix transport only; ``None`` disables).
        state: where sessions and variables live (default: a new in-memory backend with the
            quotas below; a shared backend lets several hosts share sessions).
        max_sessions, max_variables_per_session, max_value_bytes (encoded), history_limit
            (past values kept per variable): quotas of the default in-memory backend.

    Raises:
        WorkerStartError: a worker could not start (bad adapter path, ``setup()`` raised, no
            ready line in time); carries the worker's stderr tail, e.g. the ImportError.
    """
    if transport not in ("unix", "tcp"):
        raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
    size = size if size is not None else (os.cpu_count() or 1)
    if size < 1 or concurrency < 1:
        raise ValueError("size and concurrency must be at least 1")
    socket_dir = tempfile.mkdtemp(prefix="trio-bridge-")  # created 0700
    plane = None
    if transport == "unix" and shared_memory_threshold is not None:
        plane = SharedMemoryPlane.create(shared_memory_threshold)
    try:
        with _collapse_groups():
            async with _aio.open_loop() as loop:
                boundary = _aio.Boundary(loop)
                secret = secrets.token_urlsafe(32)
                host_socket = os.path.join(socket_dir, "host.sock")
                spec = WorkerSpec(
                    adapter=adapter, python=python or sys.executable, concurrency=concurrency,
                    transport=transport, socket_dir=socket_dir, secret=secret,
                    host_address=f"unix:{host_socket}", env={**(env or {}), **(plane.environment() if plane else {})},
                    startup_timeout=startup_timeout, heartbeat_interval=heartbeat_interval,
                    adapter_options=json.dumps(adapter_options or {}),
                )
                if state is None:
                    state = MemoryBackend(SessionStore(
                        max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
                        max_value_bytes=max_value_bytes, history_limit=history_limit,
                    ))
                pool = Pool(
                    spec=spec, size=size, max_queue=max_queue, boundary=boundary,
                    shutdown_timeout=shutdown_timeout, cancel_grace=cancel_grace,
                    health_check_interval=health_check_interval, restart_backoff=restart_backoff, state=state,
                    plane=plane,
                )
                state.on_session_end.append(pool._session_ended)
                async with boundary.serve([HostService(boundary, state, pool)], host_socket, secret):
                    async with trio.open_nursery() as nursery:
                        pool._nursery = nursery
                        await nursery.start(state.run)
                        try:
                            await pool._start()
                            yield pool
                        finally:
                            with trio.CancelScope(shield=True):
                                await pool._shutdown()
                            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
        if plane is not None:
            plane.remove()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Chunks:
    """The async iterator :meth:`Pool.stream` yields."""

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if type(item) is _Failure:
            raise item.error
        return item


@contextmanager
def _collapse_groups() -> Iterator[None]:
    """Re-raise a group holding a single exception as that exception.

    The exception a user's block raises (or one start error) should not reach them wrapped in
    groups just because the pool, and trio-asyncio, run background tasks in nurseries.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        single = _single_exception(group)
        if single is None:
            raise
        raise single from single.__cause__


def _single_exception(group: BaseExceptionGroup) -> BaseException | None:
    leaves = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else _only_start_error(group)


def _only_start_error(exc: BaseException) -> WorkerStartError | None:
    """The WorkerStartError that ``exc`` is, or that a group holding nothing else wraps."""
    if isinstance(exc, WorkerStartError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(WorkerStartError)
        if matched is not None and rest is None:
            while isinstance(matched, BaseExceptionGroup):
                matched = matched.exceptions[0]
            return matched  # type: ignore[return-value]
    return None


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
