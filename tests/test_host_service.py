"""HostService in process: the host's side of the contract as a worker (or a third-party client)
sees it, over grpclib's in-memory ``ChannelFor`` on the host's own trio-asyncio boundary, without
starting processes. Every request is validated: bad ones get clear in-band errors, change nothing,
and the host keeps serving."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from grpclib.testing import ChannelFor

from trio_bridge._aio import Boundary, TransportError, open_boundary
from trio_bridge._errors import ToolNotFoundError
from trio_bridge._host._host_service import HostService
from trio_bridge._host._router import Route
from trio_bridge._host._tools import ToolRegistry
from trio_bridge._state.backend import MemoryBackend
from trio_bridge._state.sessions import SessionStore
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.chunks import decode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import WORKER_METADATA
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
        channel_for = ChannelFor([service])
        channel = await boundary.run(channel_for.__aenter__())
        try:
            yield Host(boundary, state, calls, tools, pb.HostServiceStub(channel, metadata={WORKER_METADATA: "w1"}))
        finally:
            await boundary.run(channel_for.__aexit__(None, None, None))
            nursery.cancel_scope.cancel()


async def test_bad_variable_requests_get_clear_errors_and_change_nothing():
    async with open_host(max_value_bytes=1000) as host:
        stub = host.stub
        reply = await host(stub.get_variables(pb.GetVariablesRequest(session_id="nope", all=True)))
        assert reply.error.type == "SessionNotFoundError" and "'nope'" in reply.error.message

        session = (await host.state.create_session(None, ttl=None, metadata=None)).id
        await host.state.register_variable(session, "t", "float", 1.0, constraints=None, metadata=None, source="host")
        garbage = pb.Payload(json=b"{not json")
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=garbage)))
        assert reply.error.type == "InvalidArgumentError" and "malformed value" in reply.error.message
        dangling = pb.Payload(json=b'{"\\u0000tb":"b","i":7}')  # a blob index with no blob
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=dangling)))
        assert reply.error.type == "InvalidArgumentError"
        big = encode("x" * 5000)
        reply = await host(stub.register_variable(pb.RegisterVariableRequest(session_id=session, name="s", type="string", value=big)))
        assert reply.error.type == "QuotaExceededError" and "max_value_bytes" in reply.error.message
        reply = await host(stub.set_variables(pb.SetVariablesRequest(session_id=session, updates=encode([1, 2]), atomic=True)))
        assert "updates must be a dict" in reply.error.message
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode("hot"))))
        assert reply.error.type == "InvalidVariableError"
        reply = await host(stub.start_optimization(pb.OptimizationRequest(session_id=session, name="t")))
        assert "optimizer_id is required" in reply.error.message
        reply = await host(stub.get_variable(pb.GetVariablesRequest(session_id=session)))
        assert "needs a name" in reply.error.message

        found, _ = await host.state.get_variables(session, None)
        assert list(found) == ["t"] and (found["t"].value, found["t"].version) == (1.0, 0)


async def test_the_variable_api_a_worker_uses_works_over_the_service():
    async with open_host() as host:
        stub, session = host.stub, (await host.state.create_session("s1", ttl=None, metadata={"team": "a"})).id
        reply = await host(stub.get_session(pb.GetSessionRequest(session_id=session)))
        assert decode(reply.metadata) == {"team": "a"} and reply.variable_count == 0
        reply = await host(stub.register_variable(pb.RegisterVariableRequest(
            session_id=session, name="t", type="float", value=encode(0.5), constraints=encode({"max": 1.0}))))
        assert reply.error is None and reply.variables[0].version == 0
        for value in (0.6, 0.7):
            reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(value))))
            assert reply.error is None
        variable = (await host.state.get_variables(session, ["t"]))[0]["t"]
        assert variable.source == "worker:w1"  # writes name the worker that made them

        reply = await host(stub.variable_history(pb.VariableRequest(session_id=session, name="t")))
        assert [decode(e.value) for e in reply.history] == [0.5, 0.6, 0.7]
        reply = await host(stub.rollback_variable(pb.RollbackVariableRequest(session_id=session, name="t", version=0)))
        assert decode(reply.variables[0].value) == 0.5 and reply.variables[0].version == 3

        reply = await host(stub.start_optimization(pb.OptimizationRequest(session_id=session, name="t", optimizer_id="o1")))
        assert reply.error is None
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(0.9))))
        assert reply.error.type == "VariableLockedError"  # locked: only the optimizer writes
        reply = await host(stub.set_variable(pb.SetVariableRequest(session_id=session, name="t", value=encode(0.9), optimizer_id="o1")))
        assert reply.error is None
        reply = await host(stub.stop_optimization(pb.OptimizationRequest(session_id=session, name="t", optimizer_id="o1")))
        assert reply.error is None

        await host(stub.register_variable(pb.RegisterVariableRequest(session_id=session, name="u", type="integer", value=encode(1))))
        reply = await host(stub.add_dependency(pb.AddDependencyRequest(session_id=session, dependent="u", dependency="t")))
        assert reply.error is None
        reply = await host(stub.list_variables(pb.ListVariablesRequest(session_id=session, pattern="*")))
        assert sorted(v.name for v in reply.variables) == ["t", "u"]
        reply = await host(stub.delete_variable(pb.VariableRequest(session_id=session, name="u")))
        assert reply.error is None
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
                if batch.error is not None:
                    raise AssertionError(batch.error)
                seen.extend(decode(u.new_value) for u in batch.updates)
                if seen == [0]:
                    for n in range(1, 6):
                        await host.state.set_variable(
                            session, "n", n, expected_version=None, source="host", optimizer_id=None, metadata=None
                        )
        assert seen == [0, 1, 2, 3, 4, 5]

        bad = pb.WatchVariablesRequest(session_id="nope", names=["n"])
        async with host.boundary.open_stream(lambda: host.stub.watch_variables(bad)) as receive:
            assert (await receive()).error.type == "SessionNotFoundError"


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
        reply = await host(host.stub.execute_host_tool(request("scale", x=["a"])))
        assert reply.error.type == "InvalidArgumentError" and "'x'[0]" in reply.error.message
        reply = await host(host.stub.execute_host_tool(request("nope")))
        assert reply.error.type == "ToolNotFoundError" and "scale" in reply.error.message
        reply = await host(host.stub.execute_host_tool(request("count", n=3)))
        assert "streaming tool" in reply.error.message
        listed = await host(host.stub.list_host_tools(pb.ListHostToolsRequest()))
        assert sorted(t.name for t in listed.tools) == ["count", "scale"]

        chunks: list[Any] = []
        async with host.boundary.open_stream(lambda: host.stub.execute_streaming_host_tool(request("count", n=300))) as receive:
            with contextlib.suppress(StopAsyncIteration):
                while True:
                    batch = await receive()
                    assert batch.error is None
                    chunks.extend(decode_batch(batch.chunks))
        assert chunks == list(range(300))
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
        reply = await host(host.stub.execute_host_tool(request))
        assert reply.error.kind == "deadline_exceeded" and "deadline" in reply.error.message
        assert cancelled == [True]
        routed = pb.ExecuteToolRequest(
            tool_name="slow", arguments=encode({"seconds": 30}), call_id="c-y", timeout_seconds=0.2, session_id="s1"
        )
        reply = await host(host.stub.execute_tool(routed))
        assert reply.error.kind == "deadline_exceeded" and cancelled == [True, True]
        assert trio.current_time() - started < 5
        assert [r.session_id if r else None for r in host.calls.routes] == ["s1"]  # in the caller's session
        unknown = pb.ExecuteToolRequest(tool_name="nope", arguments=encode({}), call_id="c-z")
        assert (await host(host.stub.execute_tool(unknown))).error.type == "ToolNotFoundError"


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
            channel = open_channel(address)
            try:
                anonymous = pb.HostServiceStub(channel)
                with pytest.raises(TransportError, match="UNAUTHENTICATED"):
                    await boundary.run(anonymous.get_variables(pb.GetVariablesRequest(session_id="x", all=True)))
                wrong = pb.HostServiceStub(channel, metadata={SECRET_METADATA: "guess"})
                with pytest.raises(TransportError, match="UNAUTHENTICATED"):
                    await boundary.run(wrong.heartbeat(pb.HeartbeatRequest(worker_id="w")))
                stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: secret})
                reply = await boundary.run(stub.get_variables(pb.GetVariablesRequest(session_id="x", all=True)))
                assert reply.error.type == "SessionNotFoundError"
                refusals = [r.getMessage() for r in caplog.records if "missing or wrong secret" in r.getMessage()]
                assert len(refusals) == 1 and "GetVariables" in refusals[0]  # one line: the second is held back
            finally:
                channel.close()
        nursery.cancel_scope.cancel()
