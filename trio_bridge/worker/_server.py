"""The worker process: an asyncio grpclib server hosting one adapter instance.

Started by the host as ``python -m trio_bridge.worker --adapter module:Class --listen unix:PATH``.
Start-up order: lifeline first (so a worker never outlives its host, even during a slow
``setup()``), then import the adapter, run ``setup()``, bind, and print one ready line
``TRIO_BRIDGE_READY <address>`` on stdout. After that stdout is pointed at stderr, so a tool's
``print`` can never block on a pipe nobody reads.

The worker runs on uvloop's event loop where uvloop is installed (a dependency on CPython outside
Windows), on asyncio's default loop otherwise or with ``TRIO_BRIDGE_WORKER_LOOP=asyncio``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import functools
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from ssl import SSLContext
from typing import Any

import grpclib.const
import grpclib.server
from grpclib.exceptions import GRPCError

from trio_bridge import _tracing as tracing
from trio_bridge._core.admission import Draining, admit_call
from trio_bridge._core.failures import failed_in_task, raise_stop
from trio_bridge._core.tools import ToolDefinition
from trio_bridge._errors import EncodeError, InvalidArgumentError, TrioBridgeError
from trio_bridge._wire import errors as wire_errors
from trio_bridge._wire import shared_memory
from trio_bridge._wire.auth import parse_allowed_uids
from trio_bridge._wire.chunks import encode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import (
    ADAPTER_OPTIONS_ENV,
    ALLOWED_UIDS_ENV,
    DEADLINE_SLACK,
    EXIT_ADAPTER_IMPORT,
    EXIT_ADAPTER_SETUP,
    EXIT_HOST_GONE,
    HOST_ADDRESS_ENV,
    KEEPALIVE,
    MAX_CHUNKS_PER_MESSAGE,
    MAX_STATUS_MESSAGE_BYTES,
    READY_PREFIX,
    SECRET_ENV,
    SECRET_METADATA,
    SECRET_ON_STDIN_ENV,
    STREAM_BUFFER,
    WIRE_VERSION,
    WORKER_ID_ENV,
    WORKER_MESSAGE_PREFIX,
    __version__,
    incompatibility,
    timeout_from_wire,
)
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.listeners import MIN_TOKEN, beyond_loopback
from trio_bridge._wire.shared_memory import SharedMemoryPlane
from trio_bridge._wire.standard_services import LIVENESS, READINESS, ServingStatus
from trio_bridge._wire.tls import TLSConfig
from trio_bridge._wire.tool_spec import tool_spec
from trio_bridge._wire.transport import (
    advertised_address,
    new_health_server,
    new_server,
    open_channel,
    parse_address,
    tcp_listener,
)
from trio_bridge.worker._adapter import Adapter, AdapterLoadError, collect_tools, load_adapter_class
from trio_bridge.worker._call_stream import serve_calls
from trio_bridge.worker._context import SessionContext, cancel_call, end_call
from trio_bridge.worker._host_client import HostClient, host_stub
from trio_bridge.worker._lifeline import start_lifeline
from trio_bridge.worker._reload import Reload
from trio_bridge.worker._streaming import AsyncGeneratorSource, ThreadGeneratorSource

_REPLY_FLUSH = 1.0          # seconds a drain waits for finished calls' replies to be sent
_HOSTS_LEAVE = 5.0          # seconds a drain of its own (SIGTERM, SIGHUP) waits for hosts to close their call streams
LOOP_ENV = "TRIO_BRIDGE_WORKER_LOOP"  # "asyncio": the worker does not use uvloop
_STREAM_PATH = "/trio_bridge.v1.WorkerService/ExecuteStreamingTool"
_CALLS_PATH = "/trio_bridge.v1.WorkerService/Calls"


class WorkerService(pb.WorkerServiceBase):
    """Serves one adapter's tools. Every call occupies one of ``concurrency`` slots until it has
    really finished (a cancelled sync tool keeps its slot until its thread returns)."""

    def __init__(
        self, adapter_path: str, adapter: Adapter, concurrency: int, host: HostClient | None = None, *,
        standalone: bool = False, secret: str = "", host_tls: SSLContext | None = None,
    ) -> None:
        """``standalone``: a worker no host started (``trio-bridge worker``): a host that reaches
        it says in ``Describe`` where to call it back, with ``secret`` (the token) and over
        ``host_tls``."""
        self.adapter_path = adapter_path
        self.host = host
        self.standalone = standalone
        self._secret = secret
        self._host_tls = host_tls
        self.adapter = adapter
        self.tools = collect_tools(adapter)
        self.concurrency = concurrency
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tool")
        self.active: dict[str, SessionContext] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}  # each active call's task: cancelling it cancels the call
        # Calls whose task this worker cancelled on purpose (the host's cancel, a lost connection's):
        # nobody waits for their answer. Any other cancel of a call is its tool's own doing (its failure).
        self.cancels_asked: set[str] = set()
        self.calls_served = 0  # calls that ended, whatever their outcome (the heartbeat reports it)
        self.sessions: dict[str, dict[str, Any]] = {}  # initialized sessions -> metadata
        self._drain_notice = asyncio.Event()  # set as the drain begins: every call stream tells its host
        self._call_streams = 0  # call streams open (one per host connection)
        self._no_call_streams = asyncio.Event()
        self._no_call_streams.set()
        self.health: list[ServingStatus] = []  # the health statuses a drain sets NOT_SERVING (its server's, --health's)
        self.stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._rpcs = 0  # RPCs whose handler has not yet sent its trailers
        self._rpcs_done = asyncio.Event()
        self._rpcs_done.set()
        self._started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._refusals = wire_errors.Refusals()  # malformed payloads, refused handshakes: logged rate-limited

    @property
    def draining(self) -> bool:
        """Whether it drains (SIGTERM, a SIGHUP reload, or the host's Shutdown): it refuses new
        calls and hosts."""
        return self._drain_notice.is_set()

    # ---- bookkeeping ----
    def _begin(self, request: pb.ExecuteToolRequest, *, streaming: bool) -> tuple[ToolDefinition, dict[str, Any], SessionContext]:
        try:  # first, so that even a refused call consumes its shared-memory files
            arguments = decode(request.arguments, owned=True)
        except ValueError as exc:
            raise self._malformed(f"tool {request.tool_name!r}: malformed arguments: {exc}") from None
        definition = admit_call(
            self.tools, request.tool_name, streaming=streaming, call_id=request.call_id, running=self.active,
            draining=self.draining,
        )
        arguments = definition.check_arguments(arguments)
        timeout = timeout_from_wire(request.timeout_seconds)
        deadline = None if timeout is None else time.monotonic() + timeout
        link = self.host.link(request.session_id) if request.session_id and self.host is not None else None
        ctx = SessionContext._create(request.session_id, request.call_id, deadline, link, self.host)
        if definition.context_parameter:
            arguments[definition.context_parameter] = ctx
        self.active[request.call_id] = ctx
        task = asyncio.current_task()
        if task is not None:
            self._tasks[request.call_id] = task
        self._idle.clear()
        return definition, arguments, ctx

    async def _refresh(self, definition: ToolDefinition, request: pb.ExecuteToolRequest) -> None:
        """Before a tool that can read variables runs: make its session's cache current."""
        if definition.context_parameter and request.session_id and self.host is not None:
            await self.host.refresh(request.session_id, request.session_state_version)

    def _release(self, call_id: str) -> None:
        self._tasks.pop(call_id, None)
        if self.active.pop(call_id, None) is not None:
            self.calls_served += 1
        if not self.active:
            self._idle.set()

    def _release_threadsafe(self, call_id: str) -> None:
        """From a tool's thread: free the call's slot on the loop (nothing to free once the loop
        has closed: the server is gone; a sync tool may outlive it in a worker run in a thread)."""
        with contextlib.suppress(RuntimeError):  # "Event loop is closed"
            self._loop.call_soon_threadsafe(self._release, call_id)

    def _watch_deadline(self, ctx: SessionContext) -> asyncio.TimerHandle | None:
        remaining = ctx.time_remaining()
        return None if remaining is None else self._loop.call_later(max(remaining, 0), cancel_call, ctx)

    # ---- RPCs ----
    async def ping(self, message: pb.PingRequest) -> pb.PingResponse:
        return pb.PingResponse(
            pid=os.getpid(), uptime_seconds=time.monotonic() - self._started, active_calls=list(self.active)
        )

    async def describe(self, message: pb.DescribeRequest) -> pb.DescribeResponse:
        problem = incompatibility(
            local_release=__version__, local_wire=WIRE_VERSION, peer="host",
            peer_release=message.trio_bridge_version, peer_wire=message.wire_version,
        )
        if problem is not None:
            self._refusals.log("incompatible host", problem)
            raise GRPCError(grpclib.const.Status.FAILED_PRECONDITION, wire_errors.clip(problem, MAX_STATUS_MESSAGE_BYTES))
        if self.draining:  # a host dialing it again (it drains to stop, or to reload): not now
            raise wire_errors.status_error(wire_errors.draining_notice())
        if self.standalone and message.host_address:
            self._attach(message.host_address, message.worker_id)
        if message.cancel_calls:
            self._cancel_lost_calls(message.cancel_calls)
        return pb.DescribeResponse(
            adapter=self.adapter_path,
            tools=[tool_spec(t) for t in self.tools.values()],
            pid=os.getpid(),
            python_version=sys.version.split()[0],
            concurrency=self.concurrency,
            trio_bridge_version=__version__,
            wire_version=WIRE_VERSION,
        )

    def _cancel_lost_calls(self, call_ids: list[str]) -> None:
        """Cancel the calls of ``call_ids`` that run here, as the host's cancel would have (their
        host lost the connection they came over); ids that run nowhere here are ignored. Returns
        at once: a sync tool's thread keeps its slot until it returns (``Ping`` lists it till then)."""
        cancelled = 0
        for call_id in dict.fromkeys(call_ids):
            task = self._tasks.get(call_id)
            if task is not None and not task.done():
                self.cancels_asked.add(call_id)
                task.cancel()
                cancelled += 1
        print(f"trio-bridge worker: cancelled {cancelled} call(s) of the {len(call_ids)} the host lost "
              "the connection of", file=sys.stderr, flush=True)

    def _attach(self, host_address: str, worker_id: str) -> None:
        """Serve the host at ``host_address`` from now on (a new pool: its sessions are new)."""
        if self.host is not None:
            self.host.close()
        self.sessions.clear()
        self.host = HostClient(host_address, self._secret, worker_id, self._loop, self._host_tls)
        print(f"trio-bridge worker: serving the host at {host_address} as worker {worker_id}", file=sys.stderr, flush=True)

    async def execute_tool(self, message: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """The unary RPC: a failed call ends with its status (see ``_wire/errors.py``)."""
        try:
            reply = await self.run_call(message)
        finally:
            self.cancels_asked.discard(message.call_id)
        if reply.error is not None:
            raise wire_errors.status_error(reply.error)
        return reply

    async def run_call(self, message: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """One call, its outcome in the reply: a result, or the ErrorInfo of its failure."""
        if not message.traceparent:
            return await self._execute_tool(message)
        with tracing.span(f"trio_bridge tool {message.tool_name}", kind="server", parent=message.traceparent,
                          attributes={"trio_bridge.tool": message.tool_name, "trio_bridge.session": message.session_id}):
            return await self._execute_tool(message)

    async def _execute_tool(self, message: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        try:
            definition, arguments, ctx = self._begin(message, streaming=False)
        except (TrioBridgeError, Draining) as exc:
            return pb.ExecuteToolResponse(error=_error_info(exc))
        try:
            await self._refresh(definition, message)
        except BaseException as exc:
            self._release(message.call_id)
            if isinstance(exc, TrioBridgeError):
                return pb.ExecuteToolResponse(error=_error_info(exc))
            raise
        timer = self._watch_deadline(ctx)
        released_by_thread = definition.kind == "sync" and not definition.inline
        try:
            remaining = ctx.time_remaining()
            async with asyncio.timeout(None if remaining is None else remaining + DEADLINE_SLACK) as scope:
                try:
                    if definition.inline:  # blocks the loop until it returns: see @tool(inline=)
                        result = definition.function(**arguments)
                    elif released_by_thread:
                        returned, result = await self._in_thread(definition, arguments, message.call_id)
                        if not returned:
                            raise result  # here: a StopIteration leaving a coroutine would become a RuntimeError
                    else:
                        result = await definition.function(**arguments)
                except BaseException as exc:
                    if isinstance(exc, TimeoutError) and scope.expired():
                        raise
                    if not failed_in_task(exc):  # cancelled (by the host, or the deadline), or the program stops
                        if isinstance(exc, asyncio.CancelledError):
                            cancel_call(ctx)
                        raise_stop(exc)
                    return pb.ExecuteToolResponse(error=wire_errors.tool_failure(exc))
        except TimeoutError:
            cancel_call(ctx)
            return pb.ExecuteToolResponse(error=wire_errors.deadline_error())
        finally:
            if timer is not None:
                timer.cancel()
            try:
                await end_call(ctx)
            finally:
                if not released_by_thread:
                    self._release(message.call_id)
        try:
            return pb.ExecuteToolResponse(result=encode(result, path="result"))
        except EncodeError as exc:
            return pb.ExecuteToolResponse(error=_error_info(exc))

    def _malformed(self, problem: str) -> InvalidArgumentError:
        """The error for a request whose payload is malformed, logged (rate-limited)."""
        self._refusals.log(wire_errors.MALFORMED_PAYLOAD, problem)
        return InvalidArgumentError(problem)

    async def _in_thread(self, definition: ToolDefinition, arguments: dict[str, Any], call_id: str) -> tuple[bool, Any]:
        """A sync tool's call in a pool thread: ``(True, what it returned)`` or ``(False, what it
        raised)``, any exception (``StopIteration`` included: ``asyncio.wrap_future`` cannot pass
        that one on, and the call would never end). The call's slot is free once the tool has
        returned.

        The outcome comes back as one callback on the loop (``_run_sync_tool``), without
        ``wrap_future``'s chained futures. The slot is freed here, on the loop, as the outcome
        arrives (one wake-up of the loop per call, not a second one for the release); only a call
        whose caller left while the thread runs it is freed from the thread's end (its work's
        callback)."""
        context = contextvars.copy_context()  # this task's (its span), in the thread
        outcome: asyncio.Future[tuple[bool, Any]] = self._loop.create_future()
        work = self.executor.submit(_run_sync_tool, self._loop, outcome, context, definition.function, arguments)
        try:
            result = await outcome
        except BaseException:
            # Cancelled before a thread took it, the tool never runs: free the slot now
            # (cancel() is False once a thread has started it); still running: when it returns.
            if work.cancel() or work.done():
                self._release(call_id)
            else:
                work.add_done_callback(lambda _: self._release_threadsafe(call_id))
            raise
        self._release(call_id)
        return result

    async def _serve_stream(self, stream: grpclib.server.Stream) -> None:
        message = await stream.recv_message()
        assert message is not None
        try:
            definition, arguments, ctx = self._begin(message, streaming=True)
        except (TrioBridgeError, Draining) as exc:
            raise wire_errors.status_error(_error_info(exc)) from None
        try:
            await self._refresh(definition, message)
        except BaseException as exc:
            self._release(message.call_id)
            if isinstance(exc, TrioBridgeError):
                raise wire_errors.status_error(_error_info(exc)) from None
            raise
        timer = self._watch_deadline(ctx)
        call_id = message.call_id
        if definition.kind == "async_generator":
            source: Any = AsyncGeneratorSource(definition.function(**arguments), STREAM_BUFFER)
        else:
            source = ThreadGeneratorSource(
                definition.function(**arguments), STREAM_BUFFER, self.executor,
                lambda: self._release_threadsafe(call_id),
            )
        index = 0
        try:
            remaining = ctx.time_remaining()
            async with asyncio.timeout(None if remaining is None else remaining + DEADLINE_SLACK):
                while True:
                    try:
                        items, finished = await source.next_batch(MAX_CHUNKS_PER_MESSAGE)
                    except BaseException as exc:
                        if not failed_in_task(exc):
                            raise_stop(exc)
                        raise wire_errors.status_error(wire_errors.tool_failure(exc)) from None
                    chunks, failed = encode_batch(items, index)
                    if failed is not None:
                        if chunks is not None:  # the chunks before the one that failed
                            await stream.send_message(pb.ToolChunkBatch(chunks=chunks))
                        raise wire_errors.status_error(_error_info(failed))
                    index += len(items)
                    await stream.send_message(pb.ToolChunkBatch(chunks=chunks))
                    if finished:
                        return
        except TimeoutError:
            cancel_call(ctx)
            raise wire_errors.status_error(wire_errors.deadline_error()) from None
        except asyncio.CancelledError:
            cancel_call(ctx)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            async with contextlib.AsyncExitStack() as cleanup:  # each step runs whatever the one before raised
                if definition.kind == "async_generator":
                    cleanup.callback(self._release, call_id)
                cleanup.push_async_callback(end_call, ctx)
                await source.aclose()

    async def initialize_session(self, message: pb.InitializeSessionRequest) -> pb.InitializeSessionResponse:
        if message.session_id not in self.sessions:
            try:
                metadata = decode(message.metadata) or {}
            except ValueError as exc:
                raise wire_errors.status_error(_error_info(self._malformed(f"session metadata: {exc}"))) from None
            if not isinstance(metadata, dict):
                problem = f"session metadata must be a dict, not {type(metadata).__name__}"
                raise wire_errors.status_error(_error_info(InvalidArgumentError(problem)))
            self.sessions[message.session_id] = metadata
            await self._adapter_hook(self.adapter.on_session_start, message.session_id, metadata)
        return pb.InitializeSessionResponse()

    async def _adapter_hook(self, hook: Any, *args: Any) -> None:
        try:
            result = hook(*args)
            if asyncio.iscoroutine(result):
                await result
        except BaseException as exc:
            if not failed_in_task(exc):
                raise_stop(exc)
            traceback.print_exc()  # the adapter's bug: report it (stderr reaches the host's log), keep serving

    async def cleanup_session(self, message: pb.CleanupSessionRequest) -> pb.CleanupSessionResponse:
        self.sessions.pop(message.session_id, None)
        if self.host is not None:
            self.host.forget(message.session_id)
        await self._adapter_hook(self.adapter.on_session_end, message.session_id)
        return pb.CleanupSessionResponse()

    async def shutdown(self, message: pb.ShutdownRequest) -> pb.ShutdownResponse:
        self.begin_drain(message.grace_seconds)
        return pb.ShutdownResponse()

    def begin_drain(self, grace: float, *, until_hosts_leave: bool = False, alive: ServingStatus | None = None) -> None:
        """Refuse new calls (kind ``draining``: the host runs them elsewhere, and each call
        stream tells its host at once), give running ones ``grace`` seconds (0: no limit), then
        stop (``stopped``); health says NOT_SERVING meanwhile. Again while draining: nothing.

        ``until_hosts_leave``: a drain of its own (SIGTERM, SIGHUP), not one a host asked for:
        once its calls have ended, it also waits (at most ``_HOSTS_LEAVE`` seconds, within
        ``grace``) until the hosts have closed their call streams, so that no call a host sent
        before it read the notice is lost with the connection. ``alive``: a health status left
        SERVING (a reload's liveness: the process is not dying, and must not be restarted)."""
        if self.draining:
            return
        self._drain_notice.set()
        for status in self.health:
            if status is not alive:
                status.set(False)  # grpc.health.v1: NOT_SERVING while it drains
        self._loop.create_task(self._drain(grace, until_hosts_leave))

    async def _drain(self, grace: float, until_hosts_leave: bool) -> None:
        ends = None if grace <= 0 else self._loop.time() + grace
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(grace, 0) or None)
        except TimeoutError:
            print(f"trio-bridge worker: {len(self.active)} call(s) still running after the "
                  f"{grace:.1f} s drain grace; exiting anyway", file=sys.stderr)
        else:
            if until_hosts_leave:
                left = _HOSTS_LEAVE if ends is None else min(_HOSTS_LEAVE, ends - self._loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._no_call_streams.wait(), timeout=max(left, 0))
            # Calls are over; let their replies (and the Shutdown reply) reach the host in full.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rpcs_done.wait(), timeout=_REPLY_FLUSH)
        self.stopped.set()

    @contextlib.contextmanager
    def _reply_pending(self) -> Iterator[None]:
        """Counted until a reply is out (an RPC's trailers sent, a call stream's result written),
        so that a drain knows when every reply has left."""
        self._rpcs += 1
        self._rpcs_done.clear()
        try:
            yield
        finally:
            self._rpcs -= 1
            if not self._rpcs:
                self._rpcs_done.set()

    def _counted(
        self, handler: Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]], rpc: str, cardinality: grpclib.const.Cardinality,
    ) -> Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]:
        async def counted(stream: grpclib.server.Stream[Any, Any]) -> None:
            if not cardinality.client_streaming:
                wire_errors.require_message(stream, rpc, self._refusals)
            with self._reply_pending():
                try:
                    await handler(stream)
                except GRPCError as exc:  # a failed call: its status goes out before the drain counts it done
                    await stream.send_trailing_metadata(status=exc.status, status_message=exc.message, status_details=exc.details)
                else:
                    await stream.send_trailing_metadata()

        return counted

    async def _serve_calls(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        if self.draining:  # no new host connection while it drains: its calls would be lost as it exits
            raise wire_errors.status_error(wire_errors.draining_notice())
        self._call_streams += 1
        self._no_call_streams.clear()
        try:
            await serve_calls(stream, self.run_call, self._reply_pending, self._drain_notice, self.cancels_asked, self.stopped)
        finally:
            self._call_streams -= 1
            if not self._call_streams:
                self._no_call_streams.set()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        old = mapping[_STREAM_PATH]
        # Our own handler sends each batch itself, so cancellation lands inside our try/finally.
        mapping[_STREAM_PATH] = grpclib.const.Handler(self._serve_stream, old.cardinality, old.request_type, old.reply_type)
        handlers = {
            path: grpclib.const.Handler(self._counted(h.func, path, h.cardinality), h.cardinality, h.request_type, h.reply_type)
            for path, h in mapping.items()
        }
        # The call stream lives as long as the connection: each of its calls is counted instead.
        old = mapping[_CALLS_PATH]
        handlers[_CALLS_PATH] = grpclib.const.Handler(self._serve_calls, old.cardinality, old.request_type, old.reply_type)
        return handlers


def _error_info(exc: BaseException) -> pb.ErrorInfo:
    if isinstance(exc, Draining):  # it did not start the call: the host runs it elsewhere
        return wire_errors.draining_notice()
    return wire_errors.error_info(exc)


# ---------------------------------------------------------------------------------------------
# process entry point


def _rss_bytes() -> int:
    """This process's resident set size now (Linux: /proc; elsewhere 0, not known)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def _heartbeat(host: HostClient, service: WorkerService, interval: float, forgotten: list[int]) -> None:
    """Tell the host we are alive; stop (exit code ``EXIT_HOST_GONE``) if it no longer knows us."""
    while True:
        try:
            reply = await host_stub(host).heartbeat(
                pb.HeartbeatRequest(
                    worker_id=host.worker_id, pid=os.getpid(), in_flight=len(service.active), rss_bytes=_rss_bytes(),
                    cpu_seconds=time.process_time(), calls_served=service.calls_served,
                ),
                timeout=max(interval, 1.0),
            )
            if not reply.known:
                print(f"trio-bridge worker {host.worker_id}: the host no longer knows this worker; exiting", file=sys.stderr)
                forgotten.append(EXIT_HOST_GONE)
                service.stopped.set()
                return
        except (OSError, GRPCError, TimeoutError):
            pass  # the lifeline decides whether the host is gone
        await asyncio.sleep(interval)


_JOIN_INTERVAL = 5.0  # seconds between a joining worker's offers (repeated: hosts restart too)


async def _join(head: str, advertised: str, service: WorkerService, token: str, tls: SSLContext | None) -> None:
    """Offer this worker to the host at ``head`` until stopped, every few seconds (the host
    ignores repeats, and a restarted host learns of it again). Says so when refused or away."""
    channel = open_channel(head, tls)
    stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: token})
    request = pb.JoinRequest(address=advertised, adapter=service.adapter_path, tools=sorted(service.tools))
    last = ""
    try:
        while True:
            try:
                await stub.join(request, timeout=_JOIN_INTERVAL)
                problem = ""
            except GRPCError as exc:
                refusal = wire_errors.info_of(exc)
                problem = (
                    f"the host at {head} refused it: {refusal.message}" if refusal is not None
                    else f"cannot reach the host at {head}: {exc}"
                )
            except (OSError, TimeoutError) as exc:
                problem = f"cannot reach the host at {head}: {exc}"
            if problem != last:
                print(f"trio-bridge worker: {problem or f'joined the host at {head} as {advertised}'}", file=sys.stderr, flush=True)
                last = problem
            await asyncio.sleep(_JOIN_INTERVAL)
    finally:
        channel.close()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line (``python -m trio_bridge.worker --help``)."""
    return argument_parser().parse_args(argv)


@functools.cache
def argument_parser() -> argparse.ArgumentParser:
    """The worker's command-line parser, made once per process: its help texts' translations
    and patterns cost ~4 ms, which a fork-server worker inherits from the preload instead."""
    parser = argparse.ArgumentParser(prog="python -m trio_bridge.worker", description="Run one trio-bridge worker.")
    parser.add_argument("--adapter", required=True, help="package.module:ClassName")
    parser.add_argument("--listen", required=True, help="unix:PATH or tcp:HOST:PORT (port 0: any free port)")
    parser.add_argument("--concurrency", type=int, default=1, help="calls served at once (default 1)")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds between heartbeats to the host")
    parser.add_argument("--no-lifeline", action="store_true", help="do not exit when stdin closes (manual runs)")
    parser.add_argument("--standalone", action="store_true", help="no host started it: hosts reach it at --listen")
    parser.add_argument("--tls-cert", help="TCP over TLS: this worker's certificate (PEM)")
    parser.add_argument("--tls-key", help="its private key (PEM)")
    parser.add_argument("--tls-ca", help="the CA that signs hosts' certificates (mutual TLS)")
    parser.add_argument(
        "--keepalive", type=float, default=KEEPALIVE,
        help=f"TCP: seconds between pings to each host with calls open; a host silent as long again is "
        f"taken for gone and its calls are cancelled (default {KEEPALIVE:g})",
    )
    parser.add_argument("--join", help="tcp://HOST:PORT of a host (its listen=) to offer this worker to")
    parser.add_argument("--advertise", help="HOST:PORT where hosts reach this worker (default: --listen's)")
    parser.add_argument(
        "--health", help="tcp:HOST:PORT: serve grpc.health.v1 alone there, in plain TCP (services '' and 'ready')",
    )
    parser.add_argument(
        "--drain-on-sigterm", type=float, metavar="SECONDS",
        help="on SIGTERM, refuse new calls, give running ones SECONDS (0: no limit), then exit with 143",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help=f"allow plain TCP (no TLS) beyond loopback; {SECRET_ENV} is needed there all the same",
    )
    return parser


async def serve(
    args: argparse.Namespace, env: Mapping[str, str], announce: Callable[[str], None], *, reload: Reload | None = None,
) -> int:
    """Load the adapter, run ``setup()``, serve until told to stop; return the exit code.

    ``env``: the worker's environment (the pool's secret, the host's address, the worker id,
    adapter options). ``announce(address)`` is called once the server listens (a process prints
    the ready line). The caller owns the process-wide parts: the lifeline, the shared-memory
    plane (``shared_memory.default_plane``) and exiting; and taking the secret out of
    ``os.environ`` before this runs the adapter's code (see :func:`main`).

    Refuses (exit code 2, before the adapter is imported) to listen beyond loopback without a
    secret, or over plain TCP there without ``--insecure`` (see :func:`listener_refusal`).

    ``reload``: SIGHUP reloads the adapter's code (``trio-bridge worker``): once it has drained,
    this returns 0 with ``reload.due`` set, and the caller executes it again in place.
    """
    secret = env.get(SECRET_ENV, "")
    refusal = listener_refusal(args, secret)  # it also checks --listen's form
    if refusal is None and not args.keepalive > 0:
        refusal = f"--keepalive must be a positive number of seconds, not {args.keepalive:g}"
    if refusal is not None:
        print(f"trio-bridge worker: {refusal}", file=sys.stderr, flush=True)
        return 2
    try:
        allowed_uids = parse_allowed_uids(env.get(ALLOWED_UIDS_ENV, ""))
    except ValueError as exc:
        print(f"trio-bridge worker: {exc}", file=sys.stderr)
        return 2
    # The health listener answers from the start: alive while setup() runs, ready after it.
    alive, ready = ServingStatus(), ServingStatus(serving=False)
    health_server = None
    if args.health:
        health_server = new_health_server({LIVENESS: alive, READINESS: ready})
        _, where, port = parse_address(args.health)
        try:
            listener = tcp_listener(where, port)
            await health_server.start(sock=listener)
        except OSError as exc:
            print(f"trio-bridge worker: --health {args.health}: cannot listen there: {exc.strerror or exc}", file=sys.stderr, flush=True)
            return 2
    try:
        return await _serve_adapter(args, env, announce, secret, allowed_uids, alive, ready, reload)
    finally:
        if health_server is not None:
            health_server.close()


async def _serve_adapter(
    args: argparse.Namespace, env: Mapping[str, str], announce: Callable[[str], None], secret: str,
    allowed_uids: Collection[int], alive: ServingStatus, ready: ServingStatus, reload: Reload | None,
) -> int:
    """:func:`serve`'s part from the adapter's import on; ``alive``, ``ready``: the health
    listener's statuses: ``ready`` turns SERVING once it listens, both NOT_SERVING when it drains."""
    try:
        cls = load_adapter_class(args.adapter)
    except AdapterLoadError as exc:  # one line that says how to fix it; a traceback only where the module's code raised
        print(f"{WORKER_MESSAGE_PREFIX}{exc}", file=sys.stderr, flush=True)
        if exc.in_module_code:
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        return EXIT_ADAPTER_IMPORT
    except BaseException:
        print(f"{WORKER_MESSAGE_PREFIX}cannot load adapter {args.adapter!r}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_ADAPTER_IMPORT
    try:
        adapter = cls()
        adapter.options = json.loads(env.get(ADAPTER_OPTIONS_ENV) or "{}")
        returned, result = await asyncio.get_running_loop().run_in_executor(None, _outcome_of, adapter.setup, {})
        if not returned:
            raise result
        if asyncio.iscoroutine(result):  # setup may be async def
            await result
        server_tls = client_tls = None
        if args.tls_cert:
            tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_ca)
            server_tls, client_tls = tls.server_context(), tls.client_context()
        host_address = env.get(HOST_ADDRESS_ENV)
        host = None
        if host_address:
            host = HostClient(host_address, secret, env.get(WORKER_ID_ENV, ""), asyncio.get_running_loop())
        service = WorkerService(
            args.adapter, adapter, args.concurrency, host, standalone=args.standalone, secret=secret,
            host_tls=client_tls,
        )
    except BaseException:
        print(f"trio-bridge worker: {args.adapter}.setup() failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return EXIT_ADAPTER_SETUP

    scheme, where, port = parse_address(args.listen)  # its form was checked before the adapter loaded
    # Over TCP (a host elsewhere), pings find a host gone silently, and closing its connection
    # cancels its calls; a Unix socket's peer is on this machine, and its loss is always seen.
    server, status = new_server(
        [service], secret, coalesce_writes=True, allowed_uids=allowed_uids,
        keepalive=args.keepalive if scheme == "tcp" else None,
    )
    service.health = [status, alive, ready]
    if scheme == "unix":
        await server.start(path=where)
        address = args.listen
    else:
        listener = tcp_listener(where, port)  # bound here, so the port is known
        bound = listener.getsockname()
        await server.start(sock=listener, ssl=server_tls)
        address = f"tcp:{bound[0]}:{bound[1]}"
    terminated: list[int] = []
    if args.drain_on_sigterm is not None:
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            loop.remove_signal_handler(signal.SIGTERM)  # a second SIGTERM ends the process at once
            terminated.append(128 + signal.SIGTERM)  # the shell's code for it, once drained
            print(f"trio-bridge worker: SIGTERM: draining (at most {args.drain_on_sigterm:g} s)", file=sys.stderr, flush=True)
            service.begin_drain(args.drain_on_sigterm, until_hosts_leave=True)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    if reload is not None:
        reload.install(service, args.drain_on_sigterm or 0.0, alive)
    announce(address)  # after the SIGTERM handler: one sent on seeing this line drains
    ready.set(True)

    tasks = []
    forgotten: list[int] = []
    if host is not None:
        tasks.append(asyncio.create_task(_heartbeat(host, service, args.heartbeat_interval, forgotten)))
    if args.join:
        advertised = advertised_address(args.advertise, address)
        tasks.append(asyncio.create_task(_join(args.join, advertised, service, secret, client_tls)))
    try:
        await service.stopped.wait()
    finally:
        if reload is not None:
            reload.uninstall()
        for task in tasks:
            task.cancel()
        # Not server.wait_closed(): from Python 3.12 it waits until every client has hung up,
        # and the host keeps its channel open until we exit. The drain has already let every
        # reply out in full; exiting closes the connections.
        server.close()
        if host is not None:
            host.close()
        service.executor.shutdown(wait=False, cancel_futures=True)
    return forgotten[0] if forgotten else terminated[0] if terminated else 0


def listener_refusal(args: argparse.Namespace, secret: str) -> str | None:
    """Why the worker must not listen at ``args.listen`` (``None``: it may). Beyond loopback
    (:mod:`trio_bridge._wire.listeners`) it needs ``secret`` of at least ``MIN_TOKEN``
    characters, whatever the flags, and TLS there unless ``--insecure``."""
    try:
        exposed = beyond_loopback(args.listen)
    except ValueError as exc:
        return f"--listen: {exc}"
    if not exposed:
        return None
    if len(secret) < MIN_TOKEN:
        found = f"{SECRET_ENV} has {len(secret)} characters" if secret else f"{SECRET_ENV} is not set"
        return (
            f"--listen {args.listen} is reachable from other machines and {found}, so anyone there could "
            f"call its tools: set {SECRET_ENV} to the hosts' token (RemoteWorkers(token=...), at least {MIN_TOKEN} "
            "characters; `trio-bridge worker --token-file FILE` reads it from a file), or listen on loopback "
            "(tcp:127.0.0.1:PORT) or a Unix socket"
        )
    if not args.tls_cert and not args.insecure:
        return (
            f"--listen {args.listen} is reachable from other machines over plain TCP, where the secret "
            "crosses the network in clear: give --tls-cert and --tls-key, or --insecure to allow plain TCP"
        )
    return None


def _print_ready_line(address: str) -> None:
    sys.stdout.write(READY_PREFIX + address + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def loop_factory(env: Mapping[str, str]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes a worker process's event loop (for ``asyncio.Runner``): uvloop's if it
    imports and ``env`` does not set ``TRIO_BRIDGE_WORKER_LOOP=asyncio``; else ``None``
    (asyncio's default loop).

    uvloop made a unary call of a sync tool ~10% faster end to end (its thread hand-off is
    56 us instead of asyncio's 108 us, measured on 2 cores).
    """
    if env.get(LOOP_ENV, "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop
    return None


def take_environment() -> dict[str, str]:
    """This process's environment as :func:`serve` reads it, the pool secret included; the
    secret leaves ``os.environ``, so the adapter's code (its import, ``setup()``, its tools) does
    not find it there, nor do the processes its tools start (they inherit ``os.environ``).

    A spawned worker gets its secret as the first line on stdin (``SECRET_ON_STDIN_ENV=1``): an
    environment variable would stay in ``/proc/PID/environ``, which shows the environment a
    process started with (not ``os.environ``) to every process of its user, for its whole life.
    A forked worker finds it in ``os.environ`` only: its ``/proc/PID/environ`` is the fork
    server's, which has none.
    """
    env = dict(os.environ)
    if os.environ.pop(SECRET_ON_STDIN_ENV, "") == "1":
        env[SECRET_ENV] = _read_secret_line()
    os.environ.pop(SECRET_ENV, None)
    return env


_MAX_SECRET_LINE = 4096  # bytes


def _read_secret_line() -> str:
    """The line the host wrote on our stdin before anything else (it writes nothing more: the
    lifeline reads stdin for EOF after this). EOF first: the host is gone."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, _MAX_SECRET_LINE)
        if not chunk:
            os._exit(EXIT_HOST_GONE)
        line += chunk
        if len(line) > _MAX_SECRET_LINE:
            print(f"trio-bridge worker: {SECRET_ON_STDIN_ENV}=1, but stdin's first line is no secret", file=sys.stderr)
            os._exit(2)
    return line[:-1].decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)  # runs no adapter code; --help must not wait for a secret on stdin
    # Then, before the adapter's code: it must not find the secret in os.environ.
    env = take_environment()
    if not args.no_lifeline:
        start_lifeline(os.getppid())
    shared_memory.default_plane = SharedMemoryPlane.from_environment(os.environ)
    # A Runner, not asyncio.run: Python 3.11's asyncio.run takes no loop factory. It still turns
    # Ctrl-C into cancelling serve() and then KeyboardInterrupt, on uvloop too.
    with asyncio.Runner(loop_factory=loop_factory(os.environ)) as runner:
        code = runner.run(serve(args, env, _print_ready_line))
    sys.stdout.flush()
    sys.stderr.flush()
    # Sync tools still running in threads after the drain grace must not keep the process alive.
    os._exit(code)


def _outcome_of(function: Callable[..., Any], arguments: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, function(**arguments))``, or ``(False, what it raised)``: never raises, so that no
    exception has to cross futures (``StopIteration`` cannot)."""
    try:
        return True, function(**arguments)
    except BaseException as exc:  # every one: the loop's side decides what it means (is_failure)
        return False, exc


def _run_sync_tool(
    loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[tuple[bool, Any]], context: contextvars.Context,
    function: Callable[..., Any], arguments: dict[str, Any],
) -> None:
    """A pool thread's work: a sync tool's call, in ``context``; its outcome to ``outcome``, on
    ``loop`` (nobody waits for it once the loop has closed)."""
    settled = context.run(_outcome_of, function, arguments)
    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
        loop.call_soon_threadsafe(_settle, outcome, settled)


def _settle(outcome: asyncio.Future[tuple[bool, Any]], settled: tuple[bool, Any]) -> None:
    if not outcome.done():  # (cancelled: its caller left)
        outcome.set_result(settled)
