"""Calls: the request, a worker slot, the unary or streaming exchange, cancellation grace, the
re-entrancy guard, and each call's outcome counted once (:class:`Metrics`).

A cancelled call keeps its worker slot until the worker really lets go of it (pinged until the
call is no longer active there); a worker that does not within ``cancel_grace`` seconds is
recycled, so a cancelled call can never leave a slot taken forever.
"""

from __future__ import annotations

import collections
import itertools
import math
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import trio

from trio_bridge import _tracing as tracing
from trio_bridge._errors import (
    PoolClosedError,
    PoolSaturatedError,
    ToolNotFoundError,
    TrioBridgeError,
    WorkerCrashedError,
    WorkerStartError,
)
from trio_bridge._host._dispatch import Affinity
from trio_bridge._host._groups import UserErrorTracker
from trio_bridge._host._idempotency import IdempotentCalls
from trio_bridge._host._metrics import UNKNOWN_TOOL, Metrics, Outcome
from trio_bridge._host._options import Lifecycle
from trio_bridge._host._router import Route, Router
from trio_bridge._host._supervisor import Supervisor
from trio_bridge._host._tools import in_worker_callback
from trio_bridge._host._worker import CallNotStarted, ToolCall, Worker
from trio_bridge._state.backend import StateBackend
from trio_bridge._wire.chunks import decode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import timeout_to_wire
from trio_bridge._wire.shared_memory import SharedMemoryPlane

_MAX_NOT_STARTED = 16  # workers a call is given to in turn while each refuses it (draining), before it fails


def _no_worker_took_it() -> WorkerStartError:
    return WorkerStartError(
        f"{_MAX_NOT_STARTED} workers in a row refused the call because they drain (SIGTERM, or a SIGHUP "
        "reload): none took it; try again once they serve again", worker_id="",
    )


class Calls:
    """Runs calls on the pool's workers. A call a worker did not start because it drains runs
    on another (up to ``_MAX_NOT_STARTED`` workers in turn): its caller sees nothing of it."""

    def __init__(
        self,
        *,
        supervisor: Supervisor,
        router: Router,
        metrics: Metrics,
        state: StateBackend,
        plane: SharedMemoryPlane | None,
        lifecycle: Lifecycle,
    ) -> None:
        self._supervisor = supervisor
        self._router = router
        self._metrics = metrics
        self._state = state
        self._plane = plane
        self._cancel_grace = lifecycle.cancel_grace
        self._no_worker_timeout = lifecycle.no_worker_timeout
        self._call_ids = itertools.count(1)
        # a worker may serve several pools (remote workers): ids unique across them (DescribeRequest.cancel_calls)
        self._call_prefix = f"c{secrets.token_hex(4)}-"
        self._parked_calls: collections.Counter[str] = collections.Counter()
        self._on_workers: set[str] = set()  # ids of the calls holding a worker's slot
        self._nursery: trio.Nursery | None = None
        self._idempotent = IdempotentCalls(state, metrics, check_open=self._check_open)

    def attach(self, nursery: trio.Nursery) -> None:
        """Where slots of cancelled calls are held until released (the pool's nursery)."""
        self._nursery = nursery

    # ---- unary ----
    async def execute(
        self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None, affinity: Affinity | None = None,
        *, idempotency_key: str | None = None,
    ) -> Any:
        """Run ``tool`` and return its result (the errors of ``Pool.execute``); a span of its
        own when traces are on (:mod:`trio_bridge._tracing`). With ``idempotency_key``, at most
        once to completion for that key (:mod:`trio_bridge._host._idempotency`)."""
        if idempotency_key is None:
            return await self._traced(tool, arguments, route, affinity)
        session_id = route.session_id if route is not None else ""
        return await self._idempotent.execute(
            idempotency_key, tool, arguments, session_id, lambda: self._traced(tool, arguments, route, affinity),
        )

    async def _traced(self, tool: str, arguments: dict[str, Any] | None, route: Route | None, affinity: Affinity | None) -> Any:
        if not tracing.enabled():  # the common case, kept off the generator-based span
            return await self._execute(tool, arguments, route, affinity, "")
        attributes = {"trio_bridge.tool": tool, "trio_bridge.session": route.session_id if route else ""}
        with tracing.span(f"trio_bridge call {tool}", kind="client", attributes=attributes) as traceparent:
            return await self._execute(tool, arguments, route, affinity, traceparent)

    async def _execute(
        self, tool: str, arguments: dict[str, Any] | None, route: Route | None, affinity: Affinity | None, traceparent: str,
    ) -> Any:
        outcome = Outcome.REFUSED
        answered_in: float | None = None
        queued: float | None = None
        label = tool
        try:
            request = await self._request(tool, arguments, route, traceparent)
            queued_at = trio.current_time()
            for attempt in range(_MAX_NOT_STARTED):
                outcome = Outcome.CANCELLED_QUEUED
                worker = await self._acquire(route, affinity, readmitted=attempt > 0)
                self._on_workers.add(request.call_id)
                outcome = Outcome.CANCELLED
                started = trio.current_time()
                queued = started - queued_at
                finished = False
                try:
                    if route is not None:  # (no coroutine for calls without a session)
                        await self._router.enter_session(worker, route)
                    try:
                        encoded = await worker.execute(request)
                    except CallNotStarted:  # it drains: another worker runs the call
                        finished = True
                        continue
                    except WorkerCrashedError:
                        raise
                    except TrioBridgeError:
                        finished = True
                        answered_in = trio.current_time() - started
                        worker.figures.answered(failed=True, seconds=answered_in)
                        outcome = Outcome.FAILED
                        raise
                    finished = True
                    answered_in = trio.current_time() - started
                    worker.figures.answered(failed=False, seconds=answered_in)
                    outcome = Outcome.FAILED  # until the result decodes
                    result = decode(encoded, plane=self._plane, owned=True)
                    outcome = Outcome.COMPLETED
                    return result
                except WorkerCrashedError:
                    finished = True
                    outcome = Outcome.CRASHED
                    worker.figures.crashed()
                    raise
                finally:
                    self._finish_call(worker, request.call_id, finished, route)
            outcome = Outcome.REFUSED
            raise _no_worker_took_it()
        except BaseException as exc:
            outcome = _refused_if_not_cancelled(outcome, exc)
            if isinstance(exc, ToolNotFoundError):
                label = UNKNOWN_TOOL
            if outcome in (Outcome.FAILED, Outcome.CRASHED):
                self._metrics.error(tool, outcome, exc)
            raise
        finally:
            self._metrics.record(outcome, answered_in, tool=label, queued=queued)

    # ---- streaming ----
    def stream(
        self, tool: str, arguments: dict[str, Any] | None, buffer_size: int, route: Route | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        """Run a streaming tool; the block gets an async iterator of its chunks."""
        if buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0, not {buffer_size}")
        return self._stream(tool, arguments, buffer_size, route)

    @asynccontextmanager
    async def _stream(
        self, tool: str, arguments: dict[str, Any] | None, buffer_size: int, route: Route | None
    ) -> AsyncIterator[AsyncIterator[Any]]:
        result = _StreamResult()
        try:
            request = await self._request(tool, arguments, route)
            result.outcome = Outcome.CANCELLED_QUEUED
            queued_at = trio.current_time()
            worker = await self._acquire(route, None)
        except BaseException as exc:
            self._metrics.record(_refused_if_not_cancelled(result.outcome, exc), tool=tool)
            raise
        self._on_workers.add(request.call_id)
        result.worker = worker
        result.outcome = Outcome.CANCELLED
        result.started = trio.current_time()
        queued = result.started - queued_at
        send, receive = trio.open_memory_channel[Any](buffer_size)
        tracker = UserErrorTracker()
        try:
            await self._router.enter_session(worker, route)
            with tracker.resolve_groups():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_stream, request, route, send, result)
                    try:
                        with tracker.user_block():
                            yield _Chunks(receive)
                    finally:
                        # Stop the pump before closing its channel: closed first, a pump about
                        # to send would fail with BrokenResourceError instead of being cancelled.
                        nursery.cancel_scope.cancel()
                        receive.close()
        except WorkerCrashedError:
            result.outcome = Outcome.CRASHED
            raise
        finally:
            if result.worker is not None:
                self._finish_call(result.worker, request.call_id, result.done, route)
            label = UNKNOWN_TOOL if result.unknown_tool else tool
            self._metrics.record(result.outcome, result.answered_in, tool=label, queued=queued)

    async def _pump_stream(
        self, request: ToolCall, route: Route | None, send: trio.MemorySendChannel[Any], result: _StreamResult,
    ) -> None:
        async with send:
            worker = result.worker
            assert worker is not None
            try:
                for _ in range(_MAX_NOT_STARTED):
                    try:
                        await self._pump_from(worker, request, send)
                        break
                    except CallNotStarted:  # it drains (refused before the first chunk): another worker runs it
                        result.worker = None
                        self._finish_call(worker, request.call_id, True, route)
                        try:
                            worker = await self._acquire(route, None, readmitted=True)
                        except TrioBridgeError as exc:  # no worker ran it: a refusal, charged to none
                            result.outcome, result.done = Outcome.REFUSED, True
                            await send.send(_Failure(exc))
                            return
                        self._on_workers.add(request.call_id)
                        result.worker = worker
                        await self._router.enter_session(worker, route)
                else:
                    result.outcome, result.done = Outcome.REFUSED, True
                    await send.send(_Failure(_no_worker_took_it()))
                    return
                result.finish(Outcome.COMPLETED)
                worker.figures.answered(failed=False)
            except TrioBridgeError as exc:
                crashed = isinstance(exc, WorkerCrashedError)
                result.unknown_tool = isinstance(exc, ToolNotFoundError)
                result.finish(Outcome.CRASHED if crashed else Outcome.FAILED)
                if crashed:
                    worker.figures.crashed()
                else:
                    worker.figures.answered(failed=True)
                await send.send(_Failure(exc))

    async def _pump_from(self, worker: Worker, request: ToolCall, send: trio.MemorySendChannel[Any]) -> None:
        """Pass the stream of ``request`` on ``worker`` to ``send``, chunk by chunk."""
        async with worker.open_stream(request) as receive:
            while True:
                batch = await receive()
                if batch is None:
                    return
                for item in decode_batch(batch, plane=self._plane):
                    try:
                        send.send_nowait(item)  # no task switch while the buffer has room
                    except trio.WouldBlock:
                        await send.send(item)

    # ---- shared ----
    async def _request(self, tool: str, arguments: dict[str, Any] | None, route: Route | None, traceparent: str = "") -> ToolCall:
        self._check_open()
        payload = encode({} if arguments is None else arguments, path="arguments", plane=self._plane)  # fails before any wait
        session_id, state_version = "", 0
        if route is not None:
            info = await self._state.touch_session(route.session_id)  # SessionNotFoundError once it ended
            session_id, state_version = info.id, info.state_version
        deadline = trio.current_effective_deadline()  # -inf once the caller's scope is cancelled: passed
        timeout = timeout_to_wire(None if deadline == math.inf else deadline - trio.current_time())
        return ToolCall(
            call_id=f"{self._call_prefix}{next(self._call_ids)}", tool=tool, arguments=payload, session_id=session_id,
            state_version=state_version, timeout_seconds=timeout, traceparent=traceparent,
        )

    def _check_open(self) -> None:
        if self._supervisor.closing:
            raise PoolClosedError("the pool is closed")

    async def _acquire(self, route: Route | None, affinity: Affinity | None, *, readmitted: bool = False) -> Worker:
        """A slot for a call. ``readmitted``: a draining worker gave the call back (it was admitted
        already: ``max_queue`` does not refuse it). A re-entrant call (made while its caller's
        call waits on the host) passes its session's ``max_in_flight``: that call holds a place."""
        nested = self._check_reentrancy()
        if self._supervisor.any_ready:
            return await self._router.acquire(route, affinity, nested=nested, readmitted=readmitted)
        # No worker is ready (they are starting, restarting, or out of reach; or a head's
        # remote workers are yet to be found or to join): wait a bounded time, then say why.
        with trio.move_on_after(self._no_worker_timeout):
            return await self._router.acquire(route, affinity, nested=nested, readmitted=readmitted)
        failure = self._supervisor.last_start_error
        if failure is None:
            why = (
                "the pool has no local workers, and no remote worker was found (RemoteWorkers(addresses=['dns://...'])) "
                "or joined (trio-bridge worker --join)" if not self._supervisor.size else "none of its workers is ready (starting, restarting, or out of reach)"
            )
            raise WorkerStartError(f"no worker was ready within {self._no_worker_timeout:g} s (Lifecycle.no_worker_timeout): {why}", worker_id="")
        raise WorkerStartError(
            f"no worker could start within {self._no_worker_timeout:g} s (Lifecycle.no_worker_timeout); the last "
            f"attempt failed: {failure}", worker_id=failure.worker_id, pid=failure.pid,
            exit_code=failure.exit_code, stderr_tail=failure.stderr_tail,
        )

    @contextmanager
    def parked(self, call_id: str) -> Iterator[None]:
        """While a worker's call ``call_id`` waits on the host (a host tool, a routed call), its
        slot cannot free; pool calls made meanwhile from there are re-entrant. A ``call_id`` that
        holds no slot (a client of the host service that is not one of the pool's calls) parks
        nothing."""
        if call_id not in self._on_workers:
            yield
            return
        self._parked_calls[call_id] += 1
        token = in_worker_callback.set(True)
        try:
            yield
        finally:
            in_worker_callback.reset(token)
            self._parked_calls[call_id] -= 1
            if not self._parked_calls[call_id]:
                del self._parked_calls[call_id]

    def _check_reentrancy(self) -> bool:
        """Whether the call is re-entrant; one that could only wait for ever raises
        :class:`PoolSaturatedError`."""
        if not in_worker_callback.get():
            return False
        capacity = self._supervisor.capacity
        if len(self._parked_calls) >= capacity:
            raise PoolSaturatedError(
                f"a host tool (or a worker-to-worker call) called the pool while all {capacity} worker slot(s) "
                "are held by calls waiting on the host: waiting would deadlock. Open the pool with more "
                "workers or a higher concurrency, or do not call the pool from this host tool."
            )
        return True

    def _finish_call(self, worker: Worker, call_id: str, finished: bool, route: Route | None) -> None:
        self._on_workers.discard(call_id)
        if finished or not worker.lifecycle.alive:
            self._router.release(worker, route)
            return
        # Cancelled mid-call: the slot stays taken until the worker really lets go of the call.
        assert self._nursery is not None
        self._nursery.start_soon(self._hold_until_released, worker, call_id, route)

    async def _hold_until_released(self, worker: Worker, call_id: str, route: Route | None) -> None:
        try:
            with trio.move_on_after(self._cancel_grace) as grace:
                delay = 0.005
                while worker.lifecycle.alive:
                    try:
                        with trio.fail_after(max(self._cancel_grace, 1)):
                            active = await worker.active_calls()
                    except (WorkerCrashedError, trio.TooSlowError):
                        break
                    if call_id not in active:
                        break
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.2)
            if grace.cancelled_caught:
                worker.kill(f"it did not free its slot within {self._cancel_grace:g} s after call {call_id} was cancelled")
        finally:
            self._router.release(worker, route)


def _refused_if_not_cancelled(outcome: Outcome, exc: BaseException) -> Outcome:
    """An error before a worker ran the call is a refusal, unless it is a cancellation."""
    if outcome in (Outcome.REFUSED, Outcome.CANCELLED_QUEUED) and not isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
        return Outcome.REFUSED
    return outcome


class _StreamResult:
    __slots__ = ("answered_in", "done", "outcome", "started", "unknown_tool", "worker")

    def __init__(self) -> None:
        self.worker: Worker | None = None  # the worker whose slot the stream holds
        self.unknown_tool = False
        self.outcome = Outcome.REFUSED
        self.started = 0.0
        self.answered_in: float | None = None
        self.done = False

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done = True
        if outcome is not Outcome.CRASHED:
            self.answered_in = trio.current_time() - self.started


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Chunks:
    """The async iterator ``Pool.stream`` yields. A chunk already buffered is taken without a
    schedule point (a task switch per chunk would cap a stream at ~30k chunks/s); every
    ``_YIELD_EVERY`` chunks, and whenever it must wait, it is a full checkpoint."""

    _YIELD_EVERY = 64

    def __init__(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        self._receive = receive
        self._taken = 0

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> Any:
        self._taken += 1
        try:
            if self._taken % self._YIELD_EVERY:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    item = self._receive.receive_nowait()
                except trio.WouldBlock:
                    item = await self._receive.receive()
            else:
                item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if type(item) is _Failure:
            raise item.error
        return item
