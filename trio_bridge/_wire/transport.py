"""Addresses and channels, the same on both sides.

Addresses are ``"unix:/path/to.sock"`` or ``"tcp:host:port"``.

Flow control: a stream's HTTP/2 window is what a sender may run ahead of a reader that stopped
reading, so it bounds the backpressure of streaming tools in bytes. grpclib's default (4 MiB)
let a generator of small chunks run ~350,000 chunks ahead of a slow consumer; 256 KiB keeps
that to ~20,000 with no loss of stream throughput (49k chunks/s either way, measured) and bulk
transfers within noise. 64 KiB cost a quarter of stream throughput. (That is the channels'
window, what a host reads with; servers keep grpclib's 4 MiB.) A stream asked to read a message
bigger than its window widens it to the message's size, at most ``MAX_WINDOW``: a big message
then crosses without a WINDOW_UPDATE round trip every 128 KiB, and streams of small messages
keep their window (see "big messages" below).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from functools import partial
from ssl import SSLContext
from typing import Any, cast

import betterproto2
import grpclib.client
import grpclib.server
import h2.config
import h2.connection
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import AckedData, Buffer, Connection, EventsProcessor, H2Protocol, Stream
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

from trio_bridge._wire import fast_proto
from trio_bridge._wire.auth import RateLimitedWarning, require_secret

STREAM_WINDOW = 256 * 1024  # bytes
CONNECTION_WINDOW = 4 * 1024 * 1024  # bytes: many streams share a connection

_CONFIG = Configuration(http2_stream_window_size=STREAM_WINDOW, http2_connection_window_size=CONNECTION_WINDOW)


class _DeferredRepr:
    """``repr(obj)``, computed only if formatted (``str()``): what h2 logs, when it logs."""

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __str__(self) -> str:
        return repr(self._obj)

    __repr__ = __str__


def _defer_h2_frame_repr() -> None:
    """Stop h2 from formatting every received frame when nothing logs it.

    h2 4.4.1 ``H2Connection._receive_frame`` (h2/connection.py line 1543) runs
    ``self.config.logger.trace("Received frame: %s", repr(frame))`` for every frame, and its
    default logger discards the text. For a DATA frame, hyperframe's ``Frame.__repr__`` copies
    and hex-dumps the whole body (51 us per 16 KiB frame): a few percent of a unary call and a
    large share of a big in-band message. Shadowing the name ``repr`` in that one module (the
    only call of ``repr`` there) makes it a ``_DeferredRepr``: an h2 logger that does log still
    prints the same text (``%s`` formats it with ``str``), only when it formats the message
    rather than when h2 calls it. Applied on import, by host and worker alike; only to h2 4.x,
    where a test checks that this is still the module's only ``repr`` call.
    """
    if h2.__version__.startswith("4."):
        h2.connection.__dict__.setdefault("repr", _DeferredRepr)


_defer_h2_frame_repr()


def parse_address(address: str) -> tuple[str, str, int]:
    """``"unix:/p"`` -> ``("unix", "/p", 0)``; ``"tcp:h:1"`` (or ``"tcp://h:1"``) -> ``("tcp", "h", 1)``.

    ``"unix:@name"`` is a Linux abstract-namespace socket (no file on disk): ``("unix", "\\0name", 0)``.

    Raises:
        ValueError: neither form.
    """
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        return scheme, ("\0" + rest[1:]) if rest.startswith("@") else rest, 0
    if scheme == "tcp":
        host, _, port = rest.removeprefix("//").rpartition(":")
        if host and port.isdigit():
            return scheme, host, int(port)
    raise ValueError(f"an address must be unix:PATH or tcp:HOST:PORT, not {address!r}")


def advertised_address(advertise: str | None, bound: str) -> str:
    """Where the other side reaches a TCP listener bound at ``bound`` (``tcp:HOST:PORT``):
    ``advertise`` (``HOST``, ``HOST:PORT``, or either behind ``tcp://``), taking the bound port
    when it names none; without it, the bound address, with this machine's name for a wildcard."""
    _, host, port = parse_address(bound)
    if advertise:
        name = advertise.removeprefix("tcp://").removeprefix("tcp:")
        given = ""
        if ":" in name:
            name, _, given = name.rpartition(":")
        return f"tcp:{name}:{given or port}"
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"tcp:{host}:{port}"


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one; ``getsockname()`` says which).

    Made with ``IPPROTO_TCP`` explicitly: asyncio turns Nagle's algorithm off (``TCP_NODELAY``)
    only on sockets whose ``proto`` says TCP, and accepted sockets inherit the listener's. With
    ``socket.create_server``'s proto 0, every gRPC exchange waited ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener


class _FastChannel(Channel):
    """A grpclib channel whose connections are _FastH2Protocols. Overrides grpclib 0.4's private
    ``Channel._protocol_factory`` (client.py), which makes an ``H2Protocol`` the same way."""

    def _protocol_factory(self) -> H2Protocol:
        return _FastH2Protocol(grpclib.client.Handler(), self._config, self._h2_config)


class _AbstractSocketChannel(_FastChannel):
    """A channel to a Linux abstract-namespace Unix socket (a path that starts with NUL) that
    connects the socket itself: uvloop's ``create_unix_connection(path=...)`` hands the path to
    libuv's ``uv_pipe_connect``, which reads it as a NUL-terminated string, so an abstract name
    fails with ``OSError: [Errno 22]`` (MagicStack/uvloop issue 528). A connected socket passed as
    ``sock=`` works on every loop. Overrides grpclib 0.4's private ``Channel._create_connection``
    (client.py), which for a ``path`` does only that call."""

    async def _create_connection(self) -> H2Protocol:
        assert self._path is not None
        loop = self._loop  # the loop grpclib bound the channel to
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self._path)
            _, protocol = await loop.create_unix_connection(self._protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return protocol


def open_channel(address: str, ssl: SSLContext | None = None) -> Channel:
    """A grpclib client channel to ``address`` (connects lazily, on the first call); TCP over
    TLS with ``ssl`` (a client context: ``TLSConfig.client_context()``)."""
    scheme, where, port = parse_address(address)
    if scheme == "unix":
        return (_AbstractSocketChannel if where.startswith("\0") else _FastChannel)(path=where, config=_CONFIG, codec=_FastCodec())
    return _FastChannel(host=where, port=port, config=_CONFIG, ssl=ssl, codec=_FastCodec())


class _FastCodec(ProtoCodec):
    """grpclib's ``ProtoCodec`` for betterproto2 messages, with :mod:`fast_proto`'s encoding
    (byte-identical to betterproto2's, without its whole-body copies at every nesting level)."""

    def encode(self, message: Any, message_type: Any) -> Any:
        if not isinstance(message, message_type):
            raise TypeError(f"Message must be of type {message_type!r}, not {type(message)!r}")
        if isinstance(message, betterproto2.Message):
            parts = fast_proto.serialize(message)
            # Only our streams (_FastStream) take Parts: every codec of ours sends through them.
            return parts if len(parts) >= _PARTS_MIN else parts.tobytes()
        return super().encode(message, message_type)

    def decode(self, data: Any, message_type: Any) -> Any:
        if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
            return fast_proto.parse(message_type, data)
        return super().decode(data.tobytes() if isinstance(data, fast_proto.Chunks) else data, message_type)


class _ValidatingCodec(_FastCodec):
    """A request that does not parse is the client's fault: ``INVALID_ARGUMENT`` and one short
    log line at most every 10 seconds (grpclib's default is status UNKNOWN and a full traceback
    per request: a log flood from one bad client)."""

    def __init__(self) -> None:
        self._log = RateLimitedWarning(logging.getLogger("trio_bridge.wire"))

    def decode(self, data: Any, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            problem = f"malformed {getattr(message_type, '__name__', 'message')}: {type(exc).__name__}: {exc}"
            self._log.warn(f"refused a request: {problem}")
            raise GRPCError(Status.INVALID_ARGUMENT, problem) from None


class _CoalescingTransport:
    """A transport whose writes within one loop iteration go out as one write.

    grpclib writes every HTTP/2 frame batch as soon as h2 makes it (grpclib/protocol.py: one
    ``transport.write`` each for a reply's HEADERS, DATA and trailers): three syscalls per unary
    reply, and three wake-ups for a reader that is quick. Holding writes until the loop's next
    iteration makes them one. Everything but ``write`` and ``close`` goes to the wrapped transport.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if len(data) >= _DIRECT_MIN:  # a big frame's body (a memoryview): written as it is, not joined
            self._flush()
            self._transport.write(data)
            return
        if not self._pending:
            if self._loop.is_closed():  # a handler finalised after its loop closed: as grpclib would
                self._transport.write(data)
                return
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():  # a lost connection drops them, as it would
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()  # what grpclib wrote before closing (a GOAWAY) still goes out first
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _FastServer(grpclib.server.Server):
    """A grpclib server whose connections are _FastH2Protocols. Overrides grpclib 0.4's private
    ``Server._protocol_factory`` (server.py), taking the handler, configurations of the
    ``H2Protocol`` it makes (the handler is registered with the server there)."""

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()
        return _FastH2Protocol(made.handler, made.config, made.h2_config)


class _CoalescingServer(_FastServer):
    """A grpclib server whose connections coalesce their writes (``_CoalescingTransport``):
    measured on a worker, a unary call's CPU (host + worker) x0.87-0.95, its latency x0.98.
    Wraps the transport its protocol is given."""

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        connection_made = protocol.connection_made

        def coalescing(transport: asyncio.BaseTransport) -> None:
            loop = asyncio.get_running_loop()
            connection_made(cast(asyncio.Transport, _CoalescingTransport(cast(asyncio.Transport, transport), loop)))

        protocol.connection_made = coalescing
        return protocol


def new_server(services: list[Any], secret: str, *, coalesce_writes: bool = False) -> grpclib.server.Server:
    """A grpclib server for ``services`` that refuses calls without ``secret`` (if not empty)
    and answers malformed requests with ``INVALID_ARGUMENT``; with ``coalesce_writes``, each
    connection sends what it writes in one loop iteration as one write (a worker's replies)."""
    server = (_CoalescingServer if coalesce_writes else _FastServer)(services, codec=_ValidatingCodec())
    if secret:
        require_secret(server, secret)
    return server


# ---- big messages: fewer, larger frames and fewer copies ----
#
# Upstream behaviour worked around (grpclib 0.4.9, h2 4.4.1), on our own connections only (our
# channels' and servers' protocols are _FastH2Protocols; nothing is patched globally):
# * h2 advertises SETTINGS_MAX_FRAME_SIZE 16 KiB (the protocol's default) and grpclib has no
#   setting for it: a 50 MiB message was 3,200 DATA frames each way, each costing h2 and grpclib
#   their per-frame work. Each side now advertises FRAME_SIZE.
# * grpclib's Stream.send_data reads the body through a BytesIO (a copy per frame), and h2
#   copies a DATA frame's body four more times (H2Stream.send_data's memoryview.tobytes(),
#   DataFrame.serialize_body, header + body, its outbound bytearray) and once more in
#   data_to_send(). _FastStream.send_data lets h2 do a big frame's bookkeeping (state machines,
#   flow-control windows) without serializing it, and writes the 9-byte header and the body, as
#   memoryviews of the encoding, itself: no copy before the socket.
# * grpclib's send_message prefixes the encoding with its 5-byte header by concatenation (a
#   copy): a big encoding is a fast_proto.Parts, which prepends the header without copying.
# * h2's FrameBuffer appends what is received to a bytearray, slices each frame out of it and
#   copies the slice again (DataFrame.parse_body): three copies. _FastFrameBuffer hands the body
#   of a big DATA frame to h2 as memoryviews of the received bytes, piece by piece as it arrives.
# * grpclib's Buffer.read joins a message's frames into one bytes (a copy in fresh pages):
#   _FastBuffer.read hands a big message's frames to the codec unjoined (fast_proto.Chunks).
# * A stream's receive window (STREAM_WINDOW) let a big message through 256 KiB at a time, a
#   WINDOW_UPDATE round trip each: before reading a message bigger than its window, a stream
#   widens its window (and the connection's) to the message's size, up to MAX_WINDOW, for good.
#   Backpressure stays bounded: by the largest message a stream has been asked to read, at most
#   MAX_WINDOW; streams of small messages keep STREAM_WINDOW.

FRAME_SIZE = 1 << 20  # SETTINGS_MAX_FRAME_SIZE each side advertises (HTTP/2 allows 16 KiB to 16 MiB)
MAX_WINDOW = 16 << 20  # the widest a stream's (and a connection's) window grows for big messages
_PARTS_MIN = 256 * 1024  # an encoding at least this big goes to the stream as its parts
_CHUNKS_MIN = 256 * 1024  # a message at least this big goes to the codec as its frames
_DIRECT_MIN = 64 * 1024  # a DATA frame at least this big is written (and read) without copies
_FRAME_HEADER = struct.Struct(">HBBBL")  # hyperframe's: length (24 bits), type, flags, stream id
_END_STREAM = 0x1


class _BodyLength:
    """A DATA frame's body as h2 sees it when it does not serialize the frame: its length
    (h2 4.x's H2Connection.send_data and H2Stream.send_data use only ``len()`` of it)."""

    __slots__ = ("_size",)

    def __init__(self, size: int) -> None:
        self._size = size

    def __len__(self) -> int:
        return self._size


class _FastH2Connection(h2.connection.H2Connection):
    """h2's connection, receiving through a _FastFrameBuffer and able to send a DATA frame
    whose body it does not copy (:meth:`data_frame_header`)."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = _FastFrameBuffer(server=not config.client_side)
        self._held: list[Any] | None = None

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        # h2 4.x serializes every frame it sends here, into its outbound buffer.
        if self._held is not None:
            self._held.extend(frames)
        else:
            super()._prepare_for_sending(frames)

    def data_frame_header(self, stream_id: int, size: int, end_stream: bool) -> bytes:
        """``send_data`` for a body of ``size`` bytes that the caller writes itself, right after
        the header this returns: h2 checks the windows and the stream's state and updates them,
        as for any DATA frame; it serializes nothing."""
        self._held = frames = []
        try:
            self.send_data(stream_id, cast(bytes, _BodyLength(size)), end_stream=end_stream)
        finally:
            self._held = None
        (frame,) = frames
        flags = _END_STREAM if "END_STREAM" in frame.flags else 0
        return _FRAME_HEADER.pack((size >> 8) & 0xFFFF, size & 0xFF, 0x0, flags, stream_id & 0x7FFFFFFF)


class _FastConnection(Connection):
    """grpclib's connection (writability, transport), making _FastStreams."""

    def __init__(self, connection: h2.connection.H2Connection, transport: asyncio.Transport, *, config: Configuration) -> None:
        super().__init__(connection, transport, config=config)
        self.window = config.http2_connection_window_size  # the receive windows this side gives
        self.stream_window = config.http2_stream_window_size

    def create_stream(self, *, stream_id: int | None = None, wrapper: Any = None) -> Stream:
        return _FastStream(self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper)


class _FastH2Protocol(H2Protocol):
    """grpclib's protocol on a _FastH2Connection that advertises FRAME_SIZE."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # grpclib 0.4.9's H2Protocol.connection_made, with our connection classes and FRAME_SIZE.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == socket.IPPROTO_TCP:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h2_conn = _FastH2Connection(self.h2_config)
        h2_conn.initiate_connection()
        initial = h2_conn.local_settings.initial_window_size
        if self.config.http2_connection_window_size != initial:
            h2_conn.increment_flow_control_window(self.config.http2_connection_window_size - initial)
        h2_conn.update_settings({
            SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size,
            SettingCodes.MAX_FRAME_SIZE: FRAME_SIZE,
        })
        self.connection = _FastConnection(h2_conn, cast(asyncio.Transport, transport), config=self.config)
        self.connection.flush()
        self.connection.initialize()
        self.processor = EventsProcessor(self.handler, self.connection)


class _FastFrameBuffer(FrameBuffer):
    """h2 4.x's FrameBuffer, but the body of a DATA frame of at least ``_DIRECT_MIN`` bytes
    without padding is not copied: it comes out, as it arrives, as DataFrames each holding a
    memoryview of one received ``bytes`` (h2 sees several DATA frames, the last one with the
    frame's END_STREAM; flow control counts the same bytes). Every other frame is parsed as
    h2 does, from one contiguous copy."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._views: collections.deque[memoryview] = collections.deque()  # received, not yet parsed
        self._size = 0
        self._body_left = 0  # bytes of the current big DATA frame's body still to come
        self._body_stream = 0
        self._body_end = False

    def add_data(self, data: Any) -> None:
        view = memoryview(data if type(data) is bytes else bytes(data)).cast("B")  # ours to keep
        if self._preamble_len:
            of_which_preamble = min(self._preamble_len, len(view))
            if self._preamble[:of_which_preamble] != view[:of_which_preamble]:
                raise ProtocolError("Invalid HTTP/2 preamble.")
            view = view[of_which_preamble:]
            self._preamble_len -= of_which_preamble
            self._preamble = self._preamble[of_which_preamble:]
        if len(view):
            self._views.append(view)
            self._size += len(view)

    def _take(self, size: int) -> bytes:
        """The next ``size`` received bytes, consumed (a copy)."""
        pieces = []
        while size:
            view = self._views[0]
            if len(view) <= size:
                pieces.append(view)
                self._views.popleft()
            else:
                pieces.append(view[:size])
                self._views[0] = view[size:]
            size -= len(pieces[-1])
            self._size -= len(pieces[-1])
        return b"".join(pieces)

    def _peek(self, size: int) -> bytes:
        pieces = []
        for view in self._views:
            pieces.append(view[:size])
            size -= len(pieces[-1])
            if not size:
                break
        return b"".join(pieces)

    def __next__(self) -> Frame:
        if self._body_left:
            return self._next_piece()
        if self._size < 9:
            raise StopIteration
        try:
            f, length = Frame.parse_frame_header(memoryview(self._peek(9)))
        except (InvalidDataError, InvalidFrameError) as err:
            raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
        if type(f) is DataFrame and length >= _DIRECT_MIN and "PADDED" not in f.flags:
            self._validate_frame_length(length)
            self._take(9)
            self._body_left, self._body_stream, self._body_end = length, f.stream_id, "END_STREAM" in f.flags
            return self._next_piece()
        if self._size < length + 9:
            raise StopIteration
        self._validate_frame_length(length)
        frame = self._take(length + 9)
        try:
            f.parse_body(memoryview(frame)[9:])
        except InvalidDataError as err:
            raise ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise FrameDataMissingError("Frame data missing or invalid") from err
        new_frame = self._update_header_buffer(f)
        return new_frame if new_frame is not None else self.__next__()

    def _next_piece(self) -> Frame:
        if not self._size:
            raise StopIteration
        view = self._views[0]
        if len(view) <= self._body_left:
            self._views.popleft()
        else:
            self._views[0] = view[self._body_left :]
            view = view[: self._body_left]
        self._size -= len(view)
        self._body_left -= len(view)
        f = DataFrame(self._body_stream, cast(bytes, view))  # h2 needs only len() of it; grpclib, a buffer
        f.body_len = len(view)
        if self._body_end and not self._body_left:
            f.flags.add("END_STREAM")
        new_frame = self._update_header_buffer(f)  # raises inside a header block, as for any DATA frame
        assert new_frame is f
        return f


class _FastBuffer(Buffer):
    """grpclib's receive buffer; a read of at least ``_CHUNKS_MIN`` bytes first widens the
    stream's window to fit it, and returns the frames' data as a fast_proto.Chunks instead of
    joining it (otherwise grpclib 0.4.9's Buffer.read)."""

    def __init__(self, ack_callback: Any, widen: Any) -> None:
        super().__init__(ack_callback)
        self._widen = widen

    async def read(self, size: int) -> Any:
        if size < _CHUNKS_MIN:
            return await super().read(size)
        if not self._eof and self._acked_size < size:
            self._widen(size)
        if not self._eof or not self._unacked.empty():
            while self._acked_size < size:
                data, data_size, ack_size = await self._unacked.get()
                if not ack_size:
                    break
                self._acked.append(AckedData(memoryview(data), data_size))
                self._acked_size += data_size
                self._ack_callback(ack_size)
        if self._eof and self._acked_size == 0:
            return b""
        if self._acked_size < size:
            raise AssertionError("Received less data than expected")
        chunks: list[memoryview] = []
        chunks_size = 0
        while chunks_size < size:
            chunk, chunk_size = self._acked[0]
            if chunks_size + chunk_size <= size:
                chunks.append(chunk)
                chunks_size += chunk_size
                self._acked.popleft()
            else:
                offset = size - chunks_size
                chunks.append(chunk[:offset])
                chunks_size += offset
                self._acked[0] = AckedData(data=chunk[offset:], data_size=chunk_size - offset)
        self._acked_size -= size
        return fast_proto.Chunks(chunks, size)


class _FastStream(Stream):
    """grpclib's stream, receiving into a _FastBuffer and sending big DATA frames without copies."""

    def init_stream(self, stream_id: int, connection: Connection) -> None:
        super().init_stream(stream_id, connection)
        self.buffer = _FastBuffer(partial(connection.ack, stream_id), self._widen)
        # the receive window this side has given the stream
        self._window = connection.stream_window if isinstance(connection, _FastConnection) else MAX_WINDOW

    def _widen(self, size: int) -> None:
        """Before reading a message of ``size`` bytes: widen the stream's receive window (and the
        connection's) to fit it, up to ``MAX_WINDOW``, for good (h2 keeps a window's widest size)."""
        wanted = min(size, MAX_WINDOW)
        connection = self.connection
        if wanted <= self._window or connection.is_closing() or not isinstance(connection, _FastConnection):
            return
        h2_conn = self._h2_connection
        try:
            h2_conn.increment_flow_control_window(wanted - self._window, self.id)
            self._window = wanted
            if wanted > connection.window:
                h2_conn.increment_flow_control_window(wanted - connection.window)
                connection.window = wanted
        except (ProtocolError, KeyError):  # the stream is closed or gone: nothing more will come
            return
        connection.flush()

    async def send_data(self, data: Any, end_stream: bool = False) -> None:
        """grpclib 0.4.9's Stream.send_data (the same waits for writability and for the
        flow-control window), for ``bytes`` or a fast_proto.Parts, without BytesIO."""
        assert self.id is not None
        buffers = data.buffers if isinstance(data, fast_proto.Parts) else (data,)
        total = len(data)
        h2_conn = self._h2_connection
        index = offset = sent = 0  # the next frame starts at buffers[index][offset:]
        while True:
            await self.connection.write_ready.wait()
            window = h2_conn.local_flow_control_window(self.id)
            if not window > 0:  # it can become negative
                self.window_updated.clear()
                await self.window_updated.wait()
                continue  # other streams may have used the window meanwhile
            size = need = min(window, h2_conn.max_outbound_frame_size, total - sent)
            body: list[Any] = []
            while need:
                buffer = buffers[index]
                available = len(buffer) - offset
                if available <= need:
                    body.append(buffer if offset == 0 else memoryview(buffer)[offset:])
                    need -= available
                    index += 1
                    offset = 0
                else:
                    body.append(memoryview(buffer)[offset : offset + need])
                    offset += need
                    need = 0
            sent += size
            self._send_frame(body, size, end_stream and sent == total)
            self.data_sent += size
            self.connection.data_sent += size
            self.connection.data_send_process()
            if sent == total:
                break

    def _send_frame(self, body: list[Any], size: int, end_stream: bool) -> None:
        assert self.id is not None
        h2_conn = self._h2_connection
        transport = self._transport
        if size < _DIRECT_MIN or not isinstance(h2_conn, _FastH2Connection):
            data = body[0] if len(body) == 1 and type(body[0]) is bytes else b"".join(body)
            h2_conn.send_data(self.id, data, end_stream=end_stream)
            transport.write(h2_conn.data_to_send())
            return
        pending = h2_conn.data_to_send()  # frames h2 queued earlier (window updates...) go first
        if pending:
            transport.write(pending)
        transport.write(h2_conn.data_frame_header(self.id, size, end_stream))
        for piece in body:
            transport.write(piece)
