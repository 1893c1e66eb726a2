"""The standard gRPC services on trio-bridge's servers, seen from another gRPC stack (grpcio, a
client compiled from the standard .protos alone): grpc.health.v1 without the pool secret, server
reflection with it; and health turning NOT_SERVING while a worker drains."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from grpclib.client import Channel

from tests.helpers import require
from tests.test_worker_service import _service
from trio_bridge import open_pool
from trio_bridge._wire.generated.grpc.health.v1 import HealthCheckRequest, HealthCheckResponseServingStatus, HealthStub
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import new_server

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standard_services_client.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grpcio_target(address: str) -> str:
    """Our ``unix:@name`` (Linux's abstract namespace) as grpcio names it."""
    if address.startswith("unix:@"):
        return "unix-abstract:" + address.removeprefix("unix:@")
    return address.removeprefix("tcp:")


async def ask_with_grpcio(address: str, secret: str) -> dict:
    import trio

    result = await trio.run_process(
        [sys.executable, CLIENT, grpcio_target(address), secret], capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.mark.real_process
async def test_a_worker_answers_health_checks_and_reflection_from_grpcio():
    async with open_pool("tests.adapters:Echo", size=1) as pool:
        (worker,) = pool.workers()
        seen = await ask_with_grpcio(worker.address, pool._spec.secret)
    assert seen["health "] == "SERVING"  # the whole server, with no secret
    assert seen["health trio_bridge.v1.WorkerService"] == "SERVING"
    assert seen["health trio_bridge.v1.HostService"] == "NOT_FOUND"  # not served there
    assert seen["reflection without secret"] == "UNAUTHENTICATED"
    assert {"trio_bridge.v1.WorkerService", "grpc.health.v1.Health"} <= set(seen["services"])
    assert seen["files"] == ["trio_bridge/v1/bridge.proto"]
    assert {"Calls", "Describe", "ExecuteStreamingTool", "ExecuteTool", "Ping", "Shutdown"} <= set(seen["worker rpcs"])


@pytest.mark.real_process
async def test_the_host_service_answers_health_checks_and_reflection_from_grpcio():
    async with open_pool("tests.adapters:Echo", size=1) as pool:
        seen = await ask_with_grpcio(pool._spec.host_address, pool._spec.secret)
    assert seen["health "] == seen["health trio_bridge.v1.HostService"] == "SERVING"
    assert seen["reflection without secret"] == "UNAUTHENTICATED"
    assert "trio_bridge.v1.HostService" in seen["services"]


def test_a_draining_worker_says_not_serving(tmp_path):
    async def scenario() -> list[int]:
        service = await _service()
        server, status = new_server([service], "")
        service.health = [status]
        path = str(tmp_path / "w.sock")
        await server.start(path=path)
        channel = Channel(path=path)
        try:
            health = HealthStub(channel)
            before = await health.check(HealthCheckRequest(service=""))
            await pb.WorkerServiceStub(channel).shutdown(pb.ShutdownRequest(grace_seconds=5))
            after = await health.check(HealthCheckRequest(service="trio_bridge.v1.WorkerService"))
            return [before.status, after.status]
        finally:
            channel.close()
            server.close()

    assert asyncio.run(scenario()) == [HealthCheckResponseServingStatus.SERVING, HealthCheckResponseServingStatus.NOT_SERVING]


@pytest.mark.real_process
@pytest.mark.parametrize("order", ["first", "last"])
async def test_a_program_using_grpcios_standard_stubs_opens_a_pool_and_checks_its_health(order):
    """grpcio's health and reflection stubs register the standard .protos in protobuf's default
    descriptor pool; ours must not collide with them, whichever is imported first."""
    import trio

    require("grpc_health")
    require("grpc_reflection")
    result = await trio.run_process(
        [sys.executable, "-m", "tests.grpcio_user_program", order], capture_stdout=True, capture_stderr=True,
        check=False, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["SERVING"]


@pytest.mark.real_process
async def test_a_client_of_the_host_service_that_is_not_a_worker_calls_tools_of_a_pool_of_one():
    """Its call_id holds no slot of the pool, so routing its call cannot deadlock (a worker's
    call waiting on the host would hold the pool's only slot)."""
    from trio_bridge._aio import open_boundary
    from trio_bridge._wire.auth import SECRET_METADATA
    from trio_bridge._wire.codec import decode, encode
    from trio_bridge._wire.transport import open_channel

    async with open_pool("tests.adapters:Echo", size=1) as pool, open_boundary() as boundary:
        channel = await boundary.run_sync(open_channel, pool._spec.host_address)  # the loop's, made in its thread
        try:
            stub = pb.HostServiceStub(channel, metadata={SECRET_METADATA: pool._spec.secret})
            request = pb.ExecuteToolRequest(tool_name="add", arguments=encode({"a": 40, "b": 2}), call_id="outside-1")
            reply = await boundary.run(stub.execute_tool(request))
        finally:
            boundary.close_channel(channel)
    assert decode(reply.result) == 42
