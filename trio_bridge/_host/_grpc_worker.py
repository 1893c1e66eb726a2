"""A worker reached over gRPC: the channel, the ``Describe`` handshake, the call stream and the
RPCs, with transport errors mapped once (to :class:`~trio_bridge.WorkerCrashedError`).

A :class:`GrpcWorker` implements the seam's :class:`~trio_bridge._host._worker.Worker`. What is
at the far end, and how the host learns that it is gone, is its :class:`Connector`'s business:
a process of this machine, spawned or forked (``_process.LocalProcess``), or a worker on another
machine that it dials (``_remote.RemoteDial``). A new kind of worker (one placed by a cluster
scheduler, say) is a new connector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Any, Protocol, TypeVar

import trio

from trio_bridge._aio import Boundary, CallStream, TransportError
from trio_bridge._errors import TrioBridgeError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._call_stream import H2CallStream
from trio_bridge._host._metrics import WorkerFigures
from trio_bridge._host._tools import ToolInfo, tool_info
from trio_bridge._host._worker import (
    CallNotStarted,
    Receive,
    ToolCall,
    WorkerInfo,
    WorkerLifecycle,
    WorkerState,
    worker_info,
)
from trio_bridge._wire import overrides
from trio_bridge._wire.contract import WIRE_VERSION, __version__, incompatibility
from trio_bridge._wire.errors import DRAINING, CallFailed, exception_from
from trio_bridge._wire.generated.trio_bridge import v1 as pb

T = TypeVar("T")
_logger = logging.getLogger("trio_bridge")
_ENDED_POLL = 0.05  # seconds between looks at the calls a rejoining worker was asked to cancel


class Connector(Protocol):
    """What is at the far end of a :class:`GrpcWorker`: where to dial it, and when it is gone.

    Attributes:
        remote: it is on another machine (``WorkerInfo.remote``).
        running: there is something to stop (it was started, or is being reached).
        server_name: the name its TLS certificate must carry (``None``: its address's host).
        abandoned: ids of the calls the host sent the far end over a connection since lost
            that it may still run (a remote worker outlives the connection: a process of this
            machine does not, so its set is its own and goes with it); the next handshake
            has them cancelled and waits until they have ended.
    """

    remote: bool
    abandoned: set[str]

    @property
    def server_name(self) -> str | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def pid(self) -> int | None:
        """Its process id, if known before the handshake (a local process)."""
        ...

    async def open(self, worker_id: str, lifecycle: WorkerLifecycle, nursery: trio.Nursery) -> str:
        """Start it or find it; its address (``"unix:..."``, ``"tcp:HOST:PORT"``) once it
        listens. Tasks that watch it go in ``nursery``; when it is gone it calls
        ``lifecycle.exit(code)``. The caller bounds the wait (``startup_timeout``).

        Raises:
            WorkerStartError: it could not be started, or ended before it listened.
        """
        ...

    def kill(self) -> None:
        """Stop it at once (a process group: SIGKILL; a remote worker: dropped, ``-9``)."""
        ...

    async def close(self) -> int | None:
        """Stop what is left of it and release what it holds (shielded by the caller); its
        exit status (``None``: it never started)."""
        ...

    async def shutdown(self, grace: float, lifecycle: WorkerLifecycle, ask: Callable[[float], Awaitable[None]]) -> None:
        """Let it finish its calls (at most ``grace`` seconds) and end: a process is asked
        (``await ask(grace)``: the Shutdown RPC); a remote worker is detached from once idle."""
        ...

    async def settle(self, lifecycle: WorkerLifecycle, kill: Callable[[], None]) -> None:
        """After its connection failed: wait a moment to learn how it ended (a process's exit
        status and last stderr lines; a remote worker has none to give), calling ``kill()`` if
        it is still alive by then."""
        ...

    def crashed_error(self, worker_id: str, pid: int | None, lifecycle: WorkerLifecycle) -> WorkerCrashedError:
        """What a call on it gets once it is gone (exit status, stderr tail, or the address)."""
        ...

    async def start_error(self, message: str, worker_id: str, lifecycle: WorkerLifecycle, *, unreachable: bool = False) -> WorkerStartError:
        """Why it did not start (``unreachable``: the handshake failed on the transport)."""
        ...

    def sample_memory(self) -> int | None:
        """Its resident set size now (bytes); ``None`` where the host cannot see its process."""
        ...


class GrpcWorker:
    """A worker behind a gRPC channel (see the module doc). Made by the pool's worker factory.

    Args:
        worker_id, slot: its id and slot.
        connector: what is at the far end.
        boundary: the asyncio boundary its RPCs cross.
        secret: what it authenticates with (the pool secret, or a remote worker's token).
        concurrency: calls it serves at once (a remote worker says its own in ``Describe``).
        startup_timeout: seconds for each step of its start (listening, handshake, call stream).
        tls: the client context for a TCP worker reached over TLS.
        callback_address: where a remote worker calls the host back (``""``: the one it was started with).
    """

    def __init__(
        self, worker_id: str, slot: int, connector: Connector, boundary: Boundary, *, secret: str, concurrency: int,
        startup_timeout: float, tls: SSLContext | None = None, callback_address: str = "",
    ) -> None:
        self.id: str = worker_id
        self.slot: int = slot
        self.lifecycle: WorkerLifecycle = WorkerLifecycle(worker_id, concurrency)
        self.figures: WorkerFigures = WorkerFigures()
        self.sessions: set[str] = set()
        self.tools: Mapping[str, ToolInfo] = {}
        self.address: str = ""
        self._described_pid: int | None = None
        self._connector = connector
        self._boundary = boundary
        self._secret = secret
        self._tls = tls
        self._callback_address = callback_address
        self._startup_timeout = startup_timeout
        self._stub: pb.WorkerServiceStub | None = None
        self._channel: Any = None  # the grpclib channel, from the handshake on (closed by run)
        self._calls: CallStream | H2CallStream | None = None
        self._cancelled: set[str] = set()  # calls whose callers left unanswered; pruned by Ping

    def __repr__(self) -> str:
        life = self.lifecycle
        return f"<GrpcWorker {self.id} pid={self.pid} {life.state.value} busy={life.busy}/{life.concurrency}>"

    @property
    def pid(self) -> int | None:
        """Its process id (a remote worker's is that machine's, known once it answered ``Describe``)."""
        return self._described_pid if self._described_pid is not None else self._connector.pid

    def info(self) -> WorkerInfo:
        return worker_info(self, pid=self.pid, address=self.address, remote=self._connector.remote)

    def sample_memory(self) -> int | None:
        rss = self._connector.sample_memory() if self.lifecycle.alive else None
        if rss is not None:
            self.figures.rss = rss
        return rss

    def crashed_error(self) -> WorkerCrashedError:
        return self._connector.crashed_error(self.id, self.pid, self.lifecycle)

    def kill(self, reason: str) -> None:
        if self._connector.running and self.lifecycle.stopping(reason):
            self._connector.kill()

    # ---- life ----
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the far end, wait until it listens, shake hands, open the call stream; then
        serve until it is gone. Whatever happens, the far end is stopped (or detached from) as
        this ends, so it never outlives the task.

        Raises:
            WorkerStartError: it could not start, did not listen, answer ``Describe`` or open
                its call stream within ``startup_timeout`` each, or speaks another wire contract.
        """
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self._startup_timeout) as timeout_scope:
                    self.address = await self._connector.open(self.id, self.lifecycle, nursery)
                if timeout_scope.cancelled_caught:
                    self.kill("it was not ready in time")
                    raise await self._start_error(f"printed no ready line within {self._startup_timeout:g} s")
                await self._handshake(nursery)
                if self.lifecycle.state is WorkerState.DEAD:  # killed (the pool closing) or exited meanwhile
                    reason = self.lifecycle.death_reason
                    raise await self._start_error(f"was stopped as it started: {reason}" if reason else "exited as it started")
                if self.lifecycle.far_end_draining.is_set():  # (its slot tries again after a backoff)
                    raise await self._start_error("drains (SIGTERM or SIGHUP): it takes no new call")
                self.lifecycle.ready()
                task_status.started()
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                # cancelled calls whose cancel may not have reached it: its next dial has them cancelled
                self._connector.abandoned.update(self._cancelled)
                self._stub = None  # no RPC starts on the channel from here on (grpclib fails oddly on a closed one)
                self._calls = None
                channel, self._channel = self._channel, None
                if channel is not None:  # (also one whose handshake failed)
                    self._boundary.close_channel(channel)
                exit_code = await self._connector.close()
                if exit_code is not None:
                    self.lifecycle.exit(exit_code)

    async def _serve(self) -> None:
        """Until it is gone. A remote worker that says it drains is let go once this host's calls
        on it have ended (its slot dials it again: it comes back once it serves again, after a
        reload; or never, when it stopped)."""
        if self._connector.remote:
            with self.lifecycle.guarded():
                await self.lifecycle.far_end_draining.wait()
                self.lifecycle.death_reason = "it drains (SIGTERM or SIGHUP): let go once its calls ended"
                await self._connector.shutdown(math.inf, self.lifecycle, self._ask_to_exit)
        await self.lifecycle.exited.wait()

    async def _handshake(self, nursery: trio.Nursery) -> None:
        """Dial it (the channel is kept for :meth:`run` to close, whatever happens next),
        ``Describe``, check its wire contract, open its call stream."""
        timeout = self._startup_timeout
        abandoned = set(self._connector.abandoned)
        with trio.move_on_after(timeout) as timeout_scope:
            try:
                self._channel, stub = await self._boundary.worker_stub(
                    self.address, self._secret, self._tls, server_name=self._connector.server_name,
                )
                self._stub = stub
                described = await self._boundary.run(stub.describe(pb.DescribeRequest(
                    trio_bridge_version=__version__, wire_version=WIRE_VERSION,
                    host_address=self._callback_address, worker_id=self.id, cancel_calls=sorted(abandoned),
                )))
            except TransportError as exc:
                self.kill("it failed the handshake")
                raise await self._start_error(f"Describe failed ({exc})", unreachable=True) from None
            except CallFailed as failed:
                if failed.info.kind != DRAINING:
                    raise
                raise await self._start_error("drains (SIGTERM or SIGHUP): it takes no new host") from None
        if timeout_scope.cancelled_caught:
            raise await self._start_error("did not answer Describe in time")
        problem = incompatibility(
            local_release=__version__, local_wire=WIRE_VERSION, peer=f"worker {self.id}",
            peer_release=described.trio_bridge_version, peer_wire=described.wire_version,
        )
        if problem is not None:
            self.kill("its wire contract differs")
            raise await self._start_error(f"was refused: {problem}")
        self.tools = {t.name: tool_info(t) for t in described.tools}
        self._described_pid = described.pid or None
        if described.concurrency:  # its own --concurrency (a remote worker's need not be the pool's)
            self.lifecycle.concurrency = described.concurrency
        calls: CallStream | H2CallStream
        if overrides.CALLS and self._tls is None:  # spoken from Trio on a connection of its own (docs/boundary.md)
            calls = H2CallStream(self.address, self._secret, on_draining=self.lifecycle.drains)
        else:
            calls = CallStream(self._boundary, stub, self.lifecycle.concurrency, self.lifecycle.drains)
        with trio.move_on_after(timeout) as timeout_scope:
            try:
                await nursery.start(calls.run)
            except TransportError as exc:
                self.kill("its call stream failed")
                raise await self._start_error(str(exc)) from None
        if timeout_scope.cancelled_caught:
            raise await self._start_error("did not open its call stream in time")
        self._calls = calls
        if abandoned:
            await self._until_ended(abandoned)

    async def _until_ended(self, abandoned: set[str]) -> None:
        """Wait until the calls it was asked to cancel in ``Describe`` have ended (a sync tool
        that ignores cancellation holds its thread until it returns), so that it is free when
        the pool says it is; at most ``startup_timeout``, then it serves beside them (logged)."""
        still: set[str] = abandoned
        with trio.move_on_after(self._startup_timeout):
            while True:
                try:
                    still = abandoned.intersection(await self.active_calls())
                except TrioBridgeError as exc:  # lost again (or stopped) as it rejoined
                    self.kill(f"it failed as it rejoined ({exc})")
                    raise await self._start_error(f"failed as it rejoined: {exc}") from None
                if not still:
                    break
                await trio.sleep(_ENDED_POLL)
        self._connector.abandoned.difference_update(abandoned - still)
        if still:
            _logger.warning(
                "worker %s at %s still runs %d calls this pool gave up on, %g s after it was asked to cancel them: "
                "it takes calls beside them", self.id, self.address, len(still), self._startup_timeout,
            )

    async def _start_error(self, message: str, *, unreachable: bool = False) -> WorkerStartError:
        return await self._connector.start_error(message, self.id, self.lifecycle, unreachable=unreachable)

    async def shutdown(self, grace: float) -> None:
        """Ask it to finish its calls (at most ``grace`` seconds) and exit (a remote worker
        keeps running: the host lets its own calls finish, then detaches). A worker still
        starting has no calls to finish: the pool stops it when the drain is over."""
        if self._stub is None or self.lifecycle.state not in (WorkerState.READY, WorkerState.DRAINING):
            return
        self.lifecycle.enter(WorkerState.DRAINING)
        await self._connector.shutdown(grace, self.lifecycle, self._ask_to_exit)

    async def _ask_to_exit(self, grace: float) -> None:
        stub = self._stub
        if stub is None:
            return
        # Bounded even if the worker no longer answers: the pool then terminates it.
        with trio.move_on_after(grace + 1):
            try:
                await self._boundary.run(stub.shutdown(pb.ShutdownRequest(grace_seconds=grace)))
            except TransportError:
                return
            await self.lifecycle.exited.wait()

    # ---- calls ----
    async def execute(self, call: ToolCall) -> Any:
        calls = self._calls
        if calls is None or not self.lifecycle.alive:
            raise self.crashed_error()
        if calls.ended:  # its connection ended before this call: it never reaches the worker
            self.kill("its call stream had ended")
            raise CallNotStarted(f"worker {self.id}: its call stream had ended")
        try:
            if isinstance(calls, H2CallStream):
                # No guard scope (a CancelScope per call costs ~4 us): the worker's exit ends
                # run(), which cancels the call stream's task, which fails the calls waiting on it.
                try:
                    reply = await calls.execute(_request(call))
                except TransportError as exc:
                    raise await self._lost(exc) from exc
            else:
                reply = await self._while_alive(lambda: calls.execute(_request(call)))
        except BaseException:
            self._unanswered(call.call_id)
            raise
        if reply.error is not None:
            raise self._call_error(reply.error, call)
        return reply.result

    def _call_error(self, info: pb.ErrorInfo, call: ToolCall) -> Exception:
        """What the worker's refusal or failure of ``call`` raises: :class:`CallNotStarted` if
        it drains (it never started the call, and takes no other), else the call's error."""
        if info.kind != DRAINING:
            return exception_from(info, call.tool)
        self.lifecycle.drains()
        return CallNotStarted(f"worker {self.id} drains: it refused call {call.call_id}")

    @asynccontextmanager
    async def open_stream(self, call: ToolCall) -> AsyncIterator[Receive]:
        stub = self._stub
        if stub is None or not self.lifecycle.alive:
            raise self.crashed_error()
        request = _request(call)
        ended = False
        try:
            async with self._boundary.open_stream(lambda: stub.execute_streaming_tool(request)) as receive:

                async def next_batch() -> Any:
                    nonlocal ended
                    try:
                        batch = await self._while_alive(receive)
                    except StopAsyncIteration:
                        ended = True
                        return None
                    except CallFailed as failed:  # the stream ended with the tool's failure
                        ended = True
                        raise self._call_error(failed.info, call) from None
                    return batch.chunks

                yield next_batch
        finally:
            if not ended:  # left before the worker ended it: it may go on streaming
                self._unanswered(call.call_id)

    def _unanswered(self, call_id: str) -> None:
        """A call's caller left before its answer (cancelled, or the worker was lost): listed
        for cancelling on the next dial if the connection is lost before the worker has
        dropped it (Ping prunes the list)."""
        if not self._connector.remote:
            return  # a process of this machine ends with its connection: nothing outlives it
        if self.lifecycle.alive:
            self._cancelled.add(call_id)
        else:
            self._connector.abandoned.add(call_id)

    async def active_calls(self) -> list[str]:
        cancelled = set(self._cancelled)
        reply = await self._rpc(lambda stub: stub.ping(pb.PingRequest()))
        self._cancelled -= cancelled.difference(reply.active_calls)  # those it no longer runs are settled
        return list(reply.active_calls)

    async def begin_session(self, session_id: str, metadata: Any) -> None:
        request = pb.InitializeSessionRequest(session_id=session_id, metadata=metadata)
        await self._rpc(lambda stub: stub.initialize_session(request))

    async def end_session(self, session_id: str) -> None:
        request = pb.CleanupSessionRequest(session_id=session_id)
        await self._rpc(lambda stub: stub.cleanup_session(request))

    async def _rpc(self, method: Callable[[pb.WorkerServiceStub], Awaitable[T]]) -> T:
        """Run one RPC (``method(stub)`` returns the asyncio coroutine).

        Raises:
            WorkerCrashedError: it died, or stopped answering, during the call.
            TrioBridgeError: it refused the RPC (the error its ErrorInfo stands for).
        """
        stub = self._stub
        if stub is None or not self.lifecycle.alive:
            raise self.crashed_error()
        try:
            return await self._while_alive(lambda: self._boundary.run(method(stub)))
        except CallFailed as failed:  # refused, with its ErrorInfo: the worker is fine
            raise exception_from(failed.info, "") from None

    async def _while_alive(self, run: Callable[[], Awaitable[T]]) -> T:
        """Await ``run()``; its death (or a transport failure) ends it with :class:`WorkerCrashedError`."""
        with self.lifecycle.guarded():
            try:
                return await run()
            except TransportError as exc:
                raise await self._lost(exc) from exc
        raise self.crashed_error()  # cancelled by its exit: it died mid-call

    async def _lost(self, exc: TransportError) -> WorkerCrashedError:
        """What a call gets when its connection failed (``exc``): once the far end is known to
        be gone (killed if it is not yet), its :meth:`crashed_error`."""
        reason = f"its connection failed ({exc})"
        await self._connector.settle(self.lifecycle, lambda: self.kill(reason))
        return self.crashed_error()


def _request(call: ToolCall) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(
        tool_name=call.tool, arguments=call.arguments, call_id=call.call_id, timeout_seconds=call.timeout_seconds,
        session_id=call.session_id, session_state_version=call.state_version, traceparent=call.traceparent,
    )
