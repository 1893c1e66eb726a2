"""One worker process as the host sees it: spawn, readiness, calls, death.

A :class:`WorkerHandle` is owned by the pool's supervisor task for its slot (see ``_pool.py``);
:func:`run_worker` runs the process inside that task's nursery, so the process never outlives it.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, Literal, TypeVar, final

import trio

from trio_bridge._aio import Boundary, CallStream, TransportError
from trio_bridge._errors import WorkerCrashedError, WorkerStartError
from trio_bridge._host._janitor import Janitor
from trio_bridge._host._metrics import percentile
from trio_bridge._host._process import LaunchedWorker, launcher, read_lines
from trio_bridge._util import public_module
from trio_bridge._wire.contract import (
    ADAPTER_OPTIONS_ENV,
    EXIT_ADAPTER_IMPORT,
    HOST_ADDRESS_ENV,
    HOST_PID_ENV,
    READY_PREFIX,
    SECRET_ENV,
    WIRE_VERSION,
    WORKER_ID_ENV,
    WORKER_MESSAGE_PREFIX,
    __version__,
    incompatibility,
)
from trio_bridge._wire.errors import CallFailed, exception_from
from trio_bridge._wire.generated.trio_bridge import v1 as pb

T = TypeVar("T")

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

_STDERR_TAIL_LINES = 40
_LATENCY_WINDOW = 1024  # answered calls kept per worker for its latency percentiles
# What workers write to stderr (tracebacks, tools' print()s): INFO records, "[w3] line".
_worker_log = logging.getLogger("trio_bridge.worker")
_EXIT_REPORT_WAIT = 2.0  # seconds to wait for a dying worker's exit status
_DRAIN_POLL = 0.05  # seconds between looks at a remote worker's calls while the pool closes


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
        remote: a worker on another machine (``remote_workers=``, or one that joined); its
            ``pid`` is that machine's.
        last_recycle_reason: why its slot's worker was last recycled (see ``open_pool``'s
            ``max_calls_per_worker``, ``max_worker_age`` and ``max_worker_memory``): on a worker
            draining to be replaced, why; on its replacement, why its predecessor was;
            ``None`` if the slot's worker was never recycled.
        rss: the process's resident set size in bytes, as its last heartbeat said (or the
            pool's own sample, with ``max_worker_memory``); ``None`` before the first.
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


@dataclass(frozen=True)
class WorkerSpec:
    """How to start workers; the same for every slot of a pool."""

    adapter: str
    python: str
    concurrency: int
    transport: str  # "unix" or "tcp"
    socket_dir: str
    secret: str
    host_address: str
    env: dict[str, str]
    startup_timeout: float
    heartbeat_interval: float
    adapter_options: str = "{}"  # JSON
    launch: Callable[[list[str], dict[str, str]], LaunchedWorker] = field(default_factory=launcher.get)
    """Starts a worker: ``launch(command, env)`` (default: :meth:`WorkerProcess.spawn`)."""
    tls: SSLContext | None = None
    """For TCP: the client context that reaches workers over TLS (remote workers)."""
    callback_address: str = ""
    """For remote workers: where they call the host back (``tcp:HOST:PORT``; empty: they do not)."""
    slot_env: Sequence[Mapping[str, str]] = ()
    """Each local slot's own extra environment (``worker_env``, ``gpus_per_worker``), by slot."""


class WorkerHandle:
    """The host's view of one worker process. Not constructed by users."""

    def __init__(
        self, worker_id: str, slot: int, spec: WorkerSpec, boundary: Boundary | None, janitor: Janitor | None = None
    ) -> None:
        self.id: str = worker_id
        self.slot: int = slot
        self.spec: WorkerSpec = spec
        self.concurrency: int = spec.concurrency
        self.busy: int = 0  # slots taken (managed by the Dispatcher)
        self.state: WorkerState = WorkerState.STARTING
        self.pid: int | None = None
        self.address: str = ""
        self.tools: dict[str, pb.ToolSpec] = {}
        self.calls_served: int = 0
        self.calls_failed: int = 0
        self.sessions: set[str] = set()  # sessions initialized on this worker
        self.started_at: float | None = None
        self.exit_code: int | None = None
        self.exited: trio.Event = trio.Event()
        self.stderr_closed: trio.Event = trio.Event()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._boundary = boundary
        self._process: LaunchedWorker | None = None
        self._janitor = janitor
        self._stub: pb.WorkerServiceStub | None = None
        self._calls: CallStream | None = None
        self._call_scopes: set[trio.CancelScope] = set()
        self._death_reason = ""
        self.calls_given: int = 0
        """Calls the dispatcher handed it, whatever their outcome (what ``max_calls_per_worker`` counts)."""
        self.max_calls: int | None = None
        self.replace_at: int | None = None
        """``calls_given`` at which its replacement starts (the supervisor's estimate)."""
        self.calls_exhausted: trio.Event = trio.Event()
        """Set once ``calls_given`` reaches ``max_calls`` (it takes no new call from then on)."""
        self.calls_nearly_exhausted: trio.Event = trio.Event()
        """Set once ``calls_given`` reaches ``replace_at`` (its replacement starts then)."""
        self.last_recycle_reason: str | None = None
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        """Seconds its last answered unary calls took (slot to answer), for its percentiles."""
        self.rss: int | None = None
        self.cpu_seconds: float | None = None
        """CPU seconds its process used so far, as its last heartbeat said."""
        self.calls_reported: int | None = None
        """Calls it served, as its last heartbeat said (a remote worker counts every host's)."""

    def _wire(self) -> Boundary:
        """The asyncio boundary its RPCs cross. ``None`` only for a worker with no process
        behind it (``trio_bridge.testing.FakeWorker``, which overrides every method that uses it)."""
        if self._boundary is None:
            raise RuntimeError(f"worker {self.id} has no process behind it")
        return self._boundary

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.id} pid={self.pid} {self.state.value} busy={self.busy}/{self.concurrency}>"

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id, slot=self.slot, pid=self.pid, state=self.state.value, address=self.address,
            calls_served=self.calls_served, calls_failed=self.calls_failed, in_flight=self.busy,
            started_at=self.started_at, exit_code=self.exit_code, remote=self.remote,
            last_recycle_reason=self.last_recycle_reason, rss=self.rss, cpu_seconds=self.cpu_seconds,
            **self._latency_percentiles(),
        )

    def _latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies:
            return {}
        ordered = sorted(self.latencies)
        return {"latency_p50": percentile(ordered, 0.5), "latency_p99": percentile(ordered, 0.99)}

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
                    self._enter(WorkerState.DRAINING)

    def sample_memory(self) -> int | None:
        """Sample the resident set size (bytes) of its process with psutil, and keep it in
        :attr:`rss`; ``None`` for a remote worker (the host cannot see its process) or one
        that is gone."""
        if self.remote or self.pid is None or not self.alive:
            return None
        import psutil  # only pools with max_worker_memory get here

        try:
            self.rss = psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None
        return self.rss

    def report(self, *, rss: int, cpu_seconds: float, calls_served: int) -> None:
        """What the worker said of itself in its heartbeat (0: it did not say)."""
        if rss:
            self.rss = rss
        if cpu_seconds:
            self.cpu_seconds = cpu_seconds
        self.calls_reported = calls_served

    def retire(self, reason: str) -> None:
        """Take no new calls: it is to be replaced (``reason``) once its calls have ended."""
        self.last_recycle_reason = reason
        self._enter(WorkerState.DRAINING)

    @property
    def remote(self) -> bool:
        """A worker the host did not start (a remote worker), once it is being reached."""
        return self._process is not None and self._process.remote

    @property
    def accepting(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def _enter(self, state: WorkerState) -> None:
        """Move to ``state``; a transition not in the table is a bug (staying put is allowed)."""
        if state is self.state:
            return
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"worker {self.id}: no transition from {self.state.value} to {state.value}")
        self.state = state

    # ---- calls ----
    async def _call(self, method: Callable[[pb.WorkerServiceStub], Awaitable[T]]) -> T:
        """Run one RPC on this worker (``method(stub)`` returns the asyncio coroutine).

        Raises:
            WorkerCrashedError: the worker died, or stopped answering, during the call.
            TrioBridgeError: the worker refused the RPC (the error its ErrorInfo stands for).
        """
        stub = self._stub
        if stub is None or not self.alive:
            raise self.crashed_error()
        try:
            return await self._while_alive(lambda: self._wire().run(method(stub)))
        except CallFailed as failed:  # refused, with its ErrorInfo: the worker is fine
            raise exception_from(failed.info, "") from None

    async def _execute(self, request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """Run one tool call on this worker's call stream (see :class:`CallStream`).

        Raises:
            WorkerCrashedError: the worker died, or its connection failed, during the call.
        """
        calls = self._calls
        if calls is None or not self.alive:
            raise self.crashed_error()
        return await self._while_alive(lambda: calls.execute(request))

    async def _while_alive(self, run: Callable[[], Awaitable[T]]) -> T:
        """Await ``run()``; the worker's death (or a transport failure) ends it with
        :class:`WorkerCrashedError`."""
        with trio.CancelScope() as scope:
            self._call_scopes.add(scope)
            try:
                return await run()
            except TransportError as exc:
                await self._settle_after_transport_error(str(exc))
                raise self.crashed_error() from exc
            finally:
                self._call_scopes.discard(scope)
        raise self.crashed_error()  # our scope was cancelled: the process died mid-call

    def _open_stream(self, request: pb.ExecuteToolRequest) -> Any:
        """An async context manager yielding ``receive()`` for the tool's chunk batches."""
        if self._stub is None or not self.alive:
            raise self.crashed_error()
        stub = self._stub
        return self._wire().open_stream(lambda: stub.execute_streaming_tool(request))

    async def _receive_batch(self, receive: Callable[[], Awaitable[pb.ToolChunkBatch]]) -> pb.ToolChunkBatch | None:
        """The next batch of a stream opened with :meth:`_open_stream`; ``None`` at its end."""
        with trio.CancelScope() as scope:
            self._call_scopes.add(scope)
            try:
                return await receive()
            except StopAsyncIteration:
                return None
            except TransportError as exc:
                await self._settle_after_transport_error(str(exc))
                raise self.crashed_error() from exc
            finally:
                self._call_scopes.discard(scope)
        raise self.crashed_error()

    async def _settle_after_transport_error(self, reason: str) -> None:
        # Give the process a moment to be reaped so the error can carry its exit status (a
        # remote worker has none to give).
        with trio.move_on_after(0 if self.remote else _EXIT_REPORT_WAIT):
            await self.exited.wait()
        if self.alive:
            self.kill(f"its connection failed ({reason})")
        with trio.move_on_after(0.5):
            await self.stderr_closed.wait()

    def crashed_error(self) -> WorkerCrashedError:
        if self.remote:
            message = f"lost connection to worker at {self.address}"
            if self._death_reason:
                message += f" ({self._death_reason})"
            return WorkerCrashedError(message, worker_id=self.id, pid=self.pid)
        message = "died during the call" if self.exited.is_set() else "is not running"
        if self._death_reason:
            message += f": the pool stopped it because {self._death_reason}"
        return WorkerCrashedError(
            message, worker_id=self.id, pid=self.pid, exit_code=self.exit_code,
            stderr_tail="\n".join(self.stderr_tail),
        )

    def kill(self, reason: str) -> None:
        """Stop the process and its tools' processes at once (SIGKILL to its process group);
        calls on it fail with :class:`WorkerCrashedError`."""
        if self._process is not None and self.alive:
            self._death_reason = self._death_reason or reason
            self._enter(WorkerState.DEAD)
            self._process.signal_group(signal.SIGKILL)

    @property
    def death_reason(self) -> str:
        """Why the pool stopped it (``""`` if it was not stopped by the pool)."""
        return self._death_reason

    # ---- life cycle ----
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Spawn the process, wait until it is ready, then serve until it exits.

        ``task_status.started()`` is called once it is ready. The process is killed if this task
        is cancelled, so it never outlives its owner.

        Raises:
            WorkerStartError: it exited, or printed no ready line within ``startup_timeout``.
        """
        spec = self.spec
        if spec.transport == "unix":
            listen = f"unix:{os.path.join(spec.socket_dir, self.id + '.sock')}"
            if spec.socket_dir.startswith("@"):  # Linux abstract namespace: nothing on disk
                listen = f"unix:{spec.socket_dir}-{self.id}"
        else:
            listen = "tcp:127.0.0.1:0"
        env = dict(os.environ)
        env.update(spec.env)
        if self.slot < len(spec.slot_env):
            env.update(spec.slot_env[self.slot])
        env[SECRET_ENV] = spec.secret  # the launcher carries it: a spawn on stdin, a fork in its request
        env[WORKER_ID_ENV] = self.id
        env[HOST_ADDRESS_ENV] = spec.host_address
        env[ADAPTER_OPTIONS_ENV] = spec.adapter_options
        env[HOST_PID_ENV] = str(os.getpid())
        # The worker must import what the host can: the host's cwd first, then its PYTHONPATH.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
        command = [
            spec.python, "-m", "trio_bridge.worker", "--adapter", spec.adapter, "--listen", listen,
            "--concurrency", str(spec.concurrency), "--heartbeat-interval", str(spec.heartbeat_interval),
        ]
        try:
            process = spec.launch(command, env)
        except OSError as exc:
            raise WorkerStartError(
                f"cannot start {spec.python!r}: {exc} (adapter {spec.adapter!r})", worker_id=self.id,
            ) from None
        self._process = process
        self.pid = process.pid
        janitor = self._janitor if process.own_group else None
        if janitor is not None:
            janitor.watch_group(process.pid)
        channel = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stderr, process.stderr)
                nursery.start_soon(self._wait_exit, process)
                with trio.move_on_after(spec.startup_timeout) as timeout_scope:
                    self.address = await self._read_ready_line(process.stdout)
                if timeout_scope.cancelled_caught:
                    self.kill("it was not ready in time")
                    raise await self._start_error(f"printed no ready line within {spec.startup_timeout:g} s")
                nursery.start_soon(_drain, process.stdout)
                with trio.move_on_after(spec.startup_timeout) as timeout_scope:
                    try:
                        channel, stub = await self._wire().worker_stub(self.address, spec.secret, spec.tls)
                        self._stub = stub
                        described = await self._wire().run(stub.describe(pb.DescribeRequest(
                            trio_bridge_version=__version__, wire_version=WIRE_VERSION,
                            host_address=spec.callback_address, worker_id=self.id,
                        )))
                    except TransportError as exc:
                        self.kill("it failed the handshake")
                        where = f"cannot reach worker at {self.address}: " if self.remote else ""
                        raise await self._start_error(f"{where}Describe failed ({exc})") from None
                if timeout_scope.cancelled_caught:
                    raise await self._start_error("did not answer Describe in time")
                problem = incompatibility(
                    local_release=__version__, local_wire=WIRE_VERSION, peer=f"worker {self.id}",
                    peer_release=described.trio_bridge_version, peer_wire=described.wire_version,
                )
                if problem is not None:
                    self.kill("its wire contract differs")
                    raise await self._start_error(f"was refused: {problem}")
                self.tools = {t.name: t for t in described.tools}
                if self.remote:
                    self.pid = described.pid  # the remote process's, for WorkerInfo
                    self.concurrency = max(1, described.concurrency)  # its --concurrency, not the pool's
                calls = CallStream(self._wire(), stub, self.concurrency)
                with trio.move_on_after(spec.startup_timeout) as timeout_scope:
                    try:
                        await nursery.start(calls.run)
                    except TransportError as exc:
                        self.kill("its call stream failed")
                        raise await self._start_error(str(exc)) from None
                if timeout_scope.cancelled_caught:
                    raise await self._start_error("did not open its call stream in time")
                self._calls = calls
                if self.state is WorkerState.DEAD:  # killed (the pool closing) or exited meanwhile
                    raise await self._start_error(
                        f"was stopped as it started: {self._death_reason}" if self._death_reason else "exited as it started"
                    )
                self._enter(WorkerState.READY)
                self.started_at = trio.current_time()
                task_status.started()
                await self.exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self._stub = None  # no RPC starts on the channel from here on (grpclib fails oddly on a closed one)
                self._calls = None
                if channel is not None:
                    self._wire().close_channel(channel)
                await self._stop_process(process)
                await process.aclose()
                if janitor is not None:
                    janitor.forget_group(process.pid)

    async def _read_ready_line(self, stdout: Any) -> str:
        buffer = b""
        while True:
            data = await stdout.receive_some(4096)
            if not data:
                raise await self._start_error("exited before it was ready")
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text.startswith(READY_PREFIX):
                    return text[len(READY_PREFIX):]
                if text:
                    self.stderr_tail.append(f"[stdout] {text}")

    async def _start_error(self, message: str) -> WorkerStartError:
        with trio.move_on_after(_EXIT_REPORT_WAIT):
            await self.exited.wait()
        with trio.move_on_after(0.5):
            await self.stderr_closed.wait()
        message = f"{message} (adapter {self.spec.adapter!r})"
        if self.exit_code == EXIT_ADAPTER_IMPORT:  # the worker said what to fix, in one line: lead with it
            said = next((line for line in self.stderr_tail if line.startswith(WORKER_MESSAGE_PREFIX)), "")
            message = said.removeprefix(WORKER_MESSAGE_PREFIX) or message
        return WorkerStartError(
            message, worker_id=self.id, pid=self.pid,
            exit_code=self.exit_code, stderr_tail="\n".join(self.stderr_tail),
        )

    async def _read_stderr(self, stderr: Any) -> None:
        def line(text: str) -> None:
            self.stderr_tail.append(text)
            _worker_log.info("[%s] %s", self.id, text)

        try:
            await read_lines(stderr, line)
        finally:
            self.stderr_closed.set()

    async def _wait_exit(self, process: LaunchedWorker) -> None:
        self.exit_code = await process.wait()
        self._enter(WorkerState.DEAD)
        self.exited.set()
        for scope in list(self._call_scopes):
            scope.cancel()

    async def _stop_process(self, process: LaunchedWorker) -> None:
        """Terminate, then kill, its whole process group: nothing outlives the handle."""
        if process.returncode is None:
            process.signal_group(signal.SIGTERM)
            with trio.move_on_after(2):
                await process.wait()
        if process.returncode is None:
            process.signal_group(signal.SIGKILL)
            await process.wait()
        self.exit_code = process.returncode
        self._enter(WorkerState.DEAD)
        self.exited.set()

    async def shutdown(self, grace: float) -> None:
        """Ask the worker to finish its calls (at most ``grace`` seconds) and exit. A remote
        worker keeps running: the host lets its own calls finish, then detaches. A worker still
        starting has no calls to finish: the pool stops it when the drain is over."""
        if self._stub is None or self.state not in (WorkerState.READY, WorkerState.DRAINING):
            return
        self._enter(WorkerState.DRAINING)
        if self.remote and self._process is not None:
            with trio.move_on_after(grace):
                while self.busy:
                    await trio.sleep(_DRAIN_POLL)
            self._process.signal_group(signal.SIGTERM)
            return
        # Bounded even if the worker no longer answers: the pool then terminates it.
        with trio.move_on_after(grace + 1):
            try:
                await self._wire().run(self._stub.shutdown(pb.ShutdownRequest(grace_seconds=grace)))
            except TransportError:
                return
            await self.exited.wait()


async def _drain(stream: Any) -> None:
    """Read and drop a pipe so the writer can never block on it."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


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


def _request(call: ToolCall) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(
        tool_name=call.tool, arguments=call.arguments, call_id=call.call_id, timeout_seconds=call.timeout_seconds,
        session_id=call.session_id, session_state_version=call.state_version, traceparent=call.traceparent,
    )


# A worker's verbs in the host's terms, as functions rather than WorkerHandle methods: the wire
# types they translate (betterproto2's messages, grpclib's stub) stay in this module, off the
# core (supervisor, calls, router) and off WorkerHandle's public surface (``pyright --verifytypes``).
async def execute(worker: WorkerHandle, call: ToolCall) -> Any:
    """Run one unary tool call on ``worker``; its encoded result (decoded by the caller, which
    owns the shared-memory plane).

    Raises:
        WorkerCrashedError: the worker died, or its connection failed, during the call.
        TrioBridgeError: the call failed (the tool raised: ``ToolError``; or it was refused).
    """
    reply = await worker._execute(_request(call))
    if reply.error is not None:
        raise exception_from(reply.error, call.tool)
    return reply.result


@asynccontextmanager
async def open_stream(worker: WorkerHandle, call: ToolCall) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """Run a streaming tool on ``worker``; the block gets ``receive()``, which returns the next
    encoded batch of chunks (for ``decode_batch``), ``None`` at the end.

    Raises:
        WorkerCrashedError: as :func:`execute`; TrioBridgeError: the tool failed.
    """
    async with worker._open_stream(_request(call)) as receive:

        async def next_batch() -> Any:
            try:
                batch = await worker._receive_batch(receive)
            except CallFailed as failed:  # the stream ended with the tool's failure
                raise exception_from(failed.info, call.tool) from None
            return None if batch is None else batch.chunks

        yield next_batch


async def active_calls(worker: WorkerHandle) -> list[str]:
    """The ids of the calls ``worker`` is running now (a ping: its health check too).

    Raises:
        WorkerCrashedError: it died, or does not answer.
    """
    reply = await worker._call(lambda stub: stub.ping(pb.PingRequest()))
    return list(reply.active_calls)


async def begin_session(worker: WorkerHandle, session_id: str, metadata: Any) -> None:
    """Before a session's first call on ``worker`` (``metadata`` encoded)."""
    request = pb.InitializeSessionRequest(session_id=session_id, metadata=metadata)
    await worker._call(lambda stub: stub.initialize_session(request))


async def end_session(worker: WorkerHandle, session_id: str) -> None:
    """The session ended: ``worker`` drops its objects and caches."""
    request = pb.CleanupSessionRequest(session_id=session_id)
    await worker._call(lambda stub: stub.cleanup_session(request))
