"""The worker seam: what the pool's core (supervisor, calls, router, dispatcher, metrics) may
know of a worker, in the host's own terms -- no protobuf, no grpclib, no asyncio.

- :class:`Worker`: the protocol every kind of worker implements (a worker process reached over
  gRPC, ``_grpc_worker.GrpcWorker``; ``trio_bridge.testing``'s fakes and in-process workers).
- :class:`WorkerLifecycle`: its life (starting -> ready -> draining -> dead) and its slots (calls
  given, the limit on them): one class that every kind of worker composes.
- :data:`WorkerFactory`: makes a slot's next worker, ``factory(worker_id, slot)``; the
  composition root (``_pool.compose``) takes one.
- :class:`ToolCall`: one call as the core hands it over; :class:`WorkerInfo`: the public snapshot.

Taken from the models: from trio-parallel's ``AbstractWorker`` (``trio_parallel/_abc.py``), a
worker as a small set of verbs the pool front end is written against, so that new kinds of
workers need no front-end rewrite: start it, run one job (which raises the domain error,
``BrokenWorkerError`` there, :class:`~trio_bridge.WorkerCrashedError` here, when the worker
dies), shut it down gracefully, wait for its end. From httpcore's ``AsyncConnectionInterface``
(``httpcore/_async/interfaces.py``): the pool asks the connection itself whether it can take a
request (``is_available``, ``has_expired``, ``is_closed``: here :attr:`WorkerLifecycle.accepting`,
``alive``, ``calls_exhausted``), a streamed exchange is an async context manager, and ``info()``
describes the connection for people. Unlike both, the state and the counters are not left to
each implementation: they live in one :class:`WorkerLifecycle` (and one
``_metrics.WorkerFigures``) that each worker composes.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, final

import trio

from trio_bridge._errors import WorkerCrashedError
from trio_bridge._util import public_module

if TYPE_CHECKING:
    from trio_bridge._host._metrics import WorkerFigures
    from trio_bridge._host._tools import ToolInfo

WorkerStateName = Literal["starting", "ready", "draining", "dead"]


class WorkerState(enum.Enum):
    """A worker's life, one way: starting -> ready -> draining -> dead (dead from any state)."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


_NEXT: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.DEAD}),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.DEAD}),
    WorkerState.DRAINING: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}


@final
@public_module
@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker, from :meth:`Pool.workers`.

    Attributes:
        id: the pool's id for this process, e.g. ``"w3"`` (a replacement gets a new id).
        slot: the pool slot it fills (0 .. size-1).
        pid: the process id.
        state: ``"starting"`` (spawned, not yet ready), ``"ready"`` (takes calls),
            ``"draining"`` (finishing its calls before it exits) or ``"dead"`` (exited).
        address: where it listens, ``"unix:/path"`` or ``"tcp:host:port"``.
        calls_served: calls that returned a result (or a tool error) on this worker.
        calls_failed: calls that ended with an error.
        in_flight: calls it is serving now, including cancelled ones it has not yet freed.
        started_at: ``trio.current_time()`` when it became ready.
        exit_code: once the process has exited, its status (0: it exited by itself after a
            clean shutdown; ``-N``: killed by signal N); ``None`` while it runs. For a remote
            worker: 0 once the pool detached from it, ``-9`` once the pool lost it.
        remote: a worker on another machine (``RemoteWorkers``, or one that joined); its
            ``pid`` is that machine's.
        last_recycle_reason: why its slot's worker was last recycled (see
            :class:`~trio_bridge.Recycling`'s ``max_calls``, ``max_age`` and ``max_memory``, and
            :meth:`Pool.reload`): on
            a worker draining to be replaced, why; on its replacement, why its predecessor was;
            ``None`` if the slot's worker was never recycled.
        rss: the process's resident set size in bytes, as its last heartbeat said (or the
            pool's own sample, with ``Recycling.max_memory``); ``None`` before the first.
        cpu_seconds: CPU time its process used so far, as its last heartbeat said; ``None``
            before the first.
        latency_p50, latency_p99: seconds from taking its slot to the answer, over its last
            1,024 answered unary calls; ``None`` before the first.
    """

    id: str
    slot: int
    pid: int | None
    state: WorkerStateName
    address: str
    calls_served: int
    calls_failed: int
    in_flight: int
    started_at: float | None
    exit_code: int | None
    remote: bool = False
    last_recycle_reason: str | None = None
    rss: int | None = None
    cpu_seconds: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None


class CallNotStarted(Exception):
    """A worker did not start a call, and never will: it drains (it refused the call), or its
    connection had ended before the call was sent. Not an error of the call: the pool runs it on
    another worker (its callers never see this)."""


@dataclass(frozen=True)
class ToolCall:
    """One tool call, in the host's terms (what the core hands a worker).

    Attributes:
        call_id: the pool's id for the call (``"c12"``).
        tool: the tool's name.
        arguments: the encoded arguments (``trio_bridge._wire.codec.encode``): opaque to the
            core, encoded before any wait so that bad arguments fail at once.
        session_id, state_version: the call's session (``""``: none) and its state version.
        timeout_seconds: seconds left before the caller's deadline (0: none).
        traceparent: the W3C trace context of the caller's span (``""``: traces off).
    """

    call_id: str
    tool: str
    arguments: Any
    session_id: str = ""
    state_version: int = 0
    timeout_seconds: float = 0.0
    traceparent: str = ""


class WorkerLifecycle:
    """One worker's life and slots, whatever kind of worker it is.

    Attributes:
        state: where it is in its life (see :class:`WorkerState`; moves by :meth:`enter`).
        exited: set once it is gone (its process exited, or it was dropped).
        exit_code: its exit status once gone (``-N``: killed by signal N), else ``None``.
        death_reason: why the pool stopped it (``""``: it was not stopped by the pool).
        started_at: ``trio.current_time()`` when it became ready.
        concurrency: calls it serves at once (its slots).
        busy: slots taken (by the dispatcher).
        calls_given: calls the dispatcher handed it, whatever their outcome (what
            ``Recycling.max_calls`` counts); ``max_calls``: its own limit (``None``: none).
        replace_at: ``calls_given`` at which its replacement starts (the supervisor's estimate).
        calls_exhausted: set once ``calls_given`` reaches ``max_calls`` (it takes no new call).
        calls_nearly_exhausted: set once ``calls_given`` reaches ``replace_at``.
        far_end_draining: set once the worker itself said it drains (:meth:`drains`).
    """

    def __init__(self, worker_id: str, concurrency: int) -> None:
        self.worker_id: str = worker_id
        self.state: WorkerState = WorkerState.STARTING
        self.exited: trio.Event = trio.Event()
        self.exit_code: int | None = None
        self.death_reason: str = ""
        self.started_at: float | None = None
        self.concurrency: int = concurrency
        self.busy: int = 0
        self.calls_given: int = 0
        self.max_calls: int | None = None
        self.replace_at: int | None = None
        self.calls_exhausted: trio.Event = trio.Event()
        self.calls_nearly_exhausted: trio.Event = trio.Event()
        self.far_end_draining: trio.Event = trio.Event()
        self._guards: set[trio.CancelScope] = set()

    def __repr__(self) -> str:
        return f"<WorkerLifecycle {self.worker_id} {self.state.value} busy={self.busy}/{self.concurrency}>"

    @property
    def accepting(self) -> bool:
        """It takes new calls (ready, not draining)."""
        return self.state is WorkerState.READY

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def enter(self, state: WorkerState) -> None:
        """Move to ``state``; a transition not in the table is a bug (staying put is allowed).

        Raises:
            RuntimeError: no such transition.
        """
        if state is self.state:
            return
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"worker {self.worker_id}: no transition from {self.state.value} to {state.value}")
        self.state = state

    def ready(self) -> None:
        """It takes calls from now on."""
        self.enter(WorkerState.READY)
        self.started_at = trio.current_time()

    def admit(self) -> None:
        """The dispatcher handed it a call: counted towards ``max_calls`` at once, so that a
        worker given its last call takes no other (it drains) while its replacement starts."""
        self.calls_given += 1
        if self.max_calls is not None:
            if self.calls_given >= (self.replace_at if self.replace_at is not None else self.max_calls):
                self.calls_nearly_exhausted.set()
            if self.calls_given >= self.max_calls:
                self.calls_exhausted.set()
                if self.state is WorkerState.READY:
                    self.enter(WorkerState.DRAINING)

    def retire(self) -> None:
        """Take no new calls: it is to be replaced once its calls have ended."""
        self.enter(WorkerState.DRAINING)

    def drains(self) -> None:
        """The worker itself drains (SIGTERM, SIGHUP: it refuses calls it has not started): it
        takes no new call from now on, and is let go once its calls have ended."""
        self.far_end_draining.set()
        if self.state is WorkerState.READY:
            self.enter(WorkerState.DRAINING)

    def stopping(self, reason: str) -> bool:
        """The pool stops it (``reason``: why); whether it was alive (``False``: nothing to stop)."""
        if not self.alive:
            return False
        self.death_reason = self.death_reason or reason
        self.enter(WorkerState.DEAD)
        return True

    def exit(self, exit_code: int) -> None:
        """It is gone, with ``exit_code``: what waits in :meth:`guarded` is cancelled."""
        if self.exited.is_set():
            return
        self.exit_code = exit_code
        self.enter(WorkerState.DEAD)
        self.exited.set()
        for scope in list(self._guards):
            scope.cancel()

    def guarded(self) -> _Guard:
        """A cancel scope that its exit cancels (check ``cancelled_caught`` after the block:
        the worker died meanwhile)."""
        return _Guard(self._guards)


class _Guard:
    """:meth:`WorkerLifecycle.guarded`'s block: a cancel scope, in its lifecycle's guards while
    the block runs (a class rather than a generator-based context manager: one per call)."""

    __slots__ = ("_guards", "_scope")

    def __init__(self, guards: set[trio.CancelScope]) -> None:
        self._guards = guards
        self._scope = trio.CancelScope()

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        self._guards.add(scope)
        return scope

    def __exit__(self, *exc_info: Any) -> bool:
        self._guards.discard(self._scope)
        return self._scope.__exit__(*exc_info)


#: A stream's ``receive()``: the next encoded batch of chunks (for ``decode_batch``), ``None`` at its end.
Receive = Callable[[], Awaitable[Any]]


class Worker(Protocol):
    """A worker as the pool's core sees it. Made by a :data:`WorkerFactory`, owned by the
    supervisor's task for its slot, which runs it (:meth:`run`) until it is gone.

    Attributes:
        id: the pool's id for it (``"w3"``); slot: the slot it fills.
        pid: its process id on this machine, if it is a process of this machine (the pool
            removes that process's shared-memory files when it is gone); ``None`` otherwise.
        lifecycle: its life and slots; figures: its statistics (``_metrics.WorkerFigures``).
        sessions: the ids of the sessions initialized on it (the router keeps it).
        tools: the tools it serves, by name (known once it is ready).
    """

    id: str
    slot: int
    lifecycle: WorkerLifecycle
    figures: WorkerFigures
    sessions: set[str]

    @property
    def pid(self) -> int | None: ...

    @property
    def tools(self) -> Mapping[str, ToolInfo]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start it, then serve until it is gone; ``task_status.started()`` once it takes calls.
        Nothing of it outlives this task (cancelling it stops the worker).

        Raises:
            WorkerStartError: it could not start (with what it said, e.g. its stderr tail).
        """
        ...

    async def execute(self, call: ToolCall) -> Any:
        """Run one unary tool call; its encoded result (the caller decodes it). Cancelling the
        caller cancels the call in the worker (the verb "cancel" is Trio's cancellation, here and
        for :meth:`open_stream`, whose block the caller leaves); whether the worker has let go of
        it, :meth:`active_calls` says.

        Raises:
            WorkerCrashedError: it died, or its connection failed, during the call.
            TrioBridgeError: the call failed (the tool raised: ``ToolError``; or it was refused).
            CallNotStarted: it did not start the call (it drains): the caller runs it elsewhere.
        """
        ...

    def open_stream(self, call: ToolCall) -> AbstractAsyncContextManager[Receive]:
        """Run a streaming tool; the block gets a :data:`Receive`.

        Raises:
            WorkerCrashedError, TrioBridgeError: as :meth:`execute` (from ``receive()`` too).
            CallNotStarted: as :meth:`execute`, from the first ``receive()`` only.
        """
        ...

    async def active_calls(self) -> list[str]:
        """The ids of the calls it runs now (a ping: its health check too).

        Raises:
            WorkerCrashedError: it died, or does not answer.
        """
        ...

    async def begin_session(self, session_id: str, metadata: Any) -> None:
        """Before a session's first call on it (``metadata`` encoded).

        Raises:
            WorkerCrashedError: it died meanwhile.
        """
        ...

    async def end_session(self, session_id: str) -> None:
        """The session ended: it drops the session's objects and caches.

        Raises:
            WorkerCrashedError: it died meanwhile.
        """
        ...

    async def shutdown(self, grace: float) -> None:
        """Let its calls finish (at most ``grace`` seconds), then let it go (a worker still
        starting has no calls: the pool stops it when the drain is over)."""
        ...

    def kill(self, reason: str) -> None:
        """Stop it at once (``reason``: why, kept as ``lifecycle.death_reason``); its calls fail
        with :class:`~trio_bridge.WorkerCrashedError`."""
        ...

    def sample_memory(self) -> int | None:
        """Its resident set size now (bytes), kept in ``figures.rss``; ``None`` if the host
        cannot measure it."""
        ...

    def info(self) -> WorkerInfo:
        """A snapshot for :meth:`Pool.workers`."""
        ...


#: Makes a slot's next worker: ``factory(worker_id, slot)`` (what ``compose`` and the
#: supervisor take).
WorkerFactory = Callable[[str, int], Worker]


def worker_info(worker: Worker, *, pid: int | None, address: str, remote: bool = False) -> WorkerInfo:
    """The :class:`WorkerInfo` of ``worker`` from its lifecycle and figures (what every kind of
    worker shows the same way), with what only it knows."""
    life, figures = worker.lifecycle, worker.figures
    p50, p99 = figures.latency_percentiles()
    return WorkerInfo(
        id=worker.id, slot=worker.slot, pid=pid, state=life.state.value, address=address,
        calls_served=figures.calls_served, calls_failed=figures.calls_failed, in_flight=life.busy,
        started_at=life.started_at, exit_code=life.exit_code, remote=remote,
        last_recycle_reason=figures.last_recycle_reason, rss=figures.rss, cpu_seconds=figures.cpu_seconds,
        latency_p50=p50, latency_p99=p99,
    )


def process_crashed_error(worker_id: str, pid: int | None, lifecycle: WorkerLifecycle, stderr_tail: Iterable[str]) -> WorkerCrashedError:
    """The error of a call on a worker process that is gone or not running: whether it died
    during the call, why the pool stopped it (if it did), its exit status and stderr tail."""
    message = "died during the call" if lifecycle.exited.is_set() else "is not running"
    if lifecycle.death_reason:
        message += f": the pool stopped it because {lifecycle.death_reason}"
    return WorkerCrashedError(
        message, worker_id=worker_id, pid=pid, exit_code=lifecycle.exit_code, stderr_tail="\n".join(stderr_tail),
    )
