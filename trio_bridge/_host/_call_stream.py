"""A worker connection's calls, driven from Trio itself: the host's side of ``WorkerService.Calls``
spoken with h2 (sans-IO, its public API) over a Trio stream of its own, without crossing to the
asyncio loop (docs/boundary.md, "The call stream, in Trio").

Why: one call through the loop's thread (``_aio.CallStream``) crossed threads twice and took
several asyncio and Trio task switches; here a call is the caller's task writing its request, the
reader task waking on the reply, and nothing else. The other RPCs (``Describe``, ``Ping``,
sessions, streams, ``Shutdown``) stay on grpclib, on the connection the handshake opened.

What the worker sees is what grpclib's client sent: the same request headers and metadata (the
pool secret), gRPC's length-prefixed messages, HTTP/2 flow control (received data acknowledged
to h2 as it is read, in batches of up to 64 KiB; our sends wait for the worker's windows), its
PINGs answered (h2 does it).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpclib.const
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from trio_bridge._aio import CallStreamBase, TransportError, describe
from trio_bridge._version import __version__
from trio_bridge._wire import call_messages, fast_proto, overrides
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import parse_address

_logger = logging.getLogger("trio_bridge")
_STATUS_CODES = frozenset(status.value for status in grpclib.const.Status)
CALLS_PATH = "/trio_bridge.v1.WorkerService/Calls"
_FRAME_SIZE = 1 << 20  # SETTINGS_MAX_FRAME_SIZE we advertise (the worker's FastH2Protocol sends up to it)
_DIRECT_MIN = 64 * 1024  # a DATA frame at least this big is written without copying its body
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1,024)
_OWNED_MIN = 256 * 1024  # a message at least this big is received into a buffer of its own ...
_HEAD = 4096  # ... once this much of it is here
_GUESS = 64 * 1024  # the most of its start owned_buffer looks at
_WINDOW = 16 << 20  # bytes the worker may send ahead (stream and connection): what calls in flight return
_ACK_BATCH = 64 * 1024  # received bytes handed back to h2's window accounting at once (h2 itself
# sends a WINDOW_UPDATE once half the window is processed, so this delays none by more than it)
_RECEIVE = 256 * 1024  # bytes read from the socket at once
_UNIX_SNDBUF = 1 << 20  # a Unix socket's send buffer holds a big frame (as the grpclib connections ask)
_PREFIX = struct.Struct(">?I")  # gRPC's message header: compressed flag, length
_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError)


class _OwnedMessage:
    """A big message being received into a buffer of its own (``fast_proto.owned_buffer``, placed
    so that parsing does not copy its big value), where the frame buffer places the stream's DATA
    as it arrives (its reservation): the kernel's copy is then the only one. What came before it
    was reserved is copied in."""

    __slots__ = ("message", "pos", "reservation", "view")

    def __init__(self, size: int, received: collections.deque[memoryview], reserve: Callable[[memoryview], Any]) -> None:
        head = b"".join(received)  # (at least _HEAD bytes, less than size)
        self.message = fast_proto.owned_buffer(size, memoryview(head)[:_GUESS])
        self.view = self.message.buffers[0]
        self.view[: len(head)] = head
        self.pos = len(head)
        self.reservation = reserve(self.view[self.pos :])

    @property
    def full(self) -> bool:
        return self.pos == len(self.view)

    def fill(self, data: memoryview) -> memoryview:
        """Take the start of ``data`` (a DATA frame's); returns what is left of it."""
        if data.obj is self.view.obj:  # placed by the frame buffer, right after what came before
            self.pos += len(data)
            return data[len(data) :]
        used = min(len(data), len(self.view) - self.pos)
        self.view[self.pos : self.pos + used] = data[:used]
        self.pos += used
        # Read before the reservation was made (in the same batch): the frame buffer places what
        # comes next after it, not over it.
        self.reservation.pos += used
        return data[used:]

    def close(self) -> None:
        self.reservation.close()


class H2CallStream(CallStreamBase):
    """The calls of one worker, on one bidirectional gRPC stream of a connection of their own,
    driven from Trio (see the module doc). Its calls are kept as every call stream keeps them
    (``_aio.CallStreamBase``); this class moves their messages.

    Args:
        address: the worker's address (``"unix:..."``, ``"tcp:HOST:PORT"``: plain TCP; a worker
            reached over TLS keeps ``_aio.CallStream``, see docs/boundary.md).
        secret: the pool secret (or a remote worker's token), sent as gRPC metadata.
        on_draining: called when the worker says on the stream that it drains.

    :meth:`run` is the stream's life (a Trio task of the worker's handle). When the stream or
    its connection fails or ends, every call waiting on it fails with :class:`TransportError`,
    as do later ones.
    """

    def __init__(
        self, address: str, secret: str, *, on_draining: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(on_draining)
        self._address = address
        self._where = parse_address(address)  # (scheme, host or path, port)
        self._secret = secret
        self._stream: trio.SocketStream | None = None
        self._h2: h2.connection.H2Connection | None = None
        self._fast: Any = None  # the same, where it is an http2.FastH2Connection
        self._stream_id = 0
        self._outbox: collections.deque[memoryview] = collections.deque()  # gRPC-framed messages, not yet in frames
        self._queued = 0  # bytes in the outbox
        self._out: collections.deque[bytes | memoryview] = collections.deque()  # frames, to be written in order
        self._wake = trio.Event()  # the writer has something to do
        self._received: collections.deque[memoryview] = collections.deque()  # DATA not yet parsed into messages
        self._have = 0  # bytes in _received
        self._need = -1  # the size of the message being received (-1: its prefix is still to come)
        self._owned: _OwnedMessage | None = None  # a big message being received into its own buffer
        self._frames: Any = None  # our frame buffer (an http2.FastH2Connection's), once receiving
        self._raw: socket.socket | None = None  # the socket (a duplicate), for writes that need no wait
        self._idle = False  # the writer waits for work, with nothing of its own to write
        self._unacknowledged = 0  # received DATA bytes not yet acknowledged to h2 (< _ACK_BATCH)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, open the stream (``task_status.started()`` once its request is sent) and serve
        it until it ends or this task is cancelled; the connection is closed as this ends.

        Raises:
            TransportError: the worker could not be reached, or the stream not opened.
        """
        try:
            try:
                self._stream = await self._connect()
                # the same connection, for writes that need no wait (the writer task's are Trio's)
                self._raw = socket.socket(fileno=os.dup(self._stream.socket.fileno()))
                self._raw.setblocking(False)
                self._open()
                await self._stream.send_all(self._h2.data_to_send() if self._h2 is not None else b"")
            except _CONNECTION_ERRORS as exc:
                raise TransportError(f"cannot open the call stream: {describe(exc)}") from None
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_failed, self._write_loop, nursery.cancel_scope)
                await self._until_failed(self._read_loop, nursery.cancel_scope)
        finally:
            self.fail("the call stream ended")
            stream, self._stream = self._stream, None
            raw, self._raw = self._raw, None
            if raw is not None:
                raw.close()
            if stream is not None:
                with trio.CancelScope(shield=True):  # (a socket closes at once)
                    await stream.aclose()

    async def _until_failed(self, loop: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run the reader's or the writer's ``loop``; when it ends, the connection is over (both end)."""
        try:
            await loop()
        except _CONNECTION_ERRORS as exc:
            self.fail(f"the call stream's connection failed: {describe(exc)}")
        except Exception as exc:  # e.g. a reply that does not parse: the peer's fault or ours, never the caller's
            _logger.warning("the call stream to %s failed", self._address, exc_info=True)
            self.fail(f"the call stream failed: {describe(exc)}")
        finally:
            scope.cancel()

    async def _connect(self) -> trio.SocketStream:
        scheme, where, port = self._where
        if scheme != "unix":
            return await trio.open_tcp_stream(where, port)  # (TCP_NODELAY on)
        stream = await trio.open_unix_socket(where)
        sock = stream.socket
        if sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF) < _UNIX_SNDBUF:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, _UNIX_SNDBUF)
        return stream

    def _open(self) -> None:
        """The connection's preface, our settings and the stream's request headers, into h2."""
        config = h2.config.H2Configuration(
            client_side=True, header_encoding="ascii", validate_inbound_headers=False, validate_outbound_headers=False,
            normalize_inbound_headers=False, normalize_outbound_headers=False,
        )
        if overrides.HTTP2:  # receives big DATA bodies, and sends them, without copies
            from trio_bridge._wire.http2 import FastH2Connection

            conn = self._h2 = self._fast = FastH2Connection(config)
        else:
            conn = self._h2 = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        conn.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW, h2.settings.SettingCodes.MAX_FRAME_SIZE: _FRAME_SIZE,
        })
        conn.increment_flow_control_window(_WINDOW - conn.local_settings.initial_window_size)
        scheme, where, port = self._where
        authority = "localhost" if scheme == "unix" else f"{where}:{port}"
        self._stream_id = conn.get_next_available_stream_id()
        conn.send_headers(self._stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", CALLS_PATH),
            (":authority", authority), ("te", "trailers"), ("content-type", "application/grpc"),
            ("user-agent", f"trio-bridge/{__version__}"), (SECRET_METADATA, self._secret),
        ])

    # ---- sending ----
    @trio.lowlevel.enable_ki_protection  # h2's state and what was written stay in step
    def _send(self, message: pb.CallMessage | bytes) -> None:
        """Send ``message`` (or its encoding) after those before it (never waits: what cannot go
        now, the writer sends). A stream h2 finds closed fails (the waiting calls get
        :class:`TransportError`)."""
        try:
            if isinstance(message, bytes):
                size = len(message)
                if size < _DIRECT_MIN and self._send_small(size, [message]):
                    return
                body = [message]
            elif overrides.CODEC:
                parts = fast_proto.serialize(message)
                size = len(parts)
                if size < _DIRECT_MIN and self._send_small(size, parts.buffers):
                    return
                body = parts.buffers if size >= _DIRECT_MIN else [parts.tobytes()]
            else:
                body = [bytes(message)]
                size = len(body[0])
            self._outbox.append(memoryview(_PREFIX.pack(False, size)))
            self._outbox.extend(memoryview(b).cast("B") for b in body)
            self._queued += _PREFIX.size + size
            self._flush()
        except h2.exceptions.ProtocolError as exc:
            self.fail(f"the call stream failed: {describe(exc)}")

    def _send_small(self, size: int, body: list[Any]) -> bool:
        """The common case of :meth:`_send`: a small message (``size`` bytes in the pieces
        ``body``), nothing queued before it and the writer idle: framed and written at once (one
        h2 call, one system call). Whether it went that way (else it is queued as any other).

        Raises:
            h2.exceptions.ProtocolError: the stream is closed.
        """
        fast, raw = self._fast, self._raw
        framed = _PREFIX.size + size
        if self._queued or not self._idle or fast is None or raw is None or framed > fast.max_outbound_frame_size:
            return False  # (a frame bigger than the worker takes, 16 KiB until its SETTINGS came: several)
        try:
            header = fast.data_frame_header(self._stream_id, framed, False)
        except h2.exceptions.FlowControlError:
            return False  # the worker's window is short: the writer sends it once it opens
        # what h2 queued before (acknowledgements, PING answers) goes first
        data = b"".join([fast.data_to_send(), header, _PREFIX.pack(False, size), *body])
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lose(exc, raw)
            return True
        if sent < len(data):
            self._out.append(memoryview(data)[sent:])
            self._idle = False
            self._wake.set()
        return True

    @trio.lowlevel.enable_ki_protection
    def _flush(self) -> None:
        """Send what is queued: at once, without waiting, when the writer is idle and the socket
        takes it all; else by waking the writer."""
        if self._raw is None or not self._idle:
            self._idle = False
            self._wake.set()
            return
        self._frame()
        if not self._write_now() or self._queued:
            self._idle = False
            self._wake.set()

    def _write_now(self) -> bool:
        """Write as much of ``_out`` as the socket takes without waiting (one system call,
        gathering the pieces); whether all of it went. A failed write fails the stream (:meth:`_lose`)."""
        out, raw = self._out, self._raw
        assert raw is not None
        if not out:
            return True
        try:
            sent = raw.send(out[0]) if len(out) == 1 else raw.sendmsg(list(itertools.islice(out, _IOV_MAX)))
        except BlockingIOError:
            return False
        except OSError as exc:
            self._lose(exc, raw)
            return True
        _consume(out, sent)
        return not out

    def _lose(self, exc: OSError, raw: socket.socket) -> None:
        """A write failed: part of a frame may have gone, so h2's state and the wire disagree. The
        stream fails (its calls get :class:`TransportError`) and the socket is shut, so that the
        reader ends too; nothing more is written."""
        self._out.clear()
        self._outbox.clear()
        self._queued = 0
        self.fail(f"the call stream's connection failed: {describe(exc)}")
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)

    def _frame(self) -> None:
        """The outbox's messages into DATA frames, as far as the worker's windows allow, after
        whatever h2 queued (acknowledgements, PING and SETTINGS answers), onto ``_out``. A big
        frame's body is not copied: h2 does its bookkeeping, its header and body are written as
        they are (``http2.FastH2Connection.data_frame_header``)."""
        conn, sid, out = self._h2, self._stream_id, self._out
        assert conn is not None
        while self._queued:
            size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, self._queued)
            if size <= 0:
                break  # until a WINDOW_UPDATE (the reader wakes the writer)
            body = _take(self._outbox, size)
            self._queued -= size
            if size < _DIRECT_MIN or self._fast is None:
                conn.send_data(sid, b"".join(body))
                continue
            queued = conn.data_to_send()
            if queued:
                out.append(queued)
            out.append(self._fast.data_frame_header(sid, size, False))
            out.extend(body)
        queued = conn.data_to_send()
        if queued:
            out.append(queued)

    async def _write_loop(self) -> None:
        """The task that writes what could not be written at once (a partial write, a wait for
        the worker's window)."""
        raw = self._raw
        assert raw is not None
        while True:
            self._frame()
            if self._out:
                if not self._write_now():
                    await trio.lowlevel.wait_writable(raw)
                continue
            self._wake = trio.Event()
            self._idle = not self._queued  # messages waiting for a window keep the writer in charge
            await self._wake.wait()

    # ---- receiving ----
    async def _read_loop(self) -> None:
        conn, stream = self._h2, self._stream
        assert conn is not None and stream is not None
        # With our frame buffer, the buffer says where each read goes (a reused arena between big
        # DATA bodies, a big message's own buffer, fresh memory): no fresh 256 KiB per read.
        frames = self._frames = self._fast.incoming_buffer if self._fast is not None else None
        raw = self._raw
        assert raw is not None
        more = False  # a big message is coming in: read on without waiting (a checkpoint only)
        while not self.ended:
            # Otherwise wait first, then read: a reply is never there yet when the reader comes
            # back (a read would fail with EAGAIN first, one more system call per call).
            if more:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(raw)
            more = False
            try:
                if frames is not None:
                    size = raw.recv_into(frames.receive_buffer())
                    if size:
                        frames.received(size)
                    data = b""
                else:
                    data = raw.recv(_RECEIVE)
                    size = len(data)
            except BlockingIOError:
                continue
            if not size:
                self.fail("the worker closed the call stream's connection")
                return
            for event in conn.receive_data(data):
                self._handle(conn, event)
            self._flush()  # what h2 queued in answer (PING and SETTINGS acknowledgements, WINDOW_UPDATEs)
            more = self._owned is not None

    def _handle(self, conn: h2.connection.H2Connection, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            if event.stream_id != self._stream_id:
                return
            self._unacknowledged += event.flow_controlled_length
            if self._unacknowledged >= _ACK_BATCH:
                conn.acknowledge_received_data(self._unacknowledged, event.stream_id)
                self._unacknowledged = 0
            data = memoryview(event.data).cast("B")
            if self._owned is not None:
                data = self._owned.fill(data)  # what is left belongs to the next message
            if len(data):
                self._received.append(data)
                self._have += len(data)
            self._deliver_messages()
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self._check_headers(event.headers, trailers=isinstance(event, h2.events.TrailersReceived))
        elif isinstance(event, h2.events.WindowUpdated):
            if self._outbox:
                self._idle = False
        elif isinstance(event, h2.events.StreamReset):
            self.fail(f"the worker reset the call stream (HTTP/2 error code {event.error_code})")
        elif isinstance(event, h2.events.StreamEnded):
            self.fail("the call stream ended")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.fail(f"the worker closed the call stream's connection (GOAWAY, HTTP/2 error code {event.error_code})")

    def _check_headers(self, headers: Any, *, trailers: bool) -> None:
        fields = {_text(name): _text(value) for name, value in headers}
        status = fields.get(":status")
        if status is not None and status != "200":
            self.fail(f"the worker answered the call stream with HTTP status {status}")
        elif "grpc-status" in fields:  # the stream's end (trailers, or a trailers-only refusal)
            code = int(fields["grpc-status"]) if fields["grpc-status"].isdigit() else 2
            if code:
                name = grpclib.const.Status(code).name if code in _STATUS_CODES else str(code)
                self.fail(f"the worker refused the call stream: gRPC {name}: {fields.get('grpc-message', '')}")
            else:
                self.fail("the call stream ended")
        elif trailers:
            self.fail("the call stream ended without a gRPC status")

    def _deliver_messages(self) -> None:
        """Each whole gRPC message received to its caller (its frames are not joined first). A
        big one, once its first bytes are here, is received into a buffer of its own instead
        (:class:`_OwnedMessage`)."""
        while True:
            owned = self._owned
            if owned is not None:
                if not owned.full:
                    return
                self._owned = None
                owned.close()
                self.deliver(fast_proto.parse(pb.CallResult, owned.message))
                continue
            if self._need < 0:
                if self._have < _PREFIX.size:
                    return
                compressed, size = _PREFIX.unpack(b"".join(_take(self._received, _PREFIX.size)))
                self._have -= _PREFIX.size
                if compressed:
                    self.fail("the worker sent a compressed message on the call stream (none was asked for)")
                    return
                self._need = size
            size = self._need
            if self._have < size:
                if size >= _OWNED_MIN and self._have >= _HEAD and self._frames is not None and overrides.CODEC:
                    self._need, self._have = -1, 0
                    self._owned = _OwnedMessage(size, self._received, functools.partial(self._frames.reserve, self._stream_id))
                    self._received = collections.deque()
                    continue
                return
            self._need = -1
            self._have -= size
            body = _take(self._received, size)
            if overrides.CODEC:
                # the common answer by hand (call_messages), any other by fast_proto
                common = call_messages.parse_result(body[0]) if len(body) == 1 else None
                result = common if common is not None else fast_proto.parse(pb.CallResult, fast_proto.Chunks(body, size))
            else:
                result = pb.CallResult.parse(b"".join(body))
            self.deliver(result)

    def _send_execute(self, request: pb.ExecuteToolRequest) -> None:
        encoded = call_messages.encode_execute(request) if overrides.CODEC else None
        self._send(pb.CallMessage(execute=request) if encoded is None else encoded)


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _take(pieces: collections.deque[memoryview], size: int) -> list[memoryview]:
    """The first ``size`` bytes of ``pieces`` (which holds at least that many), removed from it, as views."""
    taken = []
    while size:
        piece = pieces[0]
        if len(piece) <= size:
            taken.append(pieces.popleft())
            size -= len(piece)
        else:
            taken.append(piece[:size])
            pieces[0] = piece[size:]
            size = 0
    return taken


def _consume(out: collections.deque[bytes | memoryview], sent: int) -> None:
    """Drop the first ``sent`` bytes of ``out`` (written)."""
    while sent:
        first = out[0]
        if len(first) <= sent:
            out.popleft()
            sent -= len(first)
        else:
            out[0] = memoryview(first)[sent:]
            sent = 0

