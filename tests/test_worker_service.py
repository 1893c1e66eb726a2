"""The worker's service in process (grpclib's in-memory ChannelFor): the contract as a
third-party client sees it, without starting processes."""

from __future__ import annotations

import asyncio
import logging
import time

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from tests.adapters import Echo
from tests.helpers import rpc_refusal
from trio_bridge._wire import errors as wire_errors
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import new_server
from trio_bridge.worker._server import WorkerService


def _request(tool: str, call_id: str, **arguments: object) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(tool_name=tool, arguments=encode(arguments), call_id=call_id)


def _run(coro):
    """A plain asyncio loop, as in a worker."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)


async def _service() -> WorkerService:
    adapter = Echo()
    adapter.setup()
    return WorkerService("tests.adapters:Echo", adapter, concurrency=4)


def test_empty_and_running_call_ids_are_refused_and_shutdown_waits_for_the_running_call():
    async def scenario() -> None:
        service = await _service()
        async with ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec()) as channel:
            stub = pb.WorkerServiceStub(channel)
            status, info = await rpc_refusal(stub.execute_tool(_request("add", "", a=1)))
            assert (status, info.kind) == (Status.INVALID_ARGUMENT, wire_errors.INVALID_ARGUMENT)
            assert "call_id is empty" in info.message

            started = time.monotonic()
            first = asyncio.create_task(stub.execute_tool(_request("async_sleep", "c1", seconds=0.5)))
            while "c1" not in service.active:
                await asyncio.sleep(0.01)
            status, info = await rpc_refusal(stub.execute_tool(_request("add", "c1", a=1)))
            assert (status, info.kind) == (Status.INVALID_ARGUMENT, wire_errors.INVALID_ARGUMENT)
            assert "already running" in info.message

            # The refused duplicate must not have displaced the running call: the drain waits for it.
            await stub.shutdown(pb.ShutdownRequest(grace_seconds=5))
            await asyncio.wait_for(service.stopped.wait(), 5)
            assert time.monotonic() - started >= 0.45  # stopped only once the running call was over
            assert decode((await asyncio.wait_for(first, 5)).result) == 0.5

    _run(scenario())


class _RawCodec(ProtoCodec):
    """A client codec that sends bytes as they are (a broken or hostile client)."""

    def encode(self, message, message_type):
        return message if isinstance(message, bytes) else super().encode(message, message_type)


def test_malformed_requests_get_invalid_argument_and_one_short_log_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge.wire")

    async def scenario() -> list[GRPCError]:
        service = await _service()
        server, _ = new_server([service], "")
        path = str(tmp_path / "w.sock")
        await server.start(path=path)
        channel = Channel(path=path, codec=_RawCodec())
        errors = []
        try:
            for _ in range(20):
                try:
                    async with channel.request(
                        "/trio_bridge.v1.WorkerService/ExecuteTool", Cardinality.UNARY_UNARY, bytes, pb.ExecuteToolResponse
                    ) as stream:
                        await stream.send_message(b"\x08" + b"\xff" * 12, end=True)
                        await stream.recv_message()
                except GRPCError as exc:
                    errors.append(exc)
            ok = await pb.WorkerServiceStub(Channel(path=path)).execute_tool(_request("add", "c1", a=1))
            assert decode(ok.result) == 3  # the worker is unharmed
        finally:
            channel.close()
            server.close()
        return errors

    errors = _run(scenario())
    assert len(errors) == 20 and all(e.status is Status.INVALID_ARGUMENT for e in errors)
    assert "malformed ExecuteToolRequest" in str(errors[0].message)
    lines = [r for r in caplog.records if r.name == "trio_bridge.wire"]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
