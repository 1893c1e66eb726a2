"""The transport's changes to its libraries' behaviour: h2 formats received frames only when its
logger logs; a worker's connections write once per loop iteration; big messages travel in big
frames, without copies, through windows that widen for them, to and from stock grpclib too."""

from __future__ import annotations

import asyncio
import inspect
import io
import itertools
from typing import Any

import grpclib.client
import grpclib.server
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import pytest
from grpclib.const import Cardinality, Handler
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_bridge._wire import http2, transport
from trio_bridge._wire.generated.trio_bridge import v1 as pb


def _exchange(logger: object) -> tuple[list[hyperframe.frame.Frame], int]:
    """A client's HEADERS and DATA received by an h2 server connection with ``logger``: the
    frames received, and how many times a DATA frame was formatted."""
    reprs = 0
    original = hyperframe.frame.DataFrame.__repr__

    def counting(frame: hyperframe.frame.Frame) -> str:
        nonlocal reprs
        reprs += 1
        return original(frame)

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "w")])
    client.send_data(1, b"\x00\x01" * 5000)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, logger=logger))
    server.initiate_connection()
    received: list[hyperframe.frame.Frame] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hyperframe.frame.DataFrame, "__repr__", counting)
        receive = server._receive_frame

        def recording(frame: hyperframe.frame.Frame) -> list[object]:
            received.append(frame)
            return receive(frame)

        patch.setattr(server, "_receive_frame", recording)
        server.receive_data(client.data_to_send())
    return received, reprs


def test_h2_formats_received_frames_only_for_a_logger_that_logs():
    # The patch's premise, checked on every h2 upgrade: one repr() call in h2.connection, the trace log's.
    source = inspect.getsource(h2.connection)
    assert source.count("repr(") == 1 and 'self.config.logger.trace("Received frame: %s", repr(frame))' in source
    assert vars(h2.connection)["repr"] is http2._DeferredRepr

    frames, reprs = _exchange(None)  # h2's default logger: discards everything
    assert any(isinstance(f, hyperframe.frame.DataFrame) for f in frames) and reprs == 0

    out = io.StringIO()
    frames, reprs = _exchange(h2.config.OutputLogger(out, trace_level=True))
    assert reprs == 1  # formatted once, by the logger, with the same text as before
    data = next(f for f in frames if isinstance(f, hyperframe.frame.DataFrame))
    assert f"h2 (trace): Received frame: {data!r}\n" in out.getvalue()


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info {name}"


def test_writes_within_one_loop_iteration_go_out_as_one():
    async def main() -> None:
        real = _RecordingTransport()
        coalescing = http2.CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"HEADERS")
        coalescing.write(b"")
        coalescing.write(b"DATA")
        coalescing.write(b"TRAILERS")
        assert real.writes == []
        await asyncio.sleep(0)
        assert real.writes == [b"HEADERSDATATRAILERS"]
        coalescing.write(b"GOAWAY")
        coalescing.close()  # what was written before close goes out before it
        assert real.writes == [b"HEADERSDATATRAILERS", b"GOAWAY"] and real.closed
        coalescing.write(b"late")
        await asyncio.sleep(0)  # dropped: the connection is closed, as a closed transport would
        assert real.writes == [b"HEADERSDATATRAILERS", b"GOAWAY"]
        assert coalescing.get_extra_info("peername") == "info peername"

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
        loop = runner.get_loop()
    # A handler finalised after its loop has closed writes at once (it cannot schedule a flush).
    real = _RecordingTransport()
    http2.CoalescingTransport(real, loop).write(b"RST_STREAM")  # type: ignore[arg-type]
    assert real.writes == [b"RST_STREAM"]


# ---- big messages: our channels and servers (fast codec, big frames, no copies, wider windows) ----


class _Echo:
    """A service that answers ExecuteTool with the request's arguments and echoes every Calls
    message back; it keeps the protocol streams it served (to inspect their windows)."""

    def __init__(self) -> None:
        self.streams: list[Any] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/trio_bridge.v1.WorkerService/ExecuteTool": Handler(
                self.execute, Cardinality.UNARY_UNARY, pb.ExecuteToolRequest, pb.ExecuteToolResponse
            ),
            "/trio_bridge.v1.WorkerService/Calls": Handler(self.calls, Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult),
        }

    async def execute(self, stream: grpclib.server.Stream) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(pb.ExecuteToolResponse(result=request.arguments))

    async def calls(self, stream: grpclib.server.Stream) -> None:
        self.streams.append(stream._stream)
        async for message in stream:
            assert message.execute is not None
            reply = pb.ExecuteToolResponse(result=message.execute.arguments)
            await stream.send_message(pb.CallResult(call_id=message.execute.call_id, response=reply))


def _request(call_id: str, size: int) -> pb.ExecuteToolRequest:
    blob = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    arguments = pb.Payload(json=b'{"value":{"\\u0000tb":"b","i":0}}', blobs=[blob, b"", b"tail"])
    return pb.ExecuteToolRequest(tool_name="echo", call_id=call_id, arguments=arguments, timeout_seconds=1.5)


_SIZES = [10, 3 << 20, 100_000, 20 << 20, 70_000, 1 << 20]  # bytes; 20 MiB: more than MAX_WINDOW


async def _exchange_big_messages(path: str, ours: tuple[bool, bool]) -> dict[str, Any]:
    """Big and small messages through a server and a channel, each ours or grpclib's stock one
    (same messages either way); what their connections negotiated."""
    service = _Echo()
    server = transport.new_server([service], "")[0] if ours[0] else grpclib.server.Server([service])
    await server.start(path=path)
    channel = transport.open_channel(f"unix:{path}") if ours[1] else grpclib.client.Channel(path=path)
    try:
        stub = pb.WorkerServiceStub(channel)
        for size in (0, 300_000, 12 << 20):
            request = _request("unary", size)
            assert await stub.execute_tool(request) == pb.ExecuteToolResponse(result=request.arguments)
        async with channel.request(
            "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult
        ) as calls:
            for i, size in enumerate(_SIZES):  # one after the other, and then all at once
                await calls.send_message(pb.CallMessage(execute=_request(f"c{i}", size)))
                result = await calls.recv_message()
                assert result == pb.CallResult(call_id=f"c{i}", response=pb.ExecuteToolResponse(result=_request("", size).arguments))
            for i, size in enumerate(_SIZES):
                await calls.send_message(pb.CallMessage(execute=_request(f"again{i}", size)))
            for i, size in enumerate(_SIZES):
                result = await calls.recv_message()
                assert result is not None and result.call_id == f"again{i}"
                assert result.response == pb.ExecuteToolResponse(result=_request("", size).arguments)
            await calls.end()
            assert await calls.recv_message() is None
        client_h2 = channel._protocol.connection._connection  # type: ignore[union-attr]
        (server_stream,) = service.streams
        return {
            "client_sends": client_h2.max_outbound_frame_size,
            "client_receives": client_h2.max_inbound_frame_size,
            "server_stream": server_stream,
            "server_h2": server_stream._h2_connection,
        }
    finally:
        channel.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("ours", [(True, True), (True, False), (False, True)], ids=["ours", "our-server", "our-channel"])
def test_big_messages_cross_intact_between_ours_and_stock_grpclib(tmp_path: Any, ours: tuple[bool, bool]) -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        seen = runner.run(_exchange_big_messages(str(tmp_path / "s.sock"), ours))
    # Each side of ours advertises FRAME_SIZE; a stock side keeps the protocol's 16 KiB.
    assert seen["client_receives"] == (http2.FRAME_SIZE if ours[1] else 16384)
    assert seen["client_sends"] == (http2.FRAME_SIZE if ours[0] else 16384)
    server_stream, server_h2 = seen["server_stream"], seen["server_h2"]
    assert server_h2.max_inbound_frame_size == (http2.FRAME_SIZE if ours[0] else 16384)
    if ours[0]:
        # The Calls stream read messages bigger than its window: widened to MAX_WINDOW, no further.
        assert isinstance(server_stream, http2.FastStream) and server_stream._window == http2.MAX_WINDOW


def test_a_stream_of_small_messages_keeps_its_window(tmp_path: Any) -> None:
    # Backpressure: a stream's window widens only to read a message bigger than it.
    async def main() -> Any:
        service = _Echo()
        server, _ = transport.new_server([service], "")
        path = str(tmp_path / "s.sock")
        await server.start(path=path)
        channel = transport.open_channel(f"unix:{path}")
        try:
            async with channel.request(
                "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult
            ) as calls:
                for i in range(40):  # 4 MiB in all, in messages of 100 kB
                    await calls.send_message(pb.CallMessage(execute=_request(f"c{i}", 100_000)))
                    assert await calls.recv_message() is not None
                client_stream = calls._stream
                await calls.end()
            (server_stream,) = service.streams
            return client_stream, server_stream
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        streams = runner.run(main())
    for stream in streams:  # the windows their connections' configurations give
        assert isinstance(stream, http2.FastStream)
        assert stream._window == stream._h2_connection.local_settings.initial_window_size < http2.MAX_WINDOW
    client_stream, _ = streams
    assert client_stream._window == transport.STREAM_WINDOW


def _h2_pair(frame_size: int, fast: bool = False) -> tuple[h2.connection.H2Connection, bytes]:
    """An h2 server (receiving through a _FastFrameBuffer if ``fast``) that has agreed
    ``frame_size`` with a stock h2 client, and what the client sends next: requests whose DATA
    frames are big, padded, small and split, with a PING, on two streams."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    if fast:
        server.incoming_buffer = http2.FastFrameBuffer(server=True)
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
    server.increment_flow_control_window(2**30)
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    headers = [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "w")]
    client.send_headers(1, headers)
    client.send_headers(3, headers)
    body = bytes(range(256)) * 4096  # 1 MiB
    client.send_data(1, body[:frame_size])  # big
    client.send_data(3, body[:100_000], pad_length=17)  # big, padded: parsed as h2 does
    client.send_data(1, body[:70_000])
    client.ping(b"12345678")
    client.send_data(1, b"small")
    client.send_data(3, body[:65_536], end_stream=True)
    client.send_data(1, body[:frame_size], end_stream=True)
    return server, client.data_to_send()


def _events(connection: h2.connection.H2Connection, data: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    """What ``connection`` makes of ``data`` received in pieces cut at ``cuts``: DATA merged per
    stream, with its flow-controlled length, in order."""
    events: list[Any] = []
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, stop in itertools.pairwise(points):
        events += connection.receive_data(data[start:stop])
    out: list[tuple[Any, ...]] = []
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            if out and out[-1][0] == "data" and out[-1][1] == event.stream_id:
                _, stream_id, chunk, counted = out.pop()
                out.append(("data", stream_id, chunk + bytes(event.data), counted + event.flow_controlled_length))
            else:
                out.append(("data", event.stream_id, bytes(event.data), event.flow_controlled_length))
        else:
            out.append((type(event).__name__, getattr(event, "stream_id", None)))
    return out


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**7), max_size=12))
def test_the_frame_buffer_gives_h2_the_same_frames_however_the_bytes_arrive(cuts: list[int]) -> None:
    # Big unpadded DATA frames come out in pieces (as received) without copies; the stream
    # carries the same bytes, the same flow-controlled lengths and the same events otherwise.
    stock, sent = _h2_pair(http2.FRAME_SIZE)
    ours, _ = _h2_pair(http2.FRAME_SIZE, fast=True)
    expected = _events(stock, sent, [])
    got = _events(ours, sent, cuts)
    assert len(got) >= 8 and any(e[0] == "PingReceived" for e in got)
    # A big frame arrives as several DataReceived: merged above, the rest is in the same order.
    assert got == expected


def test_the_frame_buffer_refuses_what_h2s_refuses() -> None:
    _, sent = _h2_pair(http2.FRAME_SIZE)
    fast = http2.FastFrameBuffer(server=True)
    fast.max_frame_size = 16384  # the peer sends frames bigger than this side allows
    fast.add_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + sent)
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        list(fast)
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        http2.FastFrameBuffer(server=True).add_data(b"GET / HTTP/1.1\r\n")

