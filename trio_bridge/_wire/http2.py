"""Our HTTP/2 connections (grpclib 0.4.9 over h2 4.4.1), made faster where upstream is slow.

Everything here applies to our own channels and servers only (``transport.py`` makes them with
:class:`FastH2Protocol`), except the deferred frame ``repr`` in h2, which is module-wide and
changes no output. Each workaround names the upstream code it replaces.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
from functools import partial
from typing import Any, cast

import h2
import h2.config
import h2.connection
from grpclib.config import Configuration
from grpclib.protocol import AckedData, Buffer, Connection, EventsProcessor, H2Protocol, Stream
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

from trio_bridge._wire import fast_proto


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

class CoalescingTransport:
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
#   data_to_send(). FastStream.send_data lets h2 do a big frame's bookkeeping (state machines,
#   flow-control windows) without serializing it, and writes the 9-byte header and the body, as
#   memoryviews of the encoding, itself: no copy before the socket.
# * grpclib's send_message prefixes the encoding with its 5-byte header by concatenation (a
#   copy): a big encoding is a fast_proto.Parts, which prepends the header without copying.
# * h2's FrameBuffer appends what is received to a bytearray, slices each frame out of it and
#   copies the slice again (DataFrame.parse_body): three copies. FastFrameBuffer hands the body
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
PARTS_MIN = 256 * 1024  # an encoding at least this big goes to the stream as its parts
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
    """h2's connection, receiving through a FastFrameBuffer and able to send a DATA frame
    whose body it does not copy (:meth:`data_frame_header`)."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.incoming_buffer = FastFrameBuffer(server=not config.client_side)
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
        return FastStream(self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper)


class FastH2Protocol(H2Protocol):
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


class FastFrameBuffer(FrameBuffer):
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


class FastStream(Stream):
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
