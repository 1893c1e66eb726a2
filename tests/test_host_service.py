"""HostService in process: the host's side of the contract as a worker (or a third-party client)
sees it, over grpclib's in-memory ``ChannelFor`` on the host's own asyncio boundary, without
starting processes. Every request is validated: bad ones end with the standard gRPC status that
fits and the ErrorInfo in its details, change nothing, and the host keeps serving."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from grpclib.const import Status
from grpclib.testing import ChannelFor

from tests.helpers import rpc_refusal
from trio_bridge._aio import Boundary, TransportError, open_boundary
from trio_bridge._errors import ToolNotFoundError
from trio_bridge._host._host_service import HostService
from trio_bridge._host._router import Route
from trio_bridge._host._tools import ToolRegistry
from trio_bridge._state.backend import MemoryBackend
from trio_bridge._state.sessions import SessionStore
from trio_bridge._wire import errors as wire_errors
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.chunks import decode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import WORKER_METADATA
from trio_bridge._wire.errors import CallFailed
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import open_channel


@dataclass
class _Calls:
    """The pool's calls, as the service needs them: routed calls run ``tools`` here."""

    tools: dict[str, Any] = field(default_factory=dict)
    parked_now: list[str] = field(default_factory=list)
    routes: list[Route | None] = field(default_factory=list)

    @contextlib.contextmanager
    def parked(self, call_id: str) -> Iterator[None]:
        self.parked_now.append(call_id)
        try:
            yield
        finally:
            self.parked_now.remove(call_id)

    async def execute(self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None) -> Any:
        self.routes.append(route)
        if tool not in self.tools:
            raise ToolNotFoundError(tool, sorted(self.tools))
        return await self.tools[tool](**(arguments or {}))


@dataclass
class Host:
    boundary: Boundary
    state: MemoryBackend
    calls: _Calls
    tools: ToolRegistry
    stub: pb.HostServiceStub

    async def __call__(self, rpc: Any) -> Any:
        """Run one stub coroutine on the boundary, as the host's own calls do."""
        return await self.boundary.run(rpc)

    async def refused(self, rpc: Any) -> tuple[Status, pb.ErrorInfo]:
        """Run one stub coroutine (or drain a server stream) that must fail: its status, and
        the ErrorInfo in the status details."""
        return await self.boundary.run(rpc_refusal(rpc))



@contextlib.asynccontextmanager
async def open_host(**limits: Any) -> AsyncIterator[Host]:
    async with open_boundary() as boundary, trio.open_nursery() as nursery:
        state = MemoryBackend(SessionStore(**limits))
        await nursery.start(state.run)
        calls, tools = _Calls(), ToolRegistry()
        service = HostService(
            boundary, state, calls=calls, tools=tools, plane=None,
            heartbeat=lambda message: message.worker_id == "w1", route_for=lambda session_id: Route(session_id, "affinity"),
        )
        channel_for = ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec())
        channel = await boundary.run(channel_for.__aenter__())
        try:
            yield Host(boundary, state, calls, tools, pb.HostServiceStub(channel, metadata={WORKER_METADATA: "w1"}))
        finally:
            await boundary.run(channel_for.__aexit__(None, None, None))
            nursery.cancel_scope.cancel()


async def test_bad_variable_requests_get_clear_errors_and_change_nothing():
    async with open_host(max_value_bytes=1000) as host:
        stub = host.stub
        status, info = await host.refused(stub.get_variables(pb.GetVariablesRequest(session_id="nope", all=True)))
        assert (status, info.type) == (Status.NOT_FOUND, "SessionNotFoundError") and "'nope'" in info.message

        session = (await host.state.create_session(None, ttl=None, metadata=None)).id
        await host.state.register_variable(session, "t", "float", 1.0, constraints=None, metadata=None, source="host")
        garbage = pb.Payload(json=b"{not json")
        status, info = await host.refused(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=garbage)))
        assert (status, info.type) == (Status.INVALID_ARGUMENT, "InvalidArgumentError") and "malformed value" in info.message
        dangling = pb.Payload(json=b'{"\\u0000tb":"b","i":7}')  # a blob index with no blob
        status, info = await host.refused(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=dangling)))
        assert (status, info.type) == (Status.INVALID_ARGUMENT, "InvalidArgumentError")
        big = encode("x" * 5000)
        status, info = await host.refused(
            stub.register_variable(pb.RegisterVariableRequest(session_id=session, name="s", type="string", value=big))
        )
        assert (status, info.type) == (Status.RESOURCE_EXHAUSTED, "QuotaExceededError") and "max_value_bytes" in info.message
        status, info = await host.refused(stub.set_variables(pb.SetVariablesRequest(session_id=session, updates=encode([1, 2]), atomic=True)))
        assert status == Status.INVALID_ARGUMENT and "updates must be a dict" in info.message
        status, info = await host.refused(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode("hot"))))
        assert (status, info.type) == (Status.INVALID_ARGUMENT, "InvalidVariableError")
        status, info = await host.refused(stub.start_optimization(pb.OptimizationRequest(session_id=session, name="t")))
        assert status == Status.INVALID_ARGUMENT and "optimizer_id is required" in info.message
        status, info = await host.refused(stub.get_variable(pb.GetVariablesRequest(session_id=session)))
        assert status == Status.INVALID_ARGUMENT and "needs a name" in info.message

        found, _ = await host.state.get_variables(session, None)
        assert list(found) == ["t"] and (found["t"].value, found["t"].version) == (1.0, 0)


async def test_the_variable_api_a_worker_uses_works_over_the_service():
    async with open_host() as host:
        stub, session = host.stub, (await host.state.create_session("s1", ttl=None, metadata={"team": "a"})).id
        reply = await host(stub.get_session(pb.GetSessionRequest(session_id=session)))
        assert decode(reply.metadata) == {"team": "a"} and reply.variable_count == 0
        reply = await host(stub.register_variable(pb.RegisterVariableRequest(
            session_id=session, name="t", type="float", value=encode(0.5), constraints=encode({"max": 1.0}))))
        assert reply.variables[0].version == 0
        for value in (0.6, 0.7):
            reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(value))))
            assert decode(reply.variables[0].value) == value
        variable = (await host.state.get_variables(session, ["t"]))[0]["t"]
        assert variable.source == "worker:w1"  # writes name the worker that made them

        reply = await host(stub.variable_history(pb.VariableRequest(session_id=session, name="t")))
        assert [decode(e.value) for e in reply.history] == [0.5, 0.6, 0.7]
        reply = await host(stub.rollback_variable(pb.RollbackVariableRequest(session_id=session, name="t", version=0)))
        assert decode(reply.variables[0].value) == 0.5 and reply.variables[0].version == 3

        await host(stub.start_optimization(pb.OptimizationRequest(session_id=session, name="t", optimizer_id="o1")))
        status, info = await host.refused(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(0.9))))
        assert (status, info.type) == (Status.FAILED_PRECONDITION, "VariableLockedError")  # locked: only the optimizer writes
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(0.9), optimizer_id="o1")))
        assert reply.variables[0].version == 4
        await host(stub.stop_optimization(pb.OptimizationRequest(session_id=session, name="t", optimizer_id="o1")))
        status, info = await host.refused(
            stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(0.8), expected_version=3))
        )
        assert (status, info.type) == (Status.ABORTED, "VersionConflictError")  # optimistic concurrency: read, retry

        await host(stub.register_variable(pb.RegisterVariableRequest(session_id=session, name="u", type="integer", value=encode(1))))
        reply = await host(stub.add_dependency(pb.AddDependencyRequest(session_id=session, dependent="u", dependency="t")))
        assert reply.variables[0].depends_on == ["t"]
        reply = await host(stub.list_variables(pb.ListVariablesRequest(session_id=session, pattern="*")))
        assert sorted(v.name for v in reply.variables) == ["t", "u"]
        await host(stub.delete_variable(pb.VariableRequest(session_id=session, name="u")))
        assert [v.name for v in await host.state.list_variables(session, "*")] == ["t"]

        assert (await host(stub.heartbeat(pb.HeartbeatRequest(worker_id="w1")))).known
        assert not (await host(stub.heartbeat(pb.HeartbeatRequest(worker_id="w9")))).known


async def test_a_watch_gets_the_initial_values_then_every_change_in_order():
    async with open_host() as host:
        session = (await host.state.create_session(None, ttl=None, metadata=None)).id
        await host.state.register_variable(session, "n", "integer", 0, constraints=None, metadata=None, source="host")
        request = pb.WatchVariablesRequest(session_id=session, names=["n"], include_initial=True, heartbeat_seconds=0.05)
        seen: list[Any] = []
        async with host.boundary.open_stream(lambda: host.stub.watch_variables(request)) as receive:
            while len(seen) < 6:
                batch = await receive()
                seen.extend(decode(u.new_value) for u in batch.updates)
                if seen == [0]:
                    for n in range(1, 6):
                        await host.state.set_variable(
                            session, "n", n, expected_version=None, source="host", optimizer_id=None, metadata=None
                        )
        assert seen == [0, 1, 2, 3, 4, 5]

        bad = pb.WatchVariablesRequest(session_id="nope", names=["n"])
        status, info = await host.refused(host.stub.watch_variables(bad))
        assert (status, info.type) == (Status.NOT_FOUND, "SessionNotFoundError")


async def test_host_tools_run_with_checked_arguments_and_stream_in_order():
    async with open_host() as host:
        def scale(x: list[float], factor: float = 2.0) -> list[float]:
            return [v * factor for v in x]

        async def count(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

        host.tools.register(scale)
        host.tools.register(count)

        def request(tool: str, **arguments: Any) -> pb.ExecuteToolRequest:
            return pb.ExecuteToolRequest(tool_name=tool, arguments=encode(arguments), call_id=secrets.token_hex(4))

        reply = await host(host.stub.execute_host_tool(request("scale", x=[1.0, 2.5])))
        assert decode(reply.result) == [2.0, 5.0]
        status, info = await host.refused(host.stub.execute_host_tool(request("scale", x=["a"])))
        assert (status, info.type) == (Status.INVALID_ARGUMENT, "InvalidArgumentError") and "'x'[0]" in info.message
        status, info = await host.refused(host.stub.execute_host_tool(request("nope")))
        assert (status, info.kind) == (Status.NOT_FOUND, "tool_not_found") and "scale" in info.available
        status, info = await host.refused(host.stub.execute_host_tool(request("count", n=3)))
        assert status == Status.INVALID_ARGUMENT and "streaming tool" in info.message
        status, info = await host.refused(host.stub.execute_host_tool(request("scale", x=[1.0], factor="big")))
        assert status == Status.INVALID_ARGUMENT
        listed = await host(host.stub.list_host_tools(pb.ListHostToolsRequest()))
        assert sorted(t.name for t in listed.tools) == ["count", "scale"]

        chunks: list[Any] = []
        async with host.boundary.open_stream(lambda: host.stub.execute_streaming_host_tool(request("count", n=300))) as receive:
            with contextlib.suppress(StopAsyncIteration):
                while True:
                    batch = await receive()
                    chunks.extend(decode_batch(batch.chunks))
        assert chunks == list(range(300))

        async def fails_midway(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i
            raise ValueError("ran dry")

        host.tools.register(fails_midway)
        got: list[Any] = []
        with pytest.raises(CallFailed) as failed:
            async with host.boundary.open_stream(lambda: host.stub.execute_streaming_host_tool(request("fails_midway", n=5))) as receive:
                while True:
                    got.extend(decode_batch((await receive()).chunks))
        assert got == list(range(5))  # every chunk before the failure, then the status
        assert (failed.value.info.kind, failed.value.info.type) == ("tool_error", "ValueError")
        assert "ran dry" in failed.value.info.message and "fails_midway" in failed.value.info.traceback
        status, info = await host.refused(host.stub.execute_streaming_host_tool(request("fails_midway", n=2)))
        assert (status, info.type) == (Status.UNKNOWN, "ValueError")
        status, info = await host.refused(host.stub.execute_streaming_host_tool(request("scale", x=[1.0])))
        assert status == Status.INVALID_ARGUMENT and "not a streaming tool" in info.message
        assert host.calls.parked_now == []  # every parked call was released


async def test_the_callers_deadline_bounds_host_tools_and_routed_calls():
    async with open_host() as host:
        cancelled = []

        async def slow(seconds: float) -> str:
            try:
                await trio.sleep(seconds)
            except trio.Cancelled:
                cancelled.append(True)
                raise
            return "done"

        host.tools.register(slow)
        host.calls.tools["slow"] = slow
        started = trio.current_time()
        request = pb.ExecuteToolRequest(tool_name="slow", arguments=encode({"seconds": 30}), call_id="c-x", timeout_seconds=0.2)
        status, info = await host.refused(host.stub.execute_host_tool(request))
        assert (status, info.kind) == (Status.DEADLINE_EXCEEDED, "deadline_exceeded") and "deadline" in info.message
        assert cancelled == [True]
        routed = pb.ExecuteToolRequest(
            tool_name="slow", arguments=encode({"seconds": 30}), call_id="c-y", timeout_seconds=0.2, session_id="s1"
        )
        status, info = await host.refused(host.stub.execute_tool(routed))
        assert (status, info.kind) == (Status.DEADLINE_EXCEEDED, "deadline_exceeded") and cancelled == [True, True]
        assert trio.current_time() - started < 5
        assert [r.session_id if r else None for r in host.calls.routes] == ["s1"]  # in the caller's session
        unknown = pb.ExecuteToolRequest(tool_name="nope", arguments=encode({}), call_id="c-z")
        status, info = await host.refused(host.stub.execute_tool(unknown))
        assert (status, info.kind) == (Status.NOT_FOUND, "tool_not_found")


async def test_requests_without_the_pool_secret_are_refused_and_logged(caplog):
    """The real server (``Boundary.serve``, with its auth), on an abstract socket of this process."""
    caplog.set_level(logging.WARNING, logger="trio_bridge.wire")
    async with open_boundary() as boundary, trio.open_nursery() as nursery:
        state = MemoryBackend()
        await nursery.start(state.run)
        service = HostService(
            boundary, state, calls=_Calls(), tools=ToolRegistry(), plane=None,
            heartbeat=lambda _: False, route_for=lambda s: Route(s, "affinity"),
        )
        address, secret = f"unix:@trio-bridge-test-{secrets.token_hex(6)}", secrets.token_hex(16)
        async with boundary.serve([service], address, secret):
            channel = await boundary.run_sync(open_channel, address)  # the loop's, made in its thread
            try:
                anonymous = pb.HostServiceStub(channel)
                with pytest.raises(TransportError, match="UNAUTHENTICATED"):
                    await boundary.run(anonymous.get_variables(pb.GetVariablesRequest(session_id="x", all=True)))
                wrong = pb.HostServiceStub(channel, metadata={SECRET_METADATA: "guess"})
                with pytest.raises(TransportError, match="UNAUTHENTICATED"):
                    await boundary.run(wrong.heartbeat(pb.HeartbeatRequest(worker_id="w")))
                stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: secret})
                with pytest.raises(CallFailed) as refused:  # through the real codec of the status details
                    await boundary.run(stub.get_variables(pb.GetVariablesRequest(session_id="x", all=True)))
                assert refused.value.info.type == "SessionNotFoundError"
                refusals = [r.getMessage() for r in caplog.records if "missing or wrong secret" in r.getMessage()]
                assert len(refusals) == 1 and "GetVariables" in refusals[0]  # one line: the second is held back
            finally:
                boundary.close_channel(channel)
        nursery.cancel_scope.cancel()


def test_every_rpc_of_the_proto_is_served_by_exactly_one_area():
    """The service is made of areas (members, tools, state): together they serve each RPC of
    the .proto once, and the wire checks wrap every one of them (no generated UNIMPLEMENTED)."""
    service = HostService(
        object(), MemoryBackend(), calls=_Calls(), tools=ToolRegistry(), plane=None,  # type: ignore[arg-type]
        heartbeat=lambda _: False, route_for=lambda s: Route(s, "affinity"),
    )
    generated = pb.HostServiceBase().__mapping__()
    served = service.__mapping__()
    assert set(served) == set(generated)
    by_area = [set(area.__mapping__()) for area in service.areas]
    assert sum(len(paths) for paths in by_area) == len(generated)  # none served twice
    for path, handler in served.items():
        assert handler.func.__qualname__ == "with_caller.<locals>.handler", path
        assert (handler.cardinality, handler.request_type, handler.reply_type) == (
            generated[path].cardinality, generated[path].request_type, generated[path].reply_type
        )
