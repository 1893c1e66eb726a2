"""The HostService's tools: host tools for workers (list, call, stream), and a worker's call of
another worker's tool, routed through the host.

A call runs in Trio, parked (its worker's slot counted as waiting on the host) and within the
caller's deadline; a tool's failure, a refused call or a missed deadline ends the RPC with its
``ErrorInfo``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import grpclib.server
import trio

from trio_bridge import _tracing as tracing
from trio_bridge._core.failures import is_failure
from trio_bridge._errors import EncodeError, InvalidArgumentError, ToolNotFoundError, TrioBridgeError
from trio_bridge._host._metrics import UNKNOWN_TOOL
from trio_bridge._host._service_area import ServiceArea, StreamHandler
from trio_bridge._host._tools import iterate_host_tool, run_host_tool
from trio_bridge._wire.chunks import encode_batch
from trio_bridge._wire.codec import encode
from trio_bridge._wire.contract import MAX_CHUNKS_PER_MESSAGE, STREAM_BUFFER, timeout_from_wire
from trio_bridge._wire.errors import DEADLINE_EXCEEDED, TOOL_ERROR, Refusals, error_info, status_error
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tool_spec import tool_spec

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._host._router import Route
    from trio_bridge._host._tools import HostTool, ToolRegistry
    from trio_bridge._wire.shared_memory import SharedMemoryPlane


class RoutedCalls(Protocol):
    """What the service needs of the pool's calls: worker-to-worker calls, and parking."""

    def parked(self, call_id: str) -> AbstractContextManager[None]: ...

    async def execute(self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None) -> Any: ...


class ToolService(ServiceArea):
    """Host tools and routed calls, for workers.

    Args:
        calls: runs routed worker-to-worker calls; parks a worker's call while it waits on the host.
        tools: the host tool registry.
        route_for: the route of a session's calls, by session id.
        count: counts a host tool call, ``count(tool, outcome)``.

    (See :class:`ServiceArea` for the others.)
    """

    RPCS = ("ListHostTools", "ExecuteHostTool", "ExecuteStreamingHostTool", "ExecuteTool")

    def __init__(
        self, boundary: Boundary, plane: SharedMemoryPlane | None, refusals: Refusals, *, calls: RoutedCalls,
        tools: ToolRegistry, route_for: Callable[[str], Route], count: Callable[[str, str], None],
    ) -> None:
        super().__init__(boundary, plane, refusals)
        self._calls = calls
        self._tools = tools
        self._route_for = route_for
        self._count = count

    def streams(self) -> Mapping[str, StreamHandler]:
        return {"ExecuteStreamingHostTool": self._serve_streaming_host_tool}

    async def list_host_tools(self, m: pb.ListHostToolsRequest) -> pb.ListHostToolsReply:
        async def listed() -> pb.ListHostToolsReply:
            return pb.ListHostToolsReply(tools=[tool_spec(t.definition) for t in self._tools.host_tools(m.session_id or None)])

        return await self.boundary.call_trio(listed)

    async def execute_host_tool(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        return _unary(await self.boundary.call_trio(self._traced, "host tool", self._execute_host_tool, m))

    async def execute_tool(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        return _unary(await self.boundary.call_trio(self._traced, "routed call", self._route, m))

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
                arguments = tool.definition.check_arguments(self.decode_payload(m.arguments, "arguments"))
            except TrioBridgeError as exc:
                if isinstance(exc, ToolNotFoundError):
                    label = UNKNOWN_TOOL
                return pb.ExecuteToolResponse(error=error_info(exc))
            outcome = "cancelled"
            with self._calls.parked(m.call_id), trio.move_on_after(_timeout(m)) as deadline:
                try:
                    result = await run_host_tool(tool, arguments)
                except BaseException as exc:
                    if not is_failure(exc, (trio.Cancelled,)):
                        raise
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

    async def _route(self, m: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """A worker's call of another worker's tool, in the caller's session if it has one."""
        with self._calls.parked(m.call_id), trio.move_on_after(_timeout(m)) as deadline:
            try:
                arguments = self.decode_payload(m.arguments, "arguments")
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
        await self.boundary.call_trio(self._stream_host_tool, message, stream)

    async def _stream_host_tool(self, m: pb.ExecuteToolRequest, stream: grpclib.server.Stream) -> None:
        """Trio side: chunks go through a bounded channel; each message carries every chunk
        ready at the time (so a fast generator is not held back by one crossing per chunk)."""
        try:
            tool = self._tools.host_tool(m.tool_name, m.session_id)
            if not tool.definition.streaming:
                raise InvalidArgumentError(f"host tool {m.tool_name!r} is not a streaming tool; call it with call_host_tool()")
            arguments = tool.definition.check_arguments(self.decode_payload(m.arguments, "arguments"))
        except TrioBridgeError as exc:
            self._count(UNKNOWN_TOOL if isinstance(exc, ToolNotFoundError) else m.tool_name, "refused")
            raise status_error(error_info(exc)) from None
        outcome = ["cancelled"]
        try:
            await self._stream_checked_host_tool(m, stream, tool, arguments, outcome)
        finally:
            self._count(m.tool_name, outcome[0])

    async def _stream_checked_host_tool(
        self, m: pb.ExecuteToolRequest, stream: grpclib.server.Stream, tool: HostTool, arguments: dict[str, Any], outcome: list[str],
    ) -> None:
        send = self.boundary.run
        chunks_in, chunks_out = trio.open_memory_channel[Any](STREAM_BUFFER)
        failure: list[pb.ErrorInfo] = []

        async def produce() -> None:
            async with chunks_in:
                try:
                    async with contextlib.aclosing(iterate_host_tool(tool, arguments)) as chunks:
                        async for chunk in chunks:  # (closed here: the tool's cleanup ends with the call)
                            await chunks_in.send(chunk)
                except BaseException as exc:
                    if not is_failure(exc, (trio.Cancelled,)):
                        raise
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
                        encoded, failed = encode_batch(batch, index, plane=self.plane)
                        if failed is not None:
                            # the chunks before it first: a cancelled nursery would cancel their send
                            failure.append(error_info(failed))
                            if encoded is not None:
                                await send(stream.send_message(pb.ToolChunkBatch(chunks=encoded)))
                            nursery.cancel_scope.cancel()
                            break
                        index += len(batch)
                        await send(stream.send_message(pb.ToolChunkBatch(chunks=encoded)))
            outcome[0] = "failed" if failure else "completed"
            if failure:
                raise status_error(failure[0])
        if deadline.cancelled_caught:
            outcome[0] = "deadline_exceeded"
            raise status_error(_deadline_error("host tool", m.tool_name))

    def _result(self, value: Any) -> pb.ExecuteToolResponse:
        try:
            return pb.ExecuteToolResponse(result=encode(value, path="result", plane=self.plane))
        except EncodeError as exc:
            return pb.ExecuteToolResponse(error=error_info(exc))


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
