"""The transport's changes to its libraries' behaviour: h2 formats received frames only when its
logger logs; a worker's connections write once per loop iteration; big messages travel in big
frames, without copies, through windows that widen for them, to and from stock grpclib too."""

from __future__ import annotations

import asyncio
import gc
import inspect
import io
import itertools
import socket
from typing import Any

import grpclib.client
import grpclib.exceptions
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

from tests.helpers import require
from trio_bridge._wire import http2, transport
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tls import TLSConfig


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
    message back; it keeps the protocol streams it served (to inspect their windows) and the
    messages it received."""

    def __init__(self) -> None:
        self.streams: list[Any] = []
        self.received: list[Any] = []

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
        self.streams.append(stream._stream)
        self.received.append(request)
        await stream.send_message(pb.ExecuteToolResponse(result=request.arguments))

    async def calls(self, stream: grpclib.server.Stream) -> None:
        self.streams.append(stream._stream)
        async for message in stream:
            assert message.execute is not None
            self.received.append(message)
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
        *_, server_stream = service.streams  # the Calls stream
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
    return _merged(events)


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
    received = http2.FastFrameBuffer(server=True)  # through the buffers it hands out, the same
    received.receive_buffer()[:16] = b"GET / HTTP/1.1\r\n"
    with pytest.raises(h2.exceptions.ProtocolError, match="preamble"):
        received.received(16)


def test_a_server_hangs_up_on_what_is_not_http2(tmp_path: Any) -> None:
    async def main() -> bytes:
        server, _ = transport.new_server([_Echo()], "")
        path = str(tmp_path / "s.sock")
        await server.start(path=path)
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
            return await asyncio.wait_for(reader.read(), 5)  # until the server closes the connection
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    answer = _on_loop("asyncio", main)
    assert answer.startswith(b"\x00\x00")  # its SETTINGS frame, then nothing: closed



@pytest.mark.parametrize("abstract", [True, False])
def test_a_peer_that_closes_each_connection_at_once_fails_calls_with_a_transport_error(tmp_path: Any, abstract: bool) -> None:
    # grpclib's Channel.__connect__ returned a connection already lost, and the call then failed
    # with AttributeError (seen when a worker exited as the pool shut it down).
    path = f"\0trio-bridge-test-{id(tmp_path)}" if abstract else str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)

    async def main() -> list[type[BaseException]]:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)

        async def hang_up() -> None:
            while True:
                accepted, _ = await loop.sock_accept(listener)
                accepted.close()

        closer = asyncio.ensure_future(hang_up())
        kinds = []
        try:
            for _ in range(100):
                channel = transport.open_channel(f"unix:{path}")
                try:
                    await pb.WorkerServiceStub(channel).ping(pb.PingRequest())
                except Exception as exc:  # the kind is what is checked
                    kinds.append(type(exc))
                finally:
                    channel.close()
        finally:
            closer.cancel()
        return kinds

    try:
        kinds = _on_loop("uvloop", main)
    finally:
        listener.close()
    assert len(kinds) == 100
    assert all(issubclass(kind, (OSError, grpclib.exceptions.StreamTerminatedError)) for kind in kinds), set(kinds)


# ---- receiving: into buffers the frame buffer chooses (FastH2Protocol.get_buffer) ----


def _received_through_buffers(
    frames: http2.FastFrameBuffer, connection: h2.connection.H2Connection, data: bytes, sizes: list[int]
) -> list[Any]:
    """What ``connection`` makes of ``data`` received the way FastH2Protocol receives it: into
    ``frames.receive_buffer()``, at most ``sizes[i]`` bytes at a time (cycled), as a socket would."""
    events: list[Any] = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos == len(data):
            return events
        landing = frames.receive_buffer()
        assert len(landing) > 0
        size = min(size, len(landing), len(data) - pos)
        landing[:size] = data[pos : pos + size]
        pos += size
        frames.received(size)
        events += connection.receive_data(b"")
    raise AssertionError("unreachable")


def _merged(events: list[Any]) -> list[tuple[Any, ...]]:
    """``events`` as in _events: DATA merged per stream (``bytes``), with flow-controlled lengths."""
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


_READS = st.one_of(st.integers(1, 20), st.integers(1, 300_000), st.sampled_from([8, 9, 10, 65_535, 65_536, 1 << 20]))


@settings(max_examples=40, deadline=None)
@given(
    # how much each read gets (cycled; one big among them keeps the test quick)
    sizes=st.tuples(st.lists(_READS, max_size=6), st.integers(65_536, 1 << 20)).map(lambda t: [*t[0], t[1]]),
    reserved=st.one_of(st.none(), st.integers(0, (2 << 20) + 80_000)),
)
def test_received_into_chosen_buffers_h2_sees_the_same_frames(sizes: list[int], reserved: int | None) -> None:
    # Bytes between big DATA bodies land in a reused arena, bodies in fresh memory or in their
    # stream's reservation (two streams here); whatever the split, h2 sees the same data, flow
    # control and events, and no DATA it was given changes as later bytes arrive (events are
    # compared at the end).
    stock, sent = _h2_pair(http2.FRAME_SIZE)
    ours, _ = _h2_pair(http2.FRAME_SIZE, fast=True)
    frames = ours.incoming_buffer
    assert isinstance(frames, http2.FastFrameBuffer)
    buffer = bytearray(reserved or 0)
    reservation = frames.reserve(1, memoryview(buffer)) if reserved is not None else None
    other = bytearray(100_000 + 65_536)  # stream 3's DATA, all of it, frames interleaved with 1's
    kept = frames.reserve(3, memoryview(other))  # (a reservation lasts as long as its reader keeps it)
    events = _received_through_buffers(frames, ours, sent, sizes)
    expected = _merged(stock.receive_data(sent))
    assert _merged(events) == expected
    assert bytes(other) == b"".join(e[2] for e in expected if e[:2] == ("data", 3)) and kept.pos == len(other)
    # Stream 1's DATA went into its reservation in order, as far as it fitted, and nowhere else.
    stream_1 = [event.data for event in events if isinstance(event, h2.events.DataReceived) and event.stream_id == 1]
    placed = [data for data in stream_1 if isinstance(data, memoryview) and data.obj is buffer]
    assert stream_1[: len(placed)] == placed
    if reservation is None or reserved is None:
        assert not placed
        return
    size = sum(map(len, placed))
    assert b"".join(placed) == bytes(buffer[:size])
    assert reservation.pos in (size, reserved)  # what it placed, or closed
    assert len(placed) == len(stream_1) or size + len(stream_1[len(placed)]) > reserved  # the next did not fit


def test_a_frame_header_alone_after_a_big_body_and_the_arena_reused() -> None:
    # After a big DATA body (its stream's next frame is likely another), only the next 9 bytes
    # are read: no part of a big body is received into the arena and copied out of it.
    _, sent = _h2_pair(http2.FRAME_SIZE)
    ours, _ = _h2_pair(http2.FRAME_SIZE, fast=True)
    frames = ours.incoming_buffer
    assert isinstance(frames, http2.FastFrameBuffer)
    landings = []
    original = frames.receive_buffer

    def recording() -> memoryview:
        landings.append(original())
        return landings[-1]

    frames.receive_buffer = recording  # type: ignore[method-assign]
    _received_through_buffers(frames, ours, sent, [1 << 30])
    arena = [landing for landing in landings if landing.obj is frames._arena]
    assert any(len(landing) == 9 for landing in arena)
    assert all(landing.obj is frames._arena or len(landing) <= http2.FRAME_SIZE for landing in landings)
    assert len({id(landing.obj) for landing in arena}) == 1  # one arena, reused


def _on_loop(loop: str, main: Any) -> Any:
    """``main()`` run on asyncio's selector loop, uvloop's (the workers'), or the host's boundary
    (its loop in a thread of its own, reached from Trio)."""
    if loop == "boundary":
        import trio

        from trio_bridge._aio import open_boundary

        async def in_trio() -> Any:
            async with open_boundary() as boundary:
                return await boundary.run(main())

        return trio.run(in_trio)
    factory = asyncio.SelectorEventLoop if loop == "asyncio" else require("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _in_place(blob: Any) -> bool:
    """A blob that is a view of the buffer its message was received into (not a copy of its own)."""
    owner: Any = blob.obj if isinstance(blob, memoryview) else None
    return owner is not None and not blob.readonly and owner.nbytes > len(blob)


@pytest.mark.parametrize("kind", ["unix", "tcp", "tls"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "boundary"])
def test_every_loop_and_transport_receives_big_messages_into_their_own_buffers(tmp_path: Any, loop: str, kind: str) -> None:
    # Both sides read through FastH2Protocol.get_buffer on every loop and transport we use (a
    # uvloop protocol that is an asyncio.Protocol would not be asked); a big blob is then a view
    # of the buffer its message was received into, on either side, pipelined or not.
    tls = None
    if kind == "tls":  # mutual, as between a host and its remote workers
        trustme = require("trustme")

        ca = trustme.CA()
        ca.cert_pem.write_to_path(tmp_path / "ca.pem")
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
        leaf.private_key_pem.write_to_path(tmp_path / "key.pem")
        tls = TLSConfig(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "ca.pem"))

    async def main() -> None:
        service = _Echo()
        server, _ = transport.new_server([service], "")
        if kind == "unix":
            path = str(tmp_path / "s.sock")
            await server.start(path=path)
            address = f"unix:{path}"
        else:
            await server.start("127.0.0.1", 0, ssl=tls.server_context() if tls else None)
            address = f"tcp:127.0.0.1:{server._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        channel = transport.open_channel(address, ssl=tls.client_context() if tls else None)
        try:
            request = _request("unary", 12 << 20)
            reply = await pb.WorkerServiceStub(channel).execute_tool(request)
            assert reply == pb.ExecuteToolResponse(result=request.arguments)
            assert reply.result is not None and _in_place(reply.result.blobs[0])
            (received,) = service.received
            assert _in_place(received.arguments.blobs[0])
            # streams side by side: their frames interleave, each into its own message's buffer
            requests = [_request(f"p{i}", (2 + i) << 20) for i in range(3)]
            replies = await asyncio.gather(*map(pb.WorkerServiceStub(channel).execute_tool, requests))
            assert replies == [pb.ExecuteToolResponse(result=r.arguments) for r in requests]
            async with channel.request(
                "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult
            ) as calls:
                sizes = [3 << 20, 10, 2 << 20, 300_000]
                for i, size in enumerate(sizes):
                    await calls.send_message(pb.CallMessage(execute=_request(f"c{i}", size)))
                for i, size in enumerate(sizes):
                    result = await calls.recv_message()
                    assert result == pb.CallResult(call_id=f"c{i}", response=pb.ExecuteToolResponse(result=_request("", size).arguments))
                await calls.end()
            for frames in (channel._protocol.connection._connection.incoming_buffer, service.streams[0]._h2_connection.incoming_buffer):  # type: ignore[union-attr]
                assert isinstance(frames, http2.FastFrameBuffer) and frames._arena is not None  # get_buffer was called
                assert not frames._reservations
            if kind == "unix":  # room for a big frame in each direction (as far as the system allows)
                with open("/proc/sys/net/core/wmem_max") as f:
                    allowed = int(f.read())
                for sock in (channel._protocol.connection._transport.get_extra_info("socket"), service.streams[0]._transport.get_extra_info("socket")):  # type: ignore[union-attr]
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * min(http2.FRAME_SIZE, allowed)
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    _on_loop(loop, main)


def test_a_connection_lost_in_the_middle_of_a_big_message_leaves_nothing_behind(tmp_path: Any) -> None:
    # A peer that goes away halfway through a big message that is being received into its own
    # buffer: the reader ends at once, as with grpclib's buffer, and no reservation is left.
    async def main() -> tuple[Any, http2.FastFrameBuffer]:
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        streams: list[Any] = []

        async def calls(stream: grpclib.server.Stream) -> None:
            streams.append(stream._stream)
            try:
                await stream.recv_message()
            except BaseException as exc:
                outcome.set_result(type(exc))
                raise
            outcome.set_result(None)

        service = _Echo()
        service.calls = calls  # type: ignore[method-assign]
        server, _ = transport.new_server([service], "")
        path = str(tmp_path / "s.sock")
        await server.start(path=path)
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            writer.write(client.data_to_send())
            while client.max_outbound_frame_size < http2.FRAME_SIZE:  # the server's settings
                client.receive_data(await reader.read(65536))
            client.send_headers(1, [
                (":method", "POST"), (":scheme", "http"), (":path", "/trio_bridge.v1.WorkerService/Calls"),
                (":authority", "w"), ("content-type", "application/grpc"), ("te", "trailers"),
            ])
            message = bytes(pb.CallMessage(execute=_request("c", 8 << 20)))
            half = b"\x00" + len(message).to_bytes(4, "big") + message[: 3 << 20]
            for start in range(0, len(half), http2.FRAME_SIZE):
                client.send_data(1, half[start : start + http2.FRAME_SIZE])
            writer.write(client.data_to_send())
            await writer.drain()
            while not streams or not streams[0]._h2_connection.incoming_buffer._reservations:
                await asyncio.sleep(0.01)  # the reader is waiting for the rest, into its own buffer
        finally:
            writer.close()
        failed = await asyncio.wait_for(outcome, 5)
        server.close()
        await server.wait_closed()
        return failed, streams[0]._h2_connection.incoming_buffer

    failed, frames = _on_loop("asyncio", main)
    assert failed is asyncio.CancelledError  # grpclib cancels a lost connection's handlers
    gc.collect()
    assert not frames._reservations
