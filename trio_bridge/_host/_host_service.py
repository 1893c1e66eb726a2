"""HostService: what the host serves to its workers.

Handlers are asyncio coroutines on the host's asyncio loop (its own thread, ``trio_bridge._aio``);
each crosses into Trio once to reach
the state backend. Every request is validated: an unknown session, a malformed value or a
refused write ends the RPC with a gRPC status whose details hold its ``ErrorInfo`` (see
``_wire/errors.py``), changes nothing, and never crashes the host.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import grpclib.const
import grpclib.server
import trio

from trio_bridge import _tracing as tracing
from trio_bridge._errors import EncodeError, InvalidArgumentError, ToolNotFoundError, TrioBridgeError
from trio_bridge._host._metrics import UNKNOWN_TOOL
from trio_bridge._host._tools import iterate_host_tool, run_host_tool
from trio_bridge._state.backend import StateBackend
from trio_bridge._wire.chunks import encode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import (
    MAX_CHUNKS_PER_MESSAGE,
    STREAM_BUFFER,
    WATCH_BUFFER_METADATA,
    WORKER_METADATA,
    timeout_from_wire,
)
from trio_bridge._wire.errors import (
    DEADLINE_EXCEEDED,
    MALFORMED_PAYLOAD,
    TOOL_ERROR,
    Refusals,
    error_info,
    require_message,
    status_error,
)
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.state import history_to_wire, update_to_wire, variable_to_wire
from trio_bridge._wire.tool_spec import tool_spec

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._host._router import Route
    from trio_bridge._host._tools import ToolRegistry
    from trio_bridge._wire.shared_memory import SharedMemoryPlane
_DEFAULT_WATCH_HEARTBEAT = 10.0  # seconds
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("trio_bridge_caller", default="")


class RoutedCalls(Protocol):
    """What the service needs of the pool's calls: worker-to-worker calls, and parking."""

    def parked(self, call_id: str) -> AbstractContextManager[None]: ...

    async def execute(self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None) -> Any: ...


class HostService(pb.HostServiceBase):
    """Args:
    boundary: the asyncio boundary (handlers cross into Trio through it).
    state: the state backend.
    calls: runs routed worker-to-worker calls; parks a worker's call while it waits on the host.
    tools: the host tool registry.
    plane: the shared-memory plane of the pool (``None``: in-band only).
    heartbeat: a worker's heartbeat: keeps its figures, and says whether a live worker of the
        pool has its id.
    route_for: the route of a session's calls, by session id.
    join: takes a remote worker that offers itself, ``join(address, adapter, tool_names)``
        (raises a TrioBridgeError to refuse it); ``None``: the pool takes none.
    """

    def __init__(
        self, boundary: Boundary, state: StateBackend, *, calls: RoutedCalls, tools: ToolRegistry,
        plane: SharedMemoryPlane | None, heartbeat: Callable[[pb.HeartbeatRequest], bool], route_for: Callable[[str], Route],
        join: Callable[[str, str, list[str]], Awaitable[None]] | None = None,
        count_host_tool_call: Callable[[str, str], None] | None = None,
    ) -> None:
        self._count = count_host_tool_call or (lambda tool, outcome: None)
        self._boundary = boundary
        self._state = state
        self._calls = calls
        self._tools = tools
        self._plane = plane
        self._heartbeat = heartbeat
        self._route_for = route_for
        self._join = join
        self._refusals = Refusals()  # malformed payloads: logged rate-limited

    async def join(self, m: pb.JoinRequest) -> pb.JoinReply:
        if self._join is None:
            raise status_error(error_info(InvalidArgumentError("this pool takes no joining workers")))
        try:
            await self._boundary.call_trio(self._join, m.address, m.adapter, list(m.tools))
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None
        return pb.JoinReply()

    # The pool's state is Trio's: handlers read and change it only on Trio's side of the boundary.
    async def heartbeat(self, message: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        async def beat() -> pb.HeartbeatResponse:
            return pb.HeartbeatResponse(known=self._heartbeat(message))

        return await self._boundary.call_trio(beat)

    # ---- tools ----
    async def list_host_tools(self, m: pb.ListHostToolsRequest) -> pb.ListHostToolsReply:
        async def listed() -> pb.ListHostToolsReply:
            return pb.ListHostToolsReply(tools=[tool_spec(t.definition) for t in self._tools.host_tools(m.session_id or None)])

        return await self._boundary.call_trio(listed)

    async def execute_host_tool(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        return _unary(await self._boundary.call_trio(self._traced, "host tool", self._execute_host_tool, m))

    async def _traced(
        self, what: str, handle: Callable[[pb.ExecuteToolRequest], Awaitable[pb.ExecuteToolResponse]], m: pb.ExecuteToolRequest,
    ) -> pb.ExecuteToolResponse:
        """``handle(m)`` in a span that continues the calling worker's trace (traces on)."""
        if not tracing.enabled():
            return await handle(m)
        with tracing.span(f"trio_bridge {what} {m.tool_name}", kind="server", parent=m.traceparent,
                          attributes={"trio_bridge.tool": m.tool_name, "trio_bridge.session": m.session_id}):
            return await handle(m)

    async def _execute_host_tool(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        outcome, label = "refused", m.tool_name
        try:
            try:
                tool = self._tools.host_tool(m.tool_name, m.session_id)
                if tool.definition.streaming:
                    raise InvalidArgumentError(f"host tool {m.tool_name!r} is a streaming tool; call it with stream_host_tool()")
                arguments = tool.definition.check_arguments(self._decode(m.arguments, "arguments"))
            except TrioBridgeError as exc:
                if isinstance(exc, ToolNotFoundError):
                    label = UNKNOWN_TOOL
                return pb.ExecuteToolResponse(error=error_info(exc))
            outcome = "cancelled"
            with self._calls.parked(m.call_id), trio.move_on_after(_timeout(m)) as deadline:
                try:
                    result = await run_host_tool(tool, arguments)
                except Exception as exc:
                    outcome = "failed"
                    return pb.ExecuteToolResponse(error=error_info(exc, kind=TOOL_ERROR))
                reply = self._result(result)
                outcome = "failed" if reply.error is not None else "completed"
                return reply
            assert deadline.cancelled_caught
            outcome = "deadline_exceeded"
            return pb.ExecuteToolResponse(error=_deadline_error("host tool", m.tool_name))
        finally:
            self._count(label, outcome)

    async def execute_tool(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        return _unary(await self._boundary.call_trio(self._traced, "routed call", self._route, m))

    async def _route(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """A worker's call of another worker's tool, in the caller's session if it has one."""
        with self._calls.parked(m.call_id), trio.move_on_after(_timeout(m)) as deadline:
            try:
                arguments = self._decode(m.arguments, "arguments")
                route = self._route_for(m.session_id) if m.session_id else None
                result = await self._calls.execute(m.tool_name, arguments, route)
            except TrioBridgeError as exc:
                return pb.ExecuteToolResponse(error=error_info(exc))
            return self._result(result)
        assert deadline.cancelled_caught
        return pb.ExecuteToolResponse(error=_deadline_error("tool", m.tool_name))

    async def _serve_streaming_host_tool(self, stream: grpclib.server.Stream) -> None:
        message = await stream.recv_message()
        assert message is not None
        await self._boundary.call_trio(self._stream_host_tool, message, stream)

    async def _stream_host_tool(self, m: pb.ExecuteToolRequest, stream: grpclib.server.Stream) -> None:
        """Trio side: chunks go through a bounded channel; each message carries every chunk
        ready at the time (so a fast generator is not held back by one crossing per chunk)."""
        try:
            tool = self._tools.host_tool(m.tool_name, m.session_id)
            if not tool.definition.streaming:
                raise InvalidArgumentError(f"host tool {m.tool_name!r} is not a streaming tool; call it with call_host_tool()")
            arguments = tool.definition.check_arguments(self._decode(m.arguments, "arguments"))
        except TrioBridgeError as exc:
            self._count(UNKNOWN_TOOL if isinstance(exc, ToolNotFoundError) else m.tool_name, "refused")
            raise status_error(error_info(exc)) from None
        outcome = ["cancelled"]
        try:
            await self._stream_checked_host_tool(m, stream, tool, arguments, outcome)
        finally:
            self._count(m.tool_name, outcome[0])

    async def _stream_checked_host_tool(
        self, m: pb.ExecuteToolRequest, stream: grpclib.server.Stream, tool: Any, arguments: dict[str, Any], outcome: list[str],
    ) -> None:
        send = self._boundary.run
        chunks_in, chunks_out = trio.open_memory_channel[Any](STREAM_BUFFER)
        failure: list[pb.ErrorInfo] = []

        async def produce() -> None:
            async with chunks_in:
                try:
                    async for chunk in iterate_host_tool(tool, arguments):
                        await chunks_in.send(chunk)
                except Exception as exc:
                    failure.append(error_info(exc, kind=TOOL_ERROR))

        with self._calls.parked(m.call_id), trio.move_on_after(_timeout(m)) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                index = 0
                async with chunks_out:
                    async for first in chunks_out:
                        batch = [first]
                        while len(batch) < MAX_CHUNKS_PER_MESSAGE:
                            try:
                                batch.append(chunks_out.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        encoded, failed = encode_batch(batch, index, plane=self._plane)
                        if failed is not None:
                            nursery.cancel_scope.cancel()
                            if encoded is not None:
                                await send(stream.send_message(pb.ToolChunkBatch(chunks=encoded)))
                            failure.append(error_info(failed))
                            break
                        index += len(batch)
                        await send(stream.send_message(pb.ToolChunkBatch(chunks=encoded)))
            outcome[0] = "failed" if failure else "completed"
            if failure:
                raise status_error(failure[0])
        if deadline.cancelled_caught:
            outcome[0] = "deadline_exceeded"
            raise status_error(_deadline_error("host tool", m.tool_name))

    # ---- sessions ----
    async def get_session(self, message: pb.GetSessionRequest) -> pb.SessionReply:
        try:
            info = await self._boundary.call_trio(self._state.get_session, message.session_id)
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None
        return pb.SessionReply(
            id=info.id, ttl=info.ttl or 0.0, metadata=_encode_metadata(info.metadata),
            variable_count=info.variable_count, state_version=info.state_version,
        )

    # ---- variables ----
    async def register_variable(self, m: pb.RegisterVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.register_variable(
                m.session_id, m.name, m.type, self._decode(m.value, "value"), constraints=self._decode(m.constraints, "constraints"),
                metadata=self._decode(m.metadata, "metadata"), source=source,
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self._plane)], state_version=version)

        source = _source()
        return await self._run(op)

    async def get_variable(self, m: pb.GetVariablesRequest) -> pb.VariableReply:
        if not m.names:
            raise status_error(error_info(InvalidArgumentError("GetVariable needs a name")))
        return await self.get_variables(pb.GetVariablesRequest(session_id=m.session_id, names=m.names[:1]))

    async def get_variables(self, m: pb.GetVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            found, version = await self._state.get_variables(m.session_id, None if m.all else list(m.names))
            return pb.VariableReply(variables=[variable_to_wire(v, self._plane) for v in found.values()], state_version=version)

        return await self._run(op)

    async def set_variable(self, m: pb.SetVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.set_variable(
                m.session_id, m.name, self._decode(m.value, "value"), expected_version=m.expected_version,
                source=source, optimizer_id=m.optimizer_id or None, metadata=self._decode(m.metadata, "metadata"),
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self._plane)], state_version=version)

        source = _source()
        return await self._run(op)

    async def set_variables(self, m: pb.SetVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            updates = self._decode(m.updates, "updates")
            if not isinstance(updates, dict):
                raise InvalidArgumentError("updates must be a dict of name -> value")
            results, version = await self._state.set_variables(
                m.session_id, updates, atomic=m.atomic, source=source, optimizer_id=m.optimizer_id or None
            )
            return pb.VariableReply(
                variables=[variable_to_wire(r, self._plane) for r in results.values() if not isinstance(r, Exception)],
                errors={k: error_info(r) for k, r in results.items() if isinstance(r, Exception)},
                state_version=version,
            )

        source = _source()
        return await self._run(op)

    async def list_variables(self, m: pb.ListVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            found = await self._state.list_variables(m.session_id, m.pattern or "*")
            return pb.VariableReply(variables=[variable_to_wire(v, self._plane) for v in found])

        return await self._run(op)

    async def delete_variable(self, m: pb.VariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            return pb.VariableReply(state_version=await self._state.delete_variable(m.session_id, m.name, source=source))

        source = _source()
        return await self._run(op)

    async def variable_history(self, m: pb.VariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            entries = await self._state.variable_history(m.session_id, m.name)
            return pb.VariableReply(history=[history_to_wire(e, self._plane) for e in entries])

        return await self._run(op)

    async def rollback_variable(self, m: pb.RollbackVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.rollback_variable(
                m.session_id, m.name, m.version, source=source, optimizer_id=m.optimizer_id or None
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self._plane)], state_version=version)

        source = _source()
        return await self._run(op)

    async def add_dependency(self, m: pb.AddDependencyRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable = await self._state.add_dependency(m.session_id, m.dependent, m.dependency)
            return pb.VariableReply(variables=[variable_to_wire(variable, self._plane)])

        return await self._run(op)

    async def start_optimization(self, m: pb.OptimizationRequest) -> pb.VariableReply:
        return await self._optimization(m, active=True)

    async def stop_optimization(self, m: pb.OptimizationRequest) -> pb.VariableReply:
        return await self._optimization(m, active=False)

    async def _optimization(self, m: pb.OptimizationRequest, *, active: bool) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            if not m.optimizer_id:
                raise InvalidArgumentError("an optimizer_id is required")
            variable = await self._state.set_optimization(m.session_id, m.name, m.optimizer_id, active=active)
            lease = (self._state.lock_lease or 0.0) if active else 0.0
            return pb.VariableReply(variables=[variable_to_wire(variable, self._plane)], lock_lease_seconds=lease)

        return await self._run(op)

    async def _run(self, op: Callable[[], Awaitable[pb.VariableReply]]) -> pb.VariableReply:
        try:
            return await self._boundary.call_trio(op)
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None

    # ---- watching ----
    async def _serve_watch(self, stream: grpclib.server.Stream) -> None:
        message = await stream.recv_message()
        assert message is not None
        buffer_size = stream.metadata.get(WATCH_BUFFER_METADATA) if stream.metadata else None
        await self._boundary.call_trio(self._watch, message, stream, buffer_size)

    async def _watch(self, m: pb.WatchVariablesRequest, stream: grpclib.server.Stream, buffer_size: str | None) -> None:
        """Trio side of a watch: one message per batch of updates, a heartbeat (an empty batch)
        when nothing happened for ``heartbeat_seconds``; ends when the session ends.

        ``buffer_size``: the worker's ``watch_variables(buffer_size=...)``, from the
        ``x-trio-bridge-watch-buffer`` metadata (the backend's default without it). The worker
        reads the stream as it comes into a buffer of that size of its own; should the stream
        back up anyway (HTTP/2 flow control), the watcher here falls behind instead, and
        coalesces beyond that many. Writers never wait.
        """
        heartbeat = m.heartbeat_seconds if m.heartbeat_seconds > 0 else _DEFAULT_WATCH_HEARTBEAT
        send = self._boundary.run
        try:
            options = {} if buffer_size is None else {"buffer_size": _positive_int(buffer_size, WATCH_BUFFER_METADATA)}
            async with self._state.watch(m.session_id, list(m.names), include_initial=m.include_initial, **options) as watcher:
                while True:
                    batch = None
                    with trio.move_on_after(heartbeat):  # around the wait only: a send cut short would lose the batch
                        batch = await watcher.next_batch()
                    if batch is None:
                        await send(stream.send_message(pb.WatchBatch()))
                    elif not batch:
                        return  # the session ended
                    else:
                        await send(stream.send_message(pb.WatchBatch(updates=[update_to_wire(u, self._plane) for u in batch])))
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None

    def _decode(self, payload: pb.Payload | None, what: str) -> Any:
        try:
            return decode(payload, plane=self._plane)
        except ValueError as exc:
            problem = f"malformed {what}: {exc}"
            self._refusals.log(MALFORMED_PAYLOAD, problem)
            raise InvalidArgumentError(problem) from None

    def _result(self, value: Any) -> pb.ExecuteToolResponse:
        try:
            return pb.ExecuteToolResponse(result=encode(value, path="result", plane=self._plane))
        except EncodeError as exc:
            return pb.ExecuteToolResponse(error=error_info(exc))

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        # Server streams we send ourselves, so cancellation lands inside our code.
        own = {
            "/trio_bridge.v1.HostService/WatchVariables": self._serve_watch,
            "/trio_bridge.v1.HostService/ExecuteStreamingHostTool": self._serve_streaming_host_tool,
        }
        for path, handler in mapping.items():
            function = own[path] if path in own else handler.func
            checked = _with_caller(function, path, None if handler.cardinality.client_streaming else self._refusals)
            mapping[path] = grpclib.const.Handler(checked, handler.cardinality, handler.request_type, handler.reply_type)
        return mapping


def _with_caller(
    function: Callable[[grpclib.server.Stream], Awaitable[None]], rpc: str, refusals: Refusals | None,
) -> Callable[[grpclib.server.Stream], Awaitable[None]]:
    """Remember which worker is calling (from its metadata) for the ``source`` of its writes;
    with ``refusals``, refuse a request that has no message (see ``require_message``)."""

    async def handler(stream: grpclib.server.Stream) -> None:
        if refusals is not None:
            require_message(stream, rpc, refusals)
        worker = stream.metadata.get(WORKER_METADATA, "") if stream.metadata else ""
        token = _caller.set(f"worker:{worker}" if worker else "worker")
        try:
            await function(stream)
        finally:
            _caller.reset(token)

    return handler




def _unary(reply: pb.ExecuteToolResponse) -> pb.ExecuteToolResponse:
    """A tool call's reply for its unary RPC: a failure ends it with a status instead."""
    if reply.error is not None:
        raise status_error(reply.error)
    return reply


def _timeout(m: pb.ExecuteToolRequest) -> float:
    remaining = timeout_from_wire(m.timeout_seconds)
    return math.inf if remaining is None else remaining


def _deadline_error(what: str, name: str) -> pb.ErrorInfo:
    return pb.ErrorInfo(kind=DEADLINE_EXCEEDED, type="TimeoutError", message=f"{what} {name!r} did not finish before the caller's deadline")


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgumentError(f"{what} must be a positive integer, not {text!r}")
    return value


def _source() -> str:
    return _caller.get() or "worker"


def _encode_metadata(metadata: Any) -> pb.Payload:
    return encode(dict(metadata))
