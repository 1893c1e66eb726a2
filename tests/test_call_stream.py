"""The host's side of a worker's call stream, spoken from Trio with h2 (``_host/_call_stream.py``),
against a real worker process over plain TCP: calls, big in-band values both ways, a caller's
cancellation reaching the worker, a refused secret, and the worker's death."""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from functools import partial

import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest
import trio

from trio_bridge._aio import CallStream, TransportError, open_boundary
from trio_bridge._host._call_stream import H2CallStream
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge.testing import RemoteWorkerProcess, free_port, write_token_file

pytestmark = pytest.mark.real_process


def _request(tool: str, call_id: str, **arguments: object) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(tool_name=tool, call_id=call_id, arguments=encode(arguments, path="arguments", plane=None))


@pytest.fixture
def worker(tmp_path) -> Iterator[tuple[RemoteWorkerProcess, str]]:
    token = secrets.token_hex(16)
    write_token_file(tmp_path / "token", token)
    process = RemoteWorkerProcess("tests.adapters:Echo", f"tcp://127.0.0.1:{free_port('127.0.0.1')}", tmp_path / "token")
    process.start()
    try:
        yield process, token
    finally:
        process.kill()


async def test_calls_big_values_and_a_cancelled_call_reach_the_worker(worker):
    process, token = worker
    big = np.random.default_rng(2).standard_normal(5 << 18).astype(np.float32)  # 5 MiB: big frames, owned buffer
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, token)
        await nursery.start(calls.run)
        reply = await calls.execute(_request("add", "c1", a=1))
        assert reply.error is None and decode(reply.result, plane=None) == 3
        for i, value in enumerate((big, big[::-1] + 1)):  # in-band, both ways, in order
            reply = await calls.execute(_request("echo", f"e{i}", value=value))
            echoed = decode(reply.result, plane=None)
            assert echoed.dtype == value.dtype and np.array_equal(echoed, value)
        with trio.move_on_after(0.3) as scope:
            await calls.execute(_request("async_sleep", "s1", seconds=60))
        assert scope.cancelled_caught
        with trio.fail_after(10):  # the worker took the cancellation: its slot is free
            reply = await calls.execute(_request("add", "c2", a=5))
        assert decode(reply.result, plane=None) == 7 and not calls.ended
        nursery.cancel_scope.cancel()
    assert calls.ended


async def test_a_wrong_secret_fails_the_calls_with_the_workers_refusal(worker):
    process, _ = worker
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, "not-the-token")
        await nursery.start(calls.run)
        with trio.fail_after(10), pytest.raises(TransportError, match="refused the call stream: gRPC UNAUTHENTICATED"):
            await calls.execute(_request("add", "c1", a=1))
        assert calls.ended
        with pytest.raises(TransportError):  # and every later call, at once
            await calls.execute(_request("add", "c2", a=1))


async def test_the_workers_death_fails_every_waiting_call(worker):
    process, token = worker
    failures: list[BaseException] = []

    async def waiting(call_id: str) -> None:
        try:
            await calls.execute(_request("async_sleep", call_id, seconds=60))
        except TransportError as exc:
            failures.append(exc)

    calls = H2CallStream(process.address, token)
    async with trio.open_nursery() as nursery:
        await nursery.start(calls.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as callers:
                for call_id in ("a", "b"):
                    callers.start_soon(waiting, call_id)
                await trio.sleep(0.3)
                process.kill()
        assert len(failures) == 2 and calls.ended
    with pytest.raises(TransportError):
        await calls.execute(_request("add", "c", a=1))


async def test_an_unreachable_worker_fails_the_start():
    calls = H2CallStream(f"tcp:127.0.0.1:{free_port('127.0.0.1')}", "secret")
    async with trio.open_nursery() as nursery:
        with pytest.raises(TransportError, match="cannot open the call stream"):
            await nursery.start(calls.run)


def _serve_one_reply(listener: socket.socket, answer: Callable[[pb.CallMessage], bytes], first_frame: int) -> None:
    """A fake worker (h2, blocking, in a thread): takes one call, answers it with the message
    ``answer(request)``, the reply's first DATA frame ``first_frame`` bytes and 1 MiB frames
    after it, all in ONE write, so that the host reads them together."""
    sock, _ = listener.accept()
    with sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="ascii"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        stream_id, received = 0, b""
        while len(received) < 5 or len(received) < 5 + struct.unpack(">?I", received[:5])[1]:
            data = sock.recv(1 << 20)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    stream_id = event.stream_id
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    received += event.data
            sock.sendall(conn.data_to_send())
        body = answer(pb.CallMessage.parse(received[5:]))
        message = struct.pack(">?I", False, len(body)) + body
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        for start in [0, first_frame, *range(first_frame + (1 << 20), len(message), 1 << 20)]:
            conn.send_data(stream_id, message[start : start + (first_frame if start == 0 else 1 << 20)])
        sock.sendall(conn.data_to_send())
        with contextlib.suppress(OSError):
            while sock.recv(1 << 16):
                pass


def _reply_with(value: np.ndarray, request: pb.CallMessage) -> bytes:
    return bytes(pb.CallResult(
        call_id=request.execute.call_id, response=pb.ExecuteToolResponse(result=encode({"v": value}, path="result", plane=None)),
    ))


@pytest.mark.parametrize("first_frame", [5000, 70_000, 300_000])
async def test_a_big_reply_whose_frames_arrive_together_is_received_intact(first_frame):
    # A small first frame and big ones after it, read in one go: the big message's own buffer is
    # made while frames already read still wait to be placed (a reviewer found them misplaced).
    value = (np.arange(1 << 19, dtype=np.int64) % 1021).astype(np.float32)  # 2 MiB
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = threading.Thread(target=_serve_one_reply, args=(listener, partial(_reply_with, value), first_frame), daemon=True)
        server.start()
        calls = H2CallStream(f"tcp:127.0.0.1:{port}", "secret")
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            with trio.fail_after(30):
                reply = await calls.execute(_request("echo", "c1"))
            got = decode(reply.result, plane=None)["v"]
            assert got.dtype == value.dtype and np.array_equal(got, value)
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(server.join, 10)
        assert not server.is_alive()


async def test_a_reply_that_does_not_parse_fails_the_calls_with_a_transport_error():
    # field 1 (call_id), a string of 2 bytes that are not UTF-8
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = threading.Thread(target=_serve_one_reply, args=(listener, lambda _: b"\x0a\x02\xff\xfe", 4), daemon=True)
        server.start()
        calls = H2CallStream(f"tcp:127.0.0.1:{port}", "secret")
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            with trio.fail_after(30), pytest.raises(TransportError, match="the call stream failed"):
                await calls.execute(_request("echo", "c1"))
        assert calls.ended
        await trio.to_thread.run_sync(server.join, 10)
        assert not server.is_alive()


async def test_many_answers_under_the_batch_size_keep_the_window_open(worker):
    """Requests and answers of 40 KiB, smaller than the acknowledgement batch, 24 MiB in all
    (more than the stream's 16 MiB window): the worker's sends never stall, calls in flight
    together come back, and the first requests, sent before the worker's SETTINGS raise the
    frame size from HTTP/2's 16 KiB, go in several frames."""
    process, token = worker
    value = "x" * (40 * 1024)
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, token)
        await nursery.start(calls.run)

        async def echo(i: int) -> None:
            reply = await calls.execute(_request("echo", f"w{i}", value=value))
            assert decode(reply.result, plane=None) == value

        with trio.fail_after(60):
            for batch in range(0, 600, 4):
                async with trio.open_nursery() as inner:
                    for i in range(batch, batch + 4):
                        inner.start_soon(echo, i)
        nursery.cancel_scope.cancel()


async def test_the_loops_call_stream_also_fails_its_calls_on_a_reply_that_does_not_parse():
    # the call stream of workers reached over TLS (and of TRIO_BRIDGE_STOCK_WIRE=calls), on the asyncio loop
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = threading.Thread(target=_serve_one_reply, args=(listener, lambda _: b"\x0a\x02\xff\xfe", 4), daemon=True)
        server.start()
        async with open_boundary() as boundary:
            channel, stub = await boundary.worker_stub(f"tcp:127.0.0.1:{port}", "secret")
            calls = CallStream(boundary, stub, 4)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(calls.run)
                    with trio.fail_after(30), pytest.raises(TransportError, match="the call stream failed"):
                        await calls.execute(_request("echo", "c1"))
            finally:
                boundary.close_channel(channel)
        assert calls.ended
        await trio.to_thread.run_sync(server.join, 10)
        assert not server.is_alive()
