"""The worker's side of the call stream (``WorkerService.Calls``) over our real HTTP/2 server, in
process, with the wire's ``worker_calls`` fast path (``_wire/direct_stream.py``) on and off: each
scenario must see the same thing either way."""

from __future__ import annotations

import asyncio
import logging

import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from tests.adapters import Echo
from trio_bridge._wire import direct_stream, overrides
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import new_server
from trio_bridge.worker import _call_stream
from trio_bridge.worker._server import WorkerService

_CALLS = "/trio_bridge.v1.WorkerService/Calls"


def _request(tool: str, call_id: str, **arguments: object) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(tool_name=tool, arguments=encode(arguments, plane=None), call_id=call_id)


class _RawCodec(ProtoCodec):
    """A client codec that sends bytes as they are (a broken or hostile client)."""

    def encode(self, message, message_type):
        return message if isinstance(message, bytes) else super().encode(message, message_type)


@pytest.fixture(params=[True, False], ids=["direct", "grpclib"])
def direct(request, monkeypatch) -> list[direct_stream.DirectStream]:
    """Whether the worker takes its call stream's messages itself; the DirectStreams it made."""
    made: list[direct_stream.DirectStream] = []

    class Recorded(direct_stream.DirectStream):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(overrides, "WORKER_CALLS", request.param and overrides.FAST_PATHS["worker_calls"].on)
    monkeypatch.setattr(_call_stream, "DirectStream", Recorded)
    return made


def _serve(tmp_path, scenario, *, window: int | None = None, codec=None, marker_dir=None):
    """Run ``scenario(service, stream)`` on a call stream to a worker service on a Unix socket;
    ``window``: the client's stream and connection receive windows (bytes)."""

    async def main():
        adapter = Echo()
        adapter.setup()
        adapter.marker_dir = marker_dir and str(marker_dir)
        service = WorkerService("tests.adapters:Echo", adapter, concurrency=4)
        server, _ = new_server([service], "", coalesce_writes=True)
        path = str(tmp_path / "w.sock")
        await server.start(path=path)
        config = None if window is None else Configuration(http2_stream_window_size=window, http2_connection_window_size=window)
        channel = Channel(path=path, codec=codec or ProtoCodec(), config=config)
        try:
            async with channel.request(_CALLS, Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult) as stream:
                await stream.send_request()
                return await asyncio.wait_for(scenario(service, stream), 30)
        finally:
            channel.close()
            server.close()
            service.executor.shutdown(wait=False)

    with asyncio.Runner() as runner:
        return runner.run(main())


def test_calls_run_and_a_cancel_by_call_id_reaches_the_tool(tmp_path, direct):
    async def scenario(service, stream):
        await stream.send_message(pb.CallMessage(execute=_request("async_sleep", "s1", seconds=60)))
        await stream.send_message(pb.CallMessage(execute=_request("cooperative_sleep", "s2", seconds=60)))
        for i in range(20):
            await stream.send_message(pb.CallMessage(execute=_request("add", f"a{i}", a=i)))
        results = {}
        for _ in range(20):
            result = await stream.recv_message()
            results[result.call_id] = decode(result.response.result, plane=None)
        assert results == {f"a{i}": i + 2 for i in range(20)}
        contexts = [service.active["s1"], service.active["s2"]]
        await stream.send_message(pb.CallMessage(cancel="s1"))
        await stream.send_message(pb.CallMessage(cancel="s2"))
        while not all(ctx.cancelled for ctx in contexts):
            await asyncio.sleep(0.005)
        while service.active:  # the async tool was cancelled, the sync one returned early
            await asyncio.sleep(0.005)
        await stream.send_message(pb.CallMessage(execute=_request("add", "last", a=5)))
        result = await stream.recv_message()
        await stream.end()
        assert await stream.recv_message() is None
        return result.call_id, decode(result.response.result, plane=None)

    assert _serve(tmp_path, scenario, marker_dir=tmp_path) == ("last", 7)
    marks = {p.name.split(".")[0]: p.read_text() for p in tmp_path.glob("*sleep.*")}
    assert marks == {"async_sleep": "cancelled", "cooperative_sleep": "cancelled"}
    assert len(direct) == (1 if overrides.WORKER_CALLS else 0)


def test_a_call_still_running_when_the_host_ends_its_side_is_answered(tmp_path, direct):
    big = b"x" * 300_000  # its message is read by grpclib's path, the end comes right after it

    async def scenario(service, stream):
        await stream.send_message(pb.CallMessage(execute=_request("async_sleep", "s1", seconds=0.2)))
        await stream.send_message(pb.CallMessage(execute=_request("echo", "e1", value=big)), end=True)
        results = {}
        for _ in range(2):
            result = await stream.recv_message()
            results[result.call_id] = decode(result.response.result, plane=None)
        assert await stream.recv_message() is None
        return results

    assert _serve(tmp_path, scenario) == {"s1": 0.2, "e1": big}


@pytest.mark.parametrize("size", [200_000, 3_000_000])  # bytes: split over frames, then one grpclib reads
def test_requests_and_replies_bigger_than_the_windows_arrive_intact(tmp_path, direct, size):
    value = bytes(range(256)) * (size // 256)

    async def scenario(service, stream):
        for i in range(3):
            await stream.send_message(pb.CallMessage(execute=_request("echo", f"e{i}", value=value[i:])))
        await stream.send_message(pb.CallMessage(execute=_request("add", "a", a=1)))
        results = {}
        for _ in range(4):
            result = await stream.recv_message()
            results[result.call_id] = decode(result.response.result, plane=None)
        await stream.end()
        return results

    results = _serve(tmp_path, scenario, window=65_535)  # the client's windows: smaller than a reply
    assert results == {"e0": value, "e1": value[1:], "e2": value[2:], "a": 3}


def test_a_malformed_message_ends_the_stream_with_invalid_argument(tmp_path, direct, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge.wire")

    answered = []

    async def scenario(service, stream):
        await stream.send_message(pb.CallMessage(execute=_request("add", "a", a=1)))
        answered.append(decode((await stream.recv_message()).response.result, plane=None))
        await stream.send_message(b"\x0a\xff\xff\xff\xff\xff")  # a field longer than the message
        await stream.recv_message()

    with pytest.raises(GRPCError) as raised:
        _serve(tmp_path, scenario, codec=_RawCodec())
    assert answered == [3]
    assert raised.value.status is Status.INVALID_ARGUMENT and "malformed CallMessage" in str(raised.value.message)


def test_a_lost_connection_cancels_the_calls_and_logs_no_error(tmp_path, direct, caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        adapter = Echo()
        adapter.setup()
        adapter.marker_dir = str(tmp_path)
        service = WorkerService("tests.adapters:Echo", adapter, concurrency=4)
        server, _ = new_server([service], "", coalesce_writes=True)
        await server.start(path=str(tmp_path / "w.sock"))
        channel = Channel(path=str(tmp_path / "w.sock"))
        try:
            async with channel.request(_CALLS, Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult) as stream:
                await stream.send_request()
                await stream.send_message(pb.CallMessage(execute=_request("async_sleep", "s1", seconds=60)))
                await stream.send_message(pb.CallMessage(execute=_request("add", "a", a=1)))
                assert (await stream.recv_message()).call_id == "a"
                assert "s1" in service.active
                channel.close()  # the host is gone
                async with asyncio.timeout(10):
                    while service.active:
                        await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # whatever the handler would log, it has
        finally:
            server.close()
            service.executor.shutdown(wait=False)

    with asyncio.Runner() as runner:
        runner.run(main())
    assert (tmp_path / next(p.name for p in tmp_path.glob("async_sleep.*"))).read_text() == "cancelled"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_the_stock_switch_turns_the_direct_path_off():
    paths = overrides._decide("worker_calls")
    assert [name for name, path in paths.items() if not path.on] == ["worker_calls"]
    assert paths["worker_calls"].why == f"{overrides.STOCK_WIRE_ENV}=worker_calls"
    paths = overrides._decide("http2")  # it reads and writes through our HTTP/2 protocol's streams
    assert not paths["worker_calls"].on and "it needs the http2 fast path" in paths["worker_calls"].why
    assert not overrides._decide("1")["worker_calls"].on
