"""Fake workers: test code that uses a pool, without worker processes.

:func:`open_fake_pool` yields a real :class:`~trio_bridge.Pool` -- the same dispatcher,
supervisor, calls, sessions and statistics -- whose workers are in-memory fakes running plain
Python functions as tools, in Trio, on Trio's clock. A test can kill a worker, make it stop
answering, or make starts fail, and run on ``trio.testing.MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock`` fixture), so restarts, backoffs, health checks and TTLs cost
no real time::

    from trio_bridge.testing import open_fake_pool

    async def test_retry(autojump_clock):
        async with open_fake_pool({"add": lambda a, b=2: a + b}, size=2) as (pool, workers):
            assert await pool.execute("add", {"a": 1}) == 3
            workers.kill(0)                      # slot 0's worker dies; the pool restarts it
            await workers.wait_started(3)        # two at start, one replacement

What the fakes do not have: a process (``pid`` is ``None``), the wire (arguments and results
are still encoded and decoded, so unencodable values fail as they would), shared memory, and
the worker side of sessions (tools get a :class:`FakeContext`, not a ``SessionContext``).
"""

from __future__ import annotations

import collections
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import trio

from trio_bridge._core.admission import Draining, admit_call
from trio_bridge._core.failures import is_failure
from trio_bridge._core.tools import ToolDefinition, define_tool
from trio_bridge._errors import InvalidArgumentError, TrioBridgeError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._metrics import WorkerFigures
from trio_bridge._host._options import PoolOptions, check_seconds, pool_options
from trio_bridge._host._pool import Pool, PoolParts, compose
from trio_bridge._host._process import WorkerSpec
from trio_bridge._host._tools import ToolInfo, run_host_tool, tool_info
from trio_bridge._host._worker import (
    CallNotStarted,
    Receive,
    ToolCall,
    WorkerInfo,
    WorkerLifecycle,
    WorkerState,
    process_crashed_error,
    worker_info,
)
from trio_bridge._wire.chunks import encode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import DEADLINE_SLACK
from trio_bridge._wire.errors import (
    DRAINING,
    TOOL_ERROR,
    deadline_error,
    draining_notice,
    error_info,
    exception_from,
    tool_failure,
)
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tool_spec import tool_spec

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
_STDERR_TAIL_LINES = 40
FAKE_ADAPTER = "trio_bridge.testing:FakeWorker"
# open_pool options that only concern processes: accepted, and without effect on fakes.
_PROCESS_OPTIONS = frozenset({
    "transport", "python", "env", "adapter_options", "shared_memory_threshold", "heartbeat_interval",
})


def stubborn(function: F) -> F:
    """Mark a tool as one that ignores cancellation: cancelling its call (or its deadline) does
    not stop it (like a ``time.sleep`` in a real worker's thread), so the worker keeps listing
    the call as active until the tool returns; :attr:`FakeContext.cancelled` is still set.
    Returns ``function``."""
    function.__trio_bridge_stubborn__ = True  # type: ignore[attr-defined]
    return function


class FakeContext:
    """What a fake tool gets in a parameter annotated ``FakeContext``.

    Attributes:
        worker_id: the id of the fake worker running the call.
        call_id: the call's id.
        session_id: the call's session (``""`` outside a session).
        cancelled: set when the host cancelled the call.
    """

    def __init__(self, worker: FakeWorker, call_id: str, session_id: str) -> None:
        self.worker_id: str = worker.id
        self.call_id: str = call_id
        self.session_id: str = session_id
        self.cancelled: trio.Event = trio.Event()
        self._workers = worker.workers

    async def call_host_tool(self, name: str, /, **arguments: Any) -> Any:
        """Call a host tool registered on the pool, as a worker's ``ctx.acall_host_tool`` does:
        the call is parked meanwhile (the pool's re-entrancy guard sees it).

        Raises:
            ToolNotFoundError, InvalidArgumentError: no such host tool, or wrong arguments.
            ToolError: the host tool raised (e.g. ``remote_type == "PoolSaturatedError"``).
        """
        parts = self._workers.parts
        tool = parts.tools.host_tool(name, self.session_id)
        checked = tool.definition.check_arguments(arguments)
        with parts.calls.parked(self.call_id):
            try:
                return await run_host_tool(tool, checked)
            except Exception as exc:
                raise exception_from(error_info(exc, kind=TOOL_ERROR), name) from None

    async def call_tool(self, name: str, /, **arguments: Any) -> Any:
        """Call a tool of any worker of the pool, routed by the host in this call's session, as a
        worker's ``ctx.call_tool`` does (parked meanwhile)."""
        parts = self._workers.parts
        route = parts.route_for(self.session_id) if self.session_id else None
        with parts.calls.parked(self.call_id):
            return await parts.calls.execute(name, arguments, route)


@dataclass(frozen=True)
class StartAttempt:
    """One start of a fake worker: ``at`` is ``trio.current_time()`` when its handle was made;
    ``failed`` whether it failed to start."""

    worker_id: str
    slot: int
    at: float
    failed: bool


class FakeWorkers:
    """The test's handle on a fake pool's workers (from :func:`open_fake_pool`).

    Attributes:
        start_delay: seconds (Trio clock) a worker takes to become ready; may be changed.
        attempts: every start so far, in order.
        made: every fake worker made so far, in order.
    """

    def __init__(
        self, tools: Mapping[str, Callable[..., Any]], *, concurrency: int, start_delay: float, startup_timeout: float,
        adapter: str = FAKE_ADAPTER, runner: Callable[[FakeWorker], ToolRunner] | None = None,
    ) -> None:
        self.start_delay: float = start_delay
        self.attempts: list[StartAttempt] = []
        self.made: list[FakeWorker] = []
        self._definitions = {name: _define(name, fn) for name, fn in tools.items()}
        self._runner = runner
        self._spec = WorkerSpec(
            adapter=adapter, python="", concurrency=concurrency, transport="fake", socket_dir="", secret="",
            host_address="", env={}, startup_timeout=startup_timeout, heartbeat_interval=0.0,
        )
        self._failures_left: float = 0
        self._failure = ("", 1)
        self._started = 0
        self._changed = trio.Event()
        self._parts: PoolParts | None = None

    @property
    def parts(self) -> PoolParts:
        """The running pool's parts (what the fake workers' calls back to the host use)."""
        assert self._parts is not None, "the fake pool is not running"
        return self._parts

    def fail_starts(self, times: float = math.inf, *, message: str = "the adapter's setup() failed", exit_code: int = 1) -> None:
        """Make the next ``times`` starts fail (default: every one until :meth:`allow_starts`),
        each exiting with ``exit_code`` and ``message`` as its stderr tail."""
        self._failures_left = times
        self._failure = (message, exit_code)

    def allow_starts(self) -> None:
        """Let starts succeed again."""
        self._failures_left = 0

    def worker(self, slot: int) -> FakeWorker:
        """The current worker of ``slot``."""
        return cast(FakeWorker, self.parts.supervisor.handles[slot])

    def kill(self, slot: int, *, exit_code: int = -signal.SIGKILL, stderr: str = "") -> FakeWorker:
        """The worker of ``slot`` dies by itself (not the pool's doing) with ``exit_code``
        (``-N``: signal N); its calls fail with ``WorkerCrashedError``. Returns it."""
        worker = self.worker(slot)
        if stderr:
            worker.stderr_tail.extend(stderr.splitlines())
        worker._exit(exit_code)
        return worker

    def drain(self, slot: int) -> FakeWorker:
        """The worker of ``slot`` drains by itself (a real one on SIGTERM or SIGHUP): it refuses
        the calls it has not started, as a real one does, before the pool knows (the pool runs
        them on other workers); its running calls go on. Returns it."""
        worker = self.worker(slot)
        worker._calls.draining = True
        return worker

    def hang(self, slot: int) -> FakeWorker:
        """The worker of ``slot`` stops answering (pings and new calls never return), as a
        real worker whose event loop is blocked. Returns it."""
        worker = self.worker(slot)
        worker.hung = True
        return worker

    async def wait_started(self, count: int) -> FakeWorker:
        """Wait until ``count`` workers in all have become ready over the pool's life; return
        the latest."""
        while self._started < count:
            await self._changed.wait()
        return [w for w in self.made if w.started_at is not None][-1]

    # ---- for FakeWorker ----
    def _new_worker(self, worker_id: str, slot: int) -> FakeWorker:
        """The pool's worker factory (``compose``'s ``new_worker``)."""
        worker = FakeWorker(worker_id, slot, self, self._runner)
        self.made.append(worker)
        return worker

    def _next_start(self, worker: FakeWorker) -> tuple[str, int] | None:
        failure = self._failure if self._failures_left > 0 else None
        self._failures_left -= failure is not None
        self.attempts.append(StartAttempt(worker.id, worker.slot, trio.current_time(), failure is not None))
        return failure

    def _started_one(self) -> None:
        self._started += 1
        self._changed.set()
        self._changed = trio.Event()


@dataclass(eq=False)
class _Call:
    context: Any
    cancel_context: Callable[[], None]  # tells the tool its call was cancelled (``ctx.cancelled``)
    stubborn: bool
    scope: trio.CancelScope
    done: trio.Event
    result: Any = None  # the encoded result
    error: pb.ErrorInfo | None = None  # or the error the call ended with


class ToolRunner(Protocol):
    """How a :class:`FakeWorker` runs its tools, one per worker: plain Python functions
    (:class:`PlainTools`), or an adapter's tools (``open_adapter_pool``'s in-process workers).

    Attributes:
        definitions: its tools, by name (final once :meth:`prepare` returned).
        tells_tools_on_exit: a tool still running when the worker dies is told its call was
            cancelled (it runs in a thread that outlives its worker).
    """

    definitions: Mapping[str, ToolDefinition]
    tells_tools_on_exit: bool

    async def prepare(self) -> tuple[str, int] | None:
        """Before the worker is ready (within ``startup_timeout``): ``(stderr, exit_code)`` if it fails."""
        ...

    def new_context(self, call: ToolCall) -> tuple[Any, Callable[[], None]]:
        """The context a tool gets, and how to tell it its call was cancelled."""
        ...

    def stubborn(self, definition: ToolDefinition) -> bool:
        """Whether cancelling the call leaves its tool running (see :func:`stubborn`)."""
        ...

    async def call_starting(self, call: ToolCall, definition: ToolDefinition) -> None:
        """Before the tool runs; what it raises refuses the call."""
        ...

    async def call_finished(self, context: Any) -> None:
        """After the tool ended, however it ended (shielded)."""
        ...

    async def invoke(self, definition: ToolDefinition, arguments: dict[str, Any]) -> Any:
        """Run a unary tool; its result."""
        ...

    async def next_chunk(self, definition: ToolDefinition, chunks: Any) -> tuple[bool, Any]:
        """``(True, chunk)``, or ``(False, None)`` at the end of a streaming tool."""
        ...

    async def close_chunks(self, definition: ToolDefinition, chunks: Any) -> None:
        """Stop a streaming tool's generator (shielded)."""
        ...

    async def session_started(self, session_id: str, metadata: Any) -> None:
        """A session's first call here is coming (InitializeSession)."""
        ...

    async def session_ended(self, session_id: str) -> None:
        """The session ended (CleanupSession)."""
        ...


class PlainTools:
    """Plain Python functions as a fake worker's tools, run in Trio (see :func:`open_fake_pool`)."""

    tells_tools_on_exit = False

    def __init__(self, worker: FakeWorker, definitions: Mapping[str, ToolDefinition]) -> None:
        self.definitions: Mapping[str, ToolDefinition] = definitions
        self._worker = worker

    async def prepare(self) -> tuple[str, int] | None:
        return None

    def new_context(self, call: ToolCall) -> tuple[Any, Callable[[], None]]:
        context = FakeContext(self._worker, call.call_id, call.session_id)
        return context, context.cancelled.set

    def stubborn(self, definition: ToolDefinition) -> bool:
        return bool(getattr(definition.function, "__trio_bridge_stubborn__", False))

    async def call_starting(self, call: ToolCall, definition: ToolDefinition) -> None:
        pass

    async def call_finished(self, context: Any) -> None:
        pass

    async def invoke(self, definition: ToolDefinition, arguments: dict[str, Any]) -> Any:
        result = definition.function(**arguments)
        return await result if definition.kind == "async" else result

    async def next_chunk(self, definition: ToolDefinition, chunks: Any) -> tuple[bool, Any]:
        try:
            return True, (await anext(chunks) if definition.kind == "async_generator" else next(chunks))
        except (StopIteration, StopAsyncIteration):
            return False, None

    async def close_chunks(self, definition: ToolDefinition, chunks: Any) -> None:
        if definition.kind == "async_generator":
            await chunks.aclose()
        else:
            chunks.close()

    async def session_started(self, session_id: str, metadata: Any) -> None:
        pass

    async def session_ended(self, session_id: str) -> None:
        pass


class FakeWorker:
    """A worker with no process: its tools are the Python functions given to
    :func:`open_fake_pool`, run in the pool's Trio run. Made by the pool, not by users.

    Attributes:
        id, slot: its id (``"w3"``) and its slot.
        workers: the test's handle on the pool's workers.
        hung: it does not answer (see :meth:`FakeWorkers.hang`).
        started_sessions: ``(session_id, metadata)`` of each session initialized on it.
        ended_sessions: ids of the sessions it was told had ended.
        stderr_tail: what it "printed" (a test adds lines with :meth:`FakeWorkers.kill`).
        address: ``"fake:ID"`` once it started.
    """

    pid = None  # no process

    def __init__(
        self, worker_id: str, slot: int, workers: FakeWorkers, runner: Callable[[FakeWorker], ToolRunner] | None = None
    ) -> None:
        self.id: str = worker_id
        self.slot: int = slot
        self.workers: FakeWorkers = workers
        self.lifecycle: WorkerLifecycle = WorkerLifecycle(worker_id, workers._spec.concurrency)
        self.figures: WorkerFigures = WorkerFigures()
        self.sessions: set[str] = set()
        self.tools: Mapping[str, ToolInfo] = {}
        self.address: str = ""
        self.hung: bool = False
        self.started_sessions: list[tuple[str, Any]] = []
        self.ended_sessions: list[str] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._runner: ToolRunner = runner(self) if runner is not None else PlainTools(self, workers._definitions)
        self._calls = _FakeCalls(self, self._runner)
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        life = self.lifecycle
        return f"<FakeWorker {self.id} {life.state.value} busy={life.busy}/{life.concurrency}>"

    # ---- what tests read (and set) ----
    @property
    def calls_given(self) -> int:
        """Calls the pool handed it (what ``Recycling.max_calls`` counts)."""
        return self.lifecycle.calls_given

    @property
    def calls_served(self) -> int:
        """Calls it answered (a result, or the call's own error)."""
        return self.figures.calls_served

    @property
    def death_reason(self) -> str:
        """Why the pool stopped it (``""``: it was not stopped by the pool)."""
        return self.lifecycle.death_reason

    @property
    def exit_code(self) -> int | None:
        return self.lifecycle.exit_code

    @property
    def started_at(self) -> float | None:
        return self.lifecycle.started_at

    @property
    def rss(self) -> int | None:
        """Its resident set size (bytes): what a test sets (a fake has no process to measure)."""
        return self.figures.rss

    @rss.setter
    def rss(self, value: int | None) -> None:
        self.figures.rss = value

    def info(self) -> WorkerInfo:
        """Its snapshot, as :meth:`Pool.workers` shows it (``pid`` is ``None``)."""
        return worker_info(self, pid=None, address=self.address)

    def running_nursery(self) -> trio.Nursery:
        """Where its calls' tasks run, while it runs.

        Raises:
            TrioBridgeError: it is not running.
        """
        if self._nursery is None:
            raise TrioBridgeError(f"worker {self.id} is not running")
        return self._nursery

    # ---- life cycle ----
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Become ready after ``start_delay`` seconds (or fail to), then serve until it dies."""
        workers = self.workers
        failure = workers._next_start(self)
        self.address = f"fake:{self.id}"
        startup_timeout = workers._spec.startup_timeout
        try:
            with trio.move_on_after(startup_timeout) as timeout:
                await trio.sleep(workers.start_delay)
                if failure is None:
                    failure = await self._runner.prepare()
            if timeout.cancelled_caught:
                self.kill("it was not ready in time")
                raise self._start_error(f"printed no ready line within {startup_timeout:g} s")
            if failure is not None:
                message, exit_code = failure
                self.stderr_tail.extend(message.splitlines())
                self._exit(exit_code)
                raise self._start_error("exited before it was ready")
            if self.lifecycle.state is WorkerState.DEAD:  # killed (the pool closing) or exited meanwhile
                reason = self.lifecycle.death_reason
                raise self._start_error(f"was stopped as it started: {reason}" if reason else "exited as it started")
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.tools = {name: tool_info(tool_spec(d)) for name, d in self._runner.definitions.items()}
                self.lifecycle.ready()
                workers._started_one()
                task_status.started()
                await self.lifecycle.exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._exit(-signal.SIGTERM)  # stopped with its owner (a no-op if it already died)

    def _start_error(self, message: str) -> WorkerStartError:
        return WorkerStartError(
            f"{message} (adapter {self.workers._spec.adapter!r})", worker_id=self.id, pid=None,
            exit_code=self.lifecycle.exit_code, stderr_tail="\n".join(self.stderr_tail),
        )

    def crashed_error(self) -> WorkerCrashedError:
        """The error a call on it gets once it is gone (exit code, stderr tail)."""
        return process_crashed_error(self.id, None, self.lifecycle, self.stderr_tail)

    def _exit(self, exit_code: int) -> None:
        """It is gone: calls on it fail with ``WorkerCrashedError``, its tools stop."""
        if self.lifecycle.exited.is_set():
            return
        self.lifecycle.exit(exit_code)
        self._calls.stop()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def kill(self, reason: str) -> None:
        """The pool stops it (SIGKILL); calls on it fail with ``WorkerCrashedError``."""
        if self.lifecycle.stopping(reason):
            self._exit(-signal.SIGKILL)

    def sample_memory(self) -> int | None:
        """What a test set as its :attr:`rss` (bytes): a fake has no process to measure."""
        return self.figures.rss if self.lifecycle.alive else None

    async def shutdown(self, grace: float) -> None:
        """Let its calls finish (at most ``grace`` seconds), then exit with status 0."""
        if self.lifecycle.state not in (WorkerState.READY, WorkerState.DRAINING):
            return
        self.lifecycle.enter(WorkerState.DRAINING)
        await self._calls.drain(grace)
        self._exit(0)

    # ---- calls ----
    async def _answering(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run ``run()`` as an RPC to it would: it fails at once if it is not running, and with
        it if it dies meanwhile.

        Raises:
            WorkerCrashedError: it is not running, or died during the call.
        """
        if not self.lifecycle.alive or self.lifecycle.state is WorkerState.STARTING:
            raise self.crashed_error()
        with self.lifecycle.guarded():
            return await run()
        raise self.crashed_error()  # cancelled by its exit: it died mid-call

    async def execute(self, call: ToolCall) -> Any:
        """One tool call (a real worker's goes on its call stream; here, like any RPC).

        Raises:
            WorkerCrashedError: it died during the call. TrioBridgeError: the call failed.
        """
        done = await self._answering(lambda: self._calls.unary(call))
        if done.error is not None:
            raise _failure(done.error, call.tool, self.lifecycle)
        return done.result

    def open_stream(self, call: ToolCall) -> AbstractAsyncContextManager[Receive]:
        """Run a streaming tool: each batch is one chunk.

        Raises:
            WorkerCrashedError: it is not running, or died during the stream. TrioBridgeError: the tool failed.
        """
        if not self.lifecycle.alive or self.lifecycle.state is WorkerState.STARTING:
            raise self.crashed_error()
        return self._calls.stream(call)

    async def _wait_while_hung(self) -> None:
        if self.hung:
            await trio.sleep_forever()

    async def active_calls(self) -> list[str]:
        """The ids of the calls it runs now (never returns while it is hung).

        Raises:
            WorkerCrashedError: it is not running, or died meanwhile.
        """

        async def ping() -> list[str]:
            await self._wait_while_hung()
            return list(self._calls.active)

        return await self._answering(ping)

    async def begin_session(self, session_id: str, metadata: Any) -> None:
        """A session's first call here is coming (kept in :attr:`started_sessions`, decoded)."""

        async def initialize() -> None:
            await self._wait_while_hung()
            decoded = decode(metadata)
            self.started_sessions.append((session_id, decoded))
            await self._runner.session_started(session_id, decoded)

        await self._answering(initialize)

    async def end_session(self, session_id: str) -> None:
        """The session ended (kept in :attr:`ended_sessions`)."""

        async def cleanup() -> None:
            await self._wait_while_hung()
            self.ended_sessions.append(session_id)
            await self._runner.session_ended(session_id)

        await self._answering(cleanup)



class _FakeCalls:
    """The calls a :class:`FakeWorker` runs: each checked as a worker process checks it
    (:func:`~trio_bridge._core.admission.admit_call`), its tool run by the worker's
    :class:`ToolRunner` in a task of the worker's nursery, unary or streamed.

    Attributes:
        active: the running calls by id (what a ping lists).
        draining: it takes no new call (the worker is shutting down).
    """

    def __init__(self, worker: FakeWorker, runner: ToolRunner) -> None:
        self.active: dict[str, _Call] = {}
        self.idle: trio.Event = trio.Event()
        self.draining: bool = False
        self._worker = worker
        self._runner = runner

    async def unary(self, request: ToolCall) -> _Call:
        """Run a unary call to its end (cancelling it cancels its tool, unless that is stubborn)."""
        call = await self._begin(request, streaming=False, produce=lambda call, definition, arguments: self._run_tool(
            call, definition, arguments, request.timeout_seconds
        ))
        if isinstance(call, pb.ErrorInfo):
            return _Call(None, _nothing, False, trio.CancelScope(), trio.Event(), error=call)
        try:
            await call.done.wait()
        except BaseException:
            self._cancel(call)
            raise
        return call

    @asynccontextmanager
    async def stream(self, request: ToolCall) -> AsyncIterator[Receive]:
        """Run a streaming call; the block gets its ``receive()`` (leaving the block cancels it)."""
        # A batch, or the ErrorInfo the stream ends with (a real worker's is in its final status).
        worker = self._worker
        send, receive = trio.open_memory_channel[pb.Payload | pb.ErrorInfo | None](0)
        finished = trio.Event()
        call = await self._begin(request, streaming=True, produce=lambda call, definition, arguments: self._produce(
            call, definition, arguments, request.timeout_seconds, send, finished
        ))
        if isinstance(call, pb.ErrorInfo):
            refusal = call

            async def refused() -> Any:
                raise _failure(refusal, request.tool, worker.lifecycle)

            yield refused
            return

        async def next_batch() -> Any:
            with worker.lifecycle.guarded():
                await worker._wait_while_hung()
                try:
                    batch = await receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    if not finished.is_set():
                        raise worker.crashed_error() from None
                    return None
                if isinstance(batch, pb.ErrorInfo):
                    raise exception_from(batch, request.tool)
                return batch
            raise worker.crashed_error()  # cancelled by its exit: it died mid-stream

        try:
            yield next_batch
        finally:
            receive.close()
            self._cancel(call)

    async def _produce(
        self, call: _Call, definition: ToolDefinition, arguments: dict[str, Any], timeout: float,
        send: trio.MemorySendChannel[pb.Payload | pb.ErrorInfo | None], finished: trio.Event,
    ) -> None:
        runner = self._runner
        async with send:
            chunks = definition.function(**arguments)
            index = 0
            try:
                with trio.move_on_after(_deadline(call, timeout)) as deadline:
                    try:
                        while True:
                            more, item = await runner.next_chunk(definition, chunks)
                            if not more:
                                break
                            chunks_wire, failed = encode_batch([item], index)
                            if failed is not None:
                                raise failed
                            await send.send(chunks_wire)
                            index += 1
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the host left the stream
                    except BaseException as exc:
                        if not is_failure(exc, (trio.Cancelled,)):
                            raise
                        await send.send(tool_failure(exc))
                if deadline.cancelled_caught:
                    await send.send(deadline_error())
                finished.set()
            finally:
                with trio.CancelScope(shield=True):
                    await runner.close_chunks(definition, chunks)

    async def _run_tool(self, call: _Call, definition: ToolDefinition, arguments: dict[str, Any], timeout: float) -> None:
        with trio.move_on_after(_deadline(call, timeout)) as deadline:
            try:
                result = await self._runner.invoke(definition, arguments)
            except BaseException as exc:
                if not is_failure(exc, (trio.Cancelled,)):
                    raise
                call.error = tool_failure(exc)
                return
        if deadline.cancelled_caught:
            call.error = deadline_error()
            return
        try:
            call.result = encode(result, path="result")
        except Exception as exc:
            call.error = error_info(exc)

    async def _begin(
        self, request: ToolCall, *, streaming: bool,
        produce: Callable[[_Call, ToolDefinition, dict[str, Any]], Awaitable[None]],
    ) -> Any:
        """Check the call and start its tool in the worker's nursery; or the ErrorInfo that refuses it."""
        await self._worker._wait_while_hung()
        runner = self._runner
        try:
            if self.draining:  # told to shut down, as a real worker is by its Shutdown RPC
                raise Draining("the worker is shutting down")
            definition = admit_call(
                runner.definitions, request.tool, streaming=streaming, call_id=request.call_id, running=self.active,
            )
            arguments = definition.check_arguments(decode(request.arguments))
            await runner.call_starting(request, definition)
        except Draining:
            return draining_notice()
        except Exception as exc:
            return error_info(exc)
        context, cancel_context = runner.new_context(request)
        if definition.context_parameter:
            arguments[definition.context_parameter] = context
        call = _Call(context, cancel_context, runner.stubborn(definition), trio.CancelScope(), trio.Event())
        self.active[request.call_id] = call
        self.idle = trio.Event()

        async def task() -> None:
            try:
                with call.scope:
                    await produce(call, definition, arguments)
            finally:
                with trio.CancelScope(shield=True):
                    await runner.call_finished(context)
                call.done.set()
                self.active.pop(request.call_id, None)
                if not self.active:
                    self.idle.set()

        self._worker.running_nursery().start_soon(task)
        return call

    @staticmethod
    def _cancel(call: _Call) -> None:
        """The host cancelled the call: cancel its tool, unless that is stubborn (it runs in the
        worker's nursery, so nothing else reaches it)."""
        if call.done.is_set():
            return
        call.cancel_context()
        if not call.stubborn:
            call.scope.cancel()

    def stop(self) -> None:
        """The worker is gone: its tools stop (stubborn or not: the process is gone)."""
        if self._runner.tells_tools_on_exit:
            for call in list(self.active.values()):
                call.cancel_context()  # a thread outlives its worker: tell its tool to stop
        for call in self.active.values():
            call.scope.cancel()

    async def drain(self, grace: float) -> None:
        """Take no new call; wait (at most ``grace`` seconds) until the running ones ended."""
        self.draining = True
        with trio.move_on_after(grace):
            while self.active:
                await self.idle.wait()


def _nothing() -> None:
    pass


def _define(name: str, function: Callable[..., Any]) -> ToolDefinition:
    """A tool definition of ``function``; a parameter annotated ``FakeContext`` gets the context."""
    if not callable(function):
        raise InvalidArgumentError(f"tool {name!r} must be a callable, not {function!r}")
    return define_tool(function, name, None, context_type=FakeContext)


def _deadline(call: _Call, timeout: float) -> float:
    """Seconds the worker gives the tool: the call's deadline, as a real worker would (with the
    same slack), except for a stubborn tool, which nothing stops (a thread cannot be stopped)."""
    return timeout + DEADLINE_SLACK if timeout > 0 and not call.stubborn else math.inf


class FakePool(NamedTuple):
    """What :func:`open_fake_pool` yields: ``async with open_fake_pool(...) as (pool, workers)``."""

    pool: Pool
    workers: FakeWorkers


def open_fake_pool(
    tools: Mapping[str, Callable[..., Any]],
    *,
    size: int = 1,
    concurrency: int = 1,
    start_delay: float = 0.0,
    start_failures: int = 0,
    **open_pool_options: Any,
) -> AbstractAsyncContextManager[FakePool]:
    """Open a real :class:`~trio_bridge.Pool` whose workers are in-memory fakes, and yield it
    with the handle on its workers.

    Tools are plain Python functions, by name: sync or ``async def`` (run in Trio; an async
    tool is cancelled when its call is; see :func:`stubborn`), generators or async generators
    (streaming tools). A parameter annotated :class:`FakeContext` receives the call's context.
    Arguments are checked against the signature as for real tools, and arguments, results and
    chunks go through the wire codec.

    Args:
        tools: ``{"name": function}``.
        size: workers; concurrency: calls each serves at once.
        start_delay: seconds (Trio clock) each worker takes to become ready.
        start_failures: how many of the first starts fail (as :meth:`FakeWorkers.fail_starts`).
        open_pool_options: the other options of :func:`~trio_bridge.open_pool` (``max_queue``,
            ``state``, ``lifecycle``, ``recycling`` -- a fake's RSS is what the test sets as
            its ``rss`` --, ``state_limits``, ``monitoring``); those that only concern
            processes (``transport``, ``adapter_options``, ``local``, ``remote``,
            ``Lifecycle.heartbeat_interval``) are checked and have no effect. The
            ``TRIO_BRIDGE_*`` variables are not read.

    Raises:
        TypeError: an option ``open_pool`` does not have.
        InvalidArgumentError: an option is out of range, or a tool cannot be defined.
        WorkerStartError: a worker could not start (``start_failures``, or ``start_delay``
            over ``startup_timeout``).
    """
    options = fake_pool_options(
        "open_fake_pool", FAKE_ADAPTER, {**open_pool_options, "size": size, "concurrency": concurrency}
    )
    check_seconds("start_delay", start_delay)

    def make_workers(adapter_options_json: str) -> FakeWorkers:
        workers = FakeWorkers(
            tools, concurrency=concurrency, start_delay=start_delay, startup_timeout=options.lifecycle.startup_timeout
        )
        if start_failures:
            workers.fail_starts(start_failures)
        return workers

    return open_pool_of_fakes(make_workers, options)


def fake_pool_options(caller: str, adapter: str, arguments: dict[str, Any]) -> PoolOptions:
    """``open_pool``'s options from its keyword ``arguments``, as ``open_pool`` makes them,
    except that the ``TRIO_BRIDGE_*`` variables are not read (a test's pool is the test's).

    Raises:
        TypeError: an option ``open_pool`` does not have (``caller`` names the function in the message).
        InvalidArgumentError: an option is out of range, or options do not fit together.
    """
    return pool_options(adapter, arguments, caller=caller, environ={}, stacklevel=3)


@asynccontextmanager
async def open_pool_of_fakes(make_workers: Callable[[str], FakeWorkers], options: PoolOptions) -> AsyncIterator[FakePool]:
    """A real pool of the workers ``make_workers(adapter_options_json)`` makes, with ``options``
    (from :func:`fake_pool_options`): :func:`open_fake_pool`'s and
    ``trio_bridge.testing.open_adapter_pool``'s."""
    workers = make_workers(options.adapter_options_json)

    @asynccontextmanager
    async def serve(parts: PoolParts) -> AsyncIterator[None]:
        workers._parts = parts  # what FakeContext calls back, as the host service would
        try:
            yield
        finally:
            workers._parts = None

    async with compose(options, spec=workers._spec, new_worker=workers._new_worker, serve=serve) as pool:
        yield FakePool(pool, workers)


def _failure(info: pb.ErrorInfo, tool: str, lifecycle: WorkerLifecycle) -> Exception:
    """What a call of ``tool`` that failed with ``info`` raises, as a real worker's would: a
    refusal because the worker drains is :class:`CallNotStarted` (the pool runs it elsewhere)."""
    if info.kind == DRAINING:
        lifecycle.drains()
        return CallNotStarted(f"the worker drains: it did not start a call of {tool!r}")
    return exception_from(info, tool)
