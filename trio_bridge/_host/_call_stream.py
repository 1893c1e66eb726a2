"""A worker connection's calls, driven from Trio itself: the host's side of ``WorkerService.Calls``
spoken with h2 (sans-IO, its public API) over a Trio stream of its own, without crossing to the
asyncio loop (docs/boundary.md, "The call stream, in Trio").

Why: one call through the loop's thread (``_aio.CallStream``) crossed threads twice and took
several asyncio and Trio task switches; here a call is the caller's task writing its request, the
reader task waking on the reply, and nothing else. The other RPCs (``Describe``, ``Ping``,
sessions, streams, ``Shutdown``) stay on grpclib, on the connection the handshake opened.

What the worker sees is what grpclib's client sent: the same request headers and metadata (the
pool secret), gRPC's length-prefixed messages, HTTP/2 flow control (received data acknowledged
as it is read; our sends wait for the worker's windows), its PINGs answered (h2 does it).
"""

from __future__ import annotations

import collections
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import outcome
import trio

from trio_bridge._aio import TransportError
from trio_bridge._version import __version__
from trio_bridge._wire import fast_proto, overrides
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.errors import DRAINING
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import parse_address

CALLS_PATH = "/trio_bridge.v1.WorkerService/Calls"
_FRAME_SIZE = 1 << 20  # SETTINGS_MAX_FRAME_SIZE we advertise (the worker's FastH2Protocol sends up to it)
_WINDOW = 16 << 20  # bytes the worker may send ahead (stream and connection): what calls in flight return
_RECEIVE = 256 * 1024  # bytes read from the socket at once
_UNIX_SNDBUF = 1 << 20  # a Unix socket's send buffer holds a big frame (as the grpclib connections ask)
_PREFIX = struct.Struct(">?I")  # gRPC's message header: compressed flag, length
_CLOSE_TIMEOUT = 1.0  # seconds to close the connection gracefully (TLS close_notify), then it is dropped
_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, h2.exceptions.ProtocolError)
_GRPC_STATUS = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
                7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 12: "UNIMPLEMENTED",
                13: "INTERNAL", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED"}


class _Reply:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: outcome.Outcome[pb.ExecuteToolResponse] | None = None

    def set(self, result: outcome.Outcome[pb.ExecuteToolResponse]) -> None:
        self.result = result
        self.event.set()


class H2CallStream:
    """The calls of one worker, on one bidirectional gRPC stream of a connection of their own,
    driven from Trio (see the module doc). The same interface as ``_aio.CallStream``.

    Args:
        address: the worker's address (``"unix:..."``, ``"tcp:HOST:PORT"``).
        secret: the pool secret (or a remote worker's token), sent as gRPC metadata.
        tls: the client context of a TCP worker reached over TLS (``None``: plain).
        server_name: the name the worker's certificate must carry (``None``: the address's host).
        on_draining: called when the worker says on the stream that it drains.

    :meth:`run` is the stream's life (a Trio task of the worker's handle). When the stream or
    its connection fails or ends, every call waiting on it fails with :class:`TransportError`,
    as do later ones.
    """

    def __init__(
        self, address: str, secret: str, *, tls: ssl.SSLContext | None = None, server_name: str | None = None,
        on_draining: Callable[[], None] = lambda: None,
    ) -> None:
        self._address = address
        self._secret = secret
        self._tls = tls
        self._server_name = server_name
        self._on_draining = on_draining
        self._waiting: dict[str, _Reply] = {}
        self._failure: str | None = None
        self._stream: trio.abc.Stream | None = None
        self._h2: h2.connection.H2Connection | None = None
        self._stream_id = 0
        self._outbox: collections.deque[memoryview] = collections.deque()  # gRPC-framed messages h2 has not taken yet
        self._wake = trio.Event()  # the writer has something to do
        self._received = bytearray()  # the stream's DATA not yet parsed into messages
        self._raw: socket.socket | None = None  # the plain socket (a duplicate), for writes that need no wait
        self._idle = False  # the writer waits for work, with nothing of its own to write
        self._unsent = b""  # taken from h2, not yet written

    @property
    def ended(self) -> bool:
        """The stream has failed or ended: a call sent from now on never reaches the worker."""
        return self._failure is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, open the stream (``task_status.started()`` once its request is sent) and serve
        it until it ends or this task is cancelled; the connection is closed as this ends.

        Raises:
            TransportError: the worker could not be reached, or the stream not opened.
        """
        try:
            try:
                self._stream = await self._connect()
                if isinstance(self._stream, trio.SocketStream):  # (not TLS): the same connection, written without waiting
                    self._raw = socket.socket(fileno=os.dup(self._stream.socket.fileno()))
                    self._raw.setblocking(False)
                self._open()
                await self._stream.send_all(self._take_output())
            except _CONNECTION_ERRORS as exc:
                raise TransportError(f"cannot open the call stream: {_describe(exc)}") from None
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_failed, self._write_loop, nursery.cancel_scope)
                await self._until_failed(self._read_loop, nursery.cancel_scope)
        finally:
            self._fail("the call stream ended")
            stream, self._stream = self._stream, None
            raw, self._raw = self._raw, None
            if raw is not None:
                raw.close()
            if stream is not None:
                with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
                    scope.shield = True
                    await stream.aclose()
                if scope.cancelled_caught:
                    await trio.aclose_forcefully(stream)

    async def _until_failed(self, loop: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run the reader's or the writer's ``loop``; when it ends, the connection is over (both end)."""
        try:
            await loop()
        except _CONNECTION_ERRORS as exc:
            self._fail(f"the call stream's connection failed: {_describe(exc)}")
        finally:
            scope.cancel()

    async def _connect(self) -> trio.abc.Stream:
        scheme, where, port = parse_address(self._address)
        if scheme == "unix":
            stream: trio.abc.Stream = await trio.open_unix_socket(where)
            sock = stream.socket  # type: ignore[attr-defined]
            if sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF) < _UNIX_SNDBUF:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, _UNIX_SNDBUF)
            return stream
        stream = await trio.open_tcp_stream(where, port)  # (TCP_NODELAY on)
        if self._tls is None:
            return stream
        secure = trio.SSLStream(stream, self._tls, server_hostname=self._server_name or where)
        try:
            await secure.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(secure)
            raise
        return secure

    def _open(self) -> None:
        """The connection's preface, our settings and the stream's request headers, into h2."""
        config = h2.config.H2Configuration(
            client_side=True, header_encoding="ascii", validate_inbound_headers=False, validate_outbound_headers=False,
            normalize_inbound_headers=False, normalize_outbound_headers=False,
        )
        conn = self._h2 = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        conn.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW, h2.settings.SettingCodes.MAX_FRAME_SIZE: _FRAME_SIZE,
        })
        conn.increment_flow_control_window(_WINDOW - conn.local_settings.initial_window_size)
        scheme, where, port = parse_address(self._address)
        authority = "localhost" if scheme == "unix" else f"{self._server_name or where}:{port}"
        self._stream_id = conn.get_next_available_stream_id()
        conn.send_headers(self._stream_id, [
            (":method", "POST"), (":scheme", "https" if self._tls is not None else "http"), (":path", CALLS_PATH),
            (":authority", authority), ("te", "trailers"), ("content-type", "application/grpc"),
            ("user-agent", f"trio-bridge/{__version__}"), (SECRET_METADATA, self._secret),
        ])

    def _take_output(self) -> bytes:
        assert self._h2 is not None
        return self._h2.data_to_send()

    # ---- sending ----
    def _send(self, message: pb.CallMessage) -> None:
        """Send ``message`` after those before it (never waits: what cannot go now, the writer sends)."""
        if overrides.CODEC:
            parts = fast_proto.serialize(message)
            body, size = parts.buffers, len(parts)
        else:
            encoded = bytes(message)
            body, size = [encoded], len(encoded)
        self._outbox.append(memoryview(b"".join([_PREFIX.pack(False, size), *body])))
        self._flush()

    def _flush(self) -> None:
        """Send what h2 and the outbox hold: at once, without waiting, when the writer is idle
        and the socket takes it all (a plain socket); else by waking the writer."""
        raw = self._raw
        if raw is None or not self._idle:
            self._idle = False
            self._wake.set()
            return
        data = self._take()
        if not data:
            return
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the connection is gone: the reader sees it
            return
        if sent < len(data) or self._outbox:
            self._unsent = data[sent:]
            self._idle = False
            self._wake.set()

    def _take(self) -> bytes:
        """What is to be written next, in order: what the socket did not take, then the outbox's
        messages as far as the worker's window allows (h2 frames them), then h2's own frames."""
        conn, sid, outbox = self._h2, self._stream_id, self._outbox
        assert conn is not None
        while outbox:
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room <= 0:
                break  # until a WINDOW_UPDATE (the reader wakes the writer)
            message = outbox[0]
            if len(message) <= room:
                outbox.popleft()
                conn.send_data(sid, message.tobytes())
            else:
                outbox[0] = message[room:]
                conn.send_data(sid, message[:room].tobytes())
        data = conn.data_to_send()
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        return data

    async def _write_loop(self) -> None:
        """The task that writes what could not be written at once (a partial write, a wait for
        the worker's window, a TLS connection: all of it)."""
        stream = self._stream
        assert stream is not None
        while True:
            data = self._take()
            if data:
                await stream.send_all(data)
                continue
            self._wake = trio.Event()
            self._idle = not self._outbox  # messages waiting for a window keep the writer in charge
            await self._wake.wait()

    # ---- receiving ----
    async def _read_loop(self) -> None:
        conn, stream = self._h2, self._stream
        assert conn is not None and stream is not None
        while self._failure is None:
            data = await stream.receive_some(_RECEIVE)
            if not data:
                self._fail("the worker closed the call stream's connection")
                return
            for event in conn.receive_data(data):
                self._handle(conn, event)
            self._flush()  # what h2 queued in answer (PING and SETTINGS acknowledgements, WINDOW_UPDATEs)

    def _handle(self, conn: h2.connection.H2Connection, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.stream_id != self._stream_id:
                return
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self._received += event.data
            self._deliver_messages()
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self._check_headers(event.headers, trailers=isinstance(event, h2.events.TrailersReceived))
        elif isinstance(event, h2.events.WindowUpdated):
            if self._outbox:
                self._idle = False
        elif isinstance(event, h2.events.StreamReset):
            self._fail(f"the worker reset the call stream (HTTP/2 error code {event.error_code})")
        elif isinstance(event, h2.events.StreamEnded):
            self._fail("the call stream ended")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._fail(f"the worker closed the call stream's connection (GOAWAY, HTTP/2 error code {event.error_code})")

    def _check_headers(self, headers: Any, *, trailers: bool) -> None:
        fields = {_text(name): _text(value) for name, value in headers}
        status = fields.get(":status")
        if status is not None and status != "200":
            self._fail(f"the worker answered the call stream with HTTP status {status}")
        elif "grpc-status" in fields:  # the stream's end (trailers, or a trailers-only refusal)
            code = int(fields["grpc-status"]) if fields["grpc-status"].isdigit() else 2
            if code:
                name = _GRPC_STATUS.get(code, str(code))
                self._fail(f"the worker refused the call stream: gRPC {name}: {fields.get('grpc-message', '')}")
            else:
                self._fail("the call stream ended")
        elif trailers:
            self._fail("the call stream ended without a gRPC status")

    def _deliver_messages(self) -> None:
        received = self._received
        while len(received) >= 5:
            compressed, size = _PREFIX.unpack_from(received)
            if len(received) < 5 + size:
                return
            if compressed:
                self._fail("the worker sent a compressed message on the call stream (none was asked for)")
                return
            body = memoryview(received)[5 : 5 + size]
            try:
                result = fast_proto.parse(pb.CallResult, body) if overrides.CODEC else pb.CallResult.parse(bytes(body))
            finally:
                body.release()
            del received[: 5 + size]
            self._deliver(result)

    def _deliver(self, result: pb.CallResult) -> None:
        if not result.call_id:  # a notice, not a reply
            if result.response is not None and result.response.error is not None and result.response.error.kind == DRAINING:
                self._on_draining()
            return
        reply = self._waiting.pop(result.call_id, None)
        if reply is not None:  # None: a cancelled call's late answer
            reply.set(outcome.Value(pb.ExecuteToolResponse() if result.response is None else result.response))

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            reply.set(outcome.Error(TransportError(self._failure)))

    # ---- calls ----
    async def execute(self, request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """Run one call; a cancelled caller cancels it on the worker.

        Raises:
            TransportError: the stream failed (or had already), before the reply came.
        """
        if self._failure is not None:
            raise TransportError(self._failure)
        reply = _Reply()
        self._waiting[request.call_id] = reply
        self._send(pb.CallMessage(execute=request))
        try:
            await reply.event.wait()
        except BaseException:
            if self._waiting.pop(request.call_id, None) is not None and self._failure is None:
                self._send(pb.CallMessage(cancel=request.call_id))
            raise
        assert reply.result is not None
        return reply.result.unwrap()


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

