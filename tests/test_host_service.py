"""HostService validates every request: bad ones get clear errors, and the host keeps serving."""

from __future__ import annotations

import grpclib.const
import grpclib.exceptions
import pytest
import trio_asyncio

import trio_bridge
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.codec import encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import open_channel

pytestmark = pytest.mark.real_process


async def test_bad_requests_get_clear_errors_and_change_nothing():
    async with trio_bridge.open_pool("tests.state_adapters:Stateful", size=1, max_value_bytes=1000) as pool:
        run = trio_asyncio.aio_as_trio  # raw: grpclib's own errors, untranslated
        channel = open_channel(pool._spec.host_address)
        try:
            anonymous = pb.HostServiceStub(channel)
            with pytest.raises(grpclib.exceptions.GRPCError) as refused:
                await run(anonymous.get_variables(pb.GetVariablesRequest(session_id="x", all=True)))
            assert refused.value.status == grpclib.const.Status.UNAUTHENTICATED

            stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: pool._spec.secret})
            reply = await run(stub.get_variables(pb.GetVariablesRequest(session_id="nope", all=True)))
            assert reply.error.type == "SessionNotFoundError" and "'nope'" in reply.error.message

            async with pool.session() as session:
                await session.register_variable("t", "float", 1.0)
                garbage = pb.Payload(json=b"{not json")
                reply = await run(stub.set_variable(pb.SetVariableRequest(session_id=session.id, name="t", value=garbage)))
                assert reply.error.type == "InvalidArgumentError" and "malformed value" in reply.error.message
                dangling = pb.Payload(json=b'{"\\u0000tb":"b","i":7}')
                reply = await run(stub.set_variable(pb.SetVariableRequest(session_id=session.id, name="t", value=dangling)))
                assert reply.error.type == "InvalidArgumentError"
                big = encode("x" * 5000)
                reply = await run(stub.register_variable(pb.RegisterVariableRequest(session_id=session.id, name="s", type="string", value=big)))
                assert reply.error is not None, reply
                assert reply.error.type == "QuotaExceededError" and "max_value_bytes" in reply.error.message
                reply = await run(stub.set_variables(pb.SetVariablesRequest(session_id=session.id, updates=encode([1, 2]), atomic=True)))
                assert "updates must be a dict" in reply.error.message
                variable = await session.get_variable("t")
                assert (variable.value, variable.version) == (1.0, 0)
                assert await session.list_variables() == ["t"]
                assert await pool.execute("pid") > 0  # the host still serves
        finally:
            channel.close()


async def test_the_callers_deadline_bounds_host_tools_and_routed_calls():
    import trio

    async with trio_bridge.open_pool("tests.adapters:Echo", size=2) as pool:
        cancelled = []

        @pool.host_tool
        async def slow(seconds: float) -> str:
            try:
                await trio.sleep(seconds)
            except trio.Cancelled:
                cancelled.append(True)
                raise
            return "done"
        run = trio_asyncio.aio_as_trio
        channel = open_channel(pool._spec.host_address)
        try:
            stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: pool._spec.secret})
            started = trio.current_time()
            request = pb.ExecuteToolRequest(tool_name="slow", arguments=encode({"seconds": 30}), call_id="c-x", timeout_seconds=0.3)
            reply = await run(stub.execute_host_tool(request))
            assert reply.error.kind == "deadline_exceeded" and "deadline" in reply.error.message
            assert trio.current_time() - started < 5 and cancelled == [True]
            routed = pb.ExecuteToolRequest(
                tool_name="cooperative_sleep", arguments=encode({"seconds": 30}), call_id="c-y", timeout_seconds=0.3
            )
            reply = await run(stub.execute_tool(routed))
            assert reply.error.kind == "deadline_exceeded"
        finally:
            channel.close()
