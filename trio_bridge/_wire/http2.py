"""Our HTTP/2 connections (grpclib 0.4.9 over h2 4.4.1), made faster where upstream is slow.

Everything here applies to our own channels and servers only (``transport.py`` makes them with
:class:`FastH2Protocol`), except the deferred frame ``repr`` in h2, which is module-wide and
changes no output. Each workaround names the upstream code it replaces. Used only on the
releases :mod:`overrides` lists as tested (else grpclib's stock protocol is).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import h2
import h2.config
import h2.connection
from grpclib.config import Configuration
from grpclib.exceptions import StreamTerminatedError
from grpclib.protocol import AckedData, Buffer, Connection, EventsProcessor, H2Protocol, Stream
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

from trio_bridge._wire import fast_proto

_logger = logging.getLogger("trio_bridge")


class _DeferredRepr:
    """``repr(obj)``, computed only if formatted (``str()``): what h2 logs, when it logs."""

    __slots__ = ("_obj",)

    def __init__(self, obj: object) -> None:
        self._obj = obj

    def __str__(self) -> str:
        return repr(self._obj)

    __repr__ = __str__


def defer_h2_frame_repr() -> None:
    """Stop h2 from formatting every received frame when nothing logs it.

    h2 4.4.1 ``H2Connection._receive_frame`` (h2/connection.py line 1543) runs
    ``self.config.logger.trace("Received frame: %s", repr(frame))`` for every frame, and its
    default logger discards the text. For a DATA frame, hyperframe's ``Frame.__repr__`` copies
    and hex-dumps the whole body (51 us per 16 KiB frame): a few percent of a unary call and a
    large share of a big in-band message. Shadowing the name ``repr`` in that one module (the
    only call of ``repr`` there) makes it a ``_DeferredRepr``: an h2 logger that does log still
    prints the same text (``%s`` formats it with ``str``), only when it formats the message
    rather than when h2 calls it. Applied by :mod:`overrides` on import, by host and worker
    alike, on the h2 releases it lists as tested, where a test checks that this is still the
    module's only ``repr`` call.
    """
    if h2.__version__.startswith("4."):
        h2.connection.__dict__.setdefault("repr", _DeferredRepr)


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
# * grpclib's H2Protocol is given what asyncio reads as a fresh 256 KiB bytes per read (uvloop
#   copies each read into one): page faults on every read. FastH2Protocol is a BufferedProtocol
#   whose FastFrameBuffer says where each read goes: a reused arena between big DATA bodies
#   (after a big body, only the next frame's 9-byte header, so no body lands there), else the
#   buffer of the message being read (below), else fresh memory.
# * grpclib's Buffer.read joins a message's frames into one bytes (a copy in fresh pages):
#   _FastBuffer.read hands a big message's frames to the codec unjoined (fast_proto.Chunks) or,
#   when most of it is still to come, has the frame buffer receive the rest straight into one
#   buffer of its own (fast_proto.Owned), placed so that the codec uses its big value in place:
#   the kernel's copy is then the only one on the receiving side.
# * h2 sets the frame size it allows once per receive_data call: _FastH2Connection._receive_frame.
# * A Unix socket's default send buffer (208 KiB) cost each side a wake-up per 200 KiB: our Unix
#   sockets ask for _UNIX_SNDBUF.
# * A stream's receive window (STREAM_WINDOW) let a big message through 256 KiB at a time, a
#   WINDOW_UPDATE round trip each: before reading a message bigger than its window, a stream
#   widens its window (and the connection's) to the message's size, up to MAX_WINDOW, for good.
#   Backpressure stays bounded: by the largest message a stream has been asked to read, at most
#   MAX_WINDOW; streams of small messages keep STREAM_WINDOW.

FRAME_SIZE = 1 << 20  # SETTINGS_MAX_FRAME_SIZE each side advertises (HTTP/2 allows 16 KiB to 16 MiB)
MAX_WINDOW = 16 << 20  # the widest a stream's (and a connection's) window grows for big messages
PARTS_MIN = 256 * 1024  # an encoding at least this big goes to the stream as its parts
_CHUNKS_MIN = 256 * 1024  # a message at least this big goes to the codec as its frames
_UNIX_SNDBUF = FRAME_SIZE  # a Unix socket's send buffer holds at least a big frame
_HEAD = 4096  # ... and once this much of it is here, the rest is received into its own buffer
_GUESS = 64 * 1024  # the most of a message's start owned_buffer looks at
_DIRECT_MIN = 64 * 1024  # a DATA frame at least this big is written (and read) without copies
_ARENA = 256 * 1024  # a connection receives what is not a big DATA body here (reused; asyncio reads 256 KiB)
_LANDING = 256 * 1024  # the most a big DATA body outside any reservation receives into fresh memory at once
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
        self.incoming_buffer: FastFrameBuffer = FastFrameBuffer(server=not config.client_side)
        self._held: list[Any] | None = None

    def _receive_frame(self, frame: Any) -> Any:
        # h2 4.4.1 gives its frame buffer the frame size it allows (max_inbound_frame_size) once
        # per receive_data call (connection.py line 1516), so a peer's SETTINGS ACK and a big
        # frame received together failed (FrameTooLargeError: the connection dropped; the first
        # big message over TCP, every time). The size it allows now is for the next frame.
        events = super()._receive_frame(frame)
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        return events

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


#: The same, for the host's call streams, which speak h2 from Trio (``_host/_call_stream.py``).
FastH2Connection = _FastH2Connection


class _FastConnection(Connection):
    """grpclib's connection (writability, transport), making _FastStreams."""

    def __init__(self, connection: h2.connection.H2Connection, transport: asyncio.Transport, *, config: Configuration) -> None:
        super().__init__(connection, transport, config=config)
        self.window = config.http2_connection_window_size  # the receive windows this side gives
        self.stream_window = config.http2_stream_window_size

    def create_stream(self, *, stream_id: int | None = None, wrapper: Any = None) -> Stream:
        return FastStream(self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper)

    def close(self) -> None:
        # grpclib 0.4.9 calls close() too when a keepalive PING went unanswered (Connection._ping
        # sets _close_by_ping_handler; an ACK clears it). A graceful close then waits for that
        # silent peer: over TLS for its close_notify (30 s, asyncio's and uvloop's
        # ssl_shutdown_timeout), with unsent data until TCP gives up (minutes); and only then
        # do the connection's handlers learn of it. So with a PING outstanding, abort.
        if self._close_by_ping_handler is not None and hasattr(self, "_transport"):
            # said once per connection: a peer that went silent is otherwise invisible in the log
            _logger.warning("the peer at %s did not answer a keepalive PING in time: connection dropped", _peer(self._transport))
            self._transport.abort()
        super().close()


def _peer(transport: asyncio.BaseTransport) -> str:
    """The far end's address, as ``HOST:PORT`` where it has one."""
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else repr(peer)


if TYPE_CHECKING:
    _ProtocolBase = H2Protocol  # what grpclib (and transport.py) take it for
else:

    class _ProtocolBase(asyncio.BufferedProtocol):
        """grpclib 0.4.9's H2Protocol (its methods, unchanged), as an asyncio.BufferedProtocol
        and not an asyncio.Protocol: uvloop 0.2x reads into a protocol's buffers only if it is
        not an ``asyncio.Protocol`` (handles/stream.pyx ``_set_protocol`` and sslproto.pyx),
        and H2Protocol is one. grpclib uses only the attributes these methods set."""

        __init__ = H2Protocol.__init__
        data_received = H2Protocol.data_received
        pause_writing = H2Protocol.pause_writing
        resume_writing = H2Protocol.resume_writing
        connection_lost = H2Protocol.connection_lost


class FastH2Protocol(_ProtocolBase):
    """grpclib's protocol on a _FastH2Connection that advertises FRAME_SIZE, receiving into
    buffers its FastFrameBuffer chooses (``get_buffer``) instead of grpclib's
    ``data_received`` of the fresh 256 KiB ``bytes`` asyncio makes for every read (page faults
    on every read: ~57 ms per 50 MiB each side), which a big message's frames then held. Every
    transport we use calls ``get_buffer``: asyncio's socket and SSL transports and uvloop's stream and SSL transports; ``data_received``
    stays for any other."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # grpclib 0.4.9's H2Protocol.connection_made, with our connection classes and FRAME_SIZE.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == socket.IPPROTO_TCP:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None and sock.family == socket.AF_UNIX and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _UNIX_SNDBUF:
            # Linux's default (208 KiB) moves a big message ~200 KiB per write, read and wake-up
            # on each side (the loops' work per wake-up cost the host more than the copies); the
            # kernel doubles it and caps it at net.core.wmem_max. TCP tunes its own buffers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SNDBUF)
        h2_conn = _FastH2Connection(self.h2_config)
        h2_conn.initiate_connection()
        initial = h2_conn.local_settings.initial_window_size
        if self.config.http2_connection_window_size != initial:
            h2_conn.increment_flow_control_window(self.config.http2_connection_window_size - initial)
        h2_conn.update_settings({
            SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size,
            SettingCodes.MAX_FRAME_SIZE: FRAME_SIZE,
        })
        self._frames = h2_conn.incoming_buffer
        self.connection = _FastConnection(h2_conn, cast(asyncio.Transport, transport), config=self.config)
        self.connection.flush()
        self.connection.initialize()
        self.processor = EventsProcessor(self.handler, self.connection)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._frames.received(nbytes)
        except ProtocolError:  # not HTTP/2's preamble: as grpclib's data_received does
            logging.getLogger("grpclib.protocol").debug("Protocol error", exc_info=True)
            self.processor.close("Protocol error")
            return
        self.data_received(b"")  # h2 parses what arrived, as if it had been given it


class _Reservation:
    """Where the next DATA bytes of one stream go: ``view[pos:]`` (the rest of a message that
    the stream is reading into a buffer of its own)."""

    __slots__ = ("__weakref__", "pos", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def close(self) -> None:
        self.pos = len(self.view)


class FastFrameBuffer(FrameBuffer):
    """h2 4.x's FrameBuffer, but the body of a DATA frame of at least ``_DIRECT_MIN`` bytes
    without padding is not copied: it comes out, as it arrives, as DataFrames each holding a
    memoryview of the received bytes (h2 sees several DATA frames, the last one with the
    frame's END_STREAM; flow control counts the same bytes). Every other frame is parsed as
    h2 does, from one contiguous copy.

    It also receives (:meth:`receive_buffer`, :meth:`received`: FastH2Protocol's get_buffer and
    buffer_updated): bytes between big DATA bodies into a reused arena, the body of a big DATA
    frame into the buffer of the message its stream is reading (:meth:`reserve`), or else into
    fresh memory. Whatever it hands to h2 lies outside the arena."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._views: collections.deque[memoryview] = collections.deque()  # received, not yet parsed
        self._size = 0
        self._body_left = 0  # bytes of the current big DATA frame's body still to come
        self._body_stream = 0
        self._body_end = False
        self._reservations: weakref.WeakValueDictionary[int, _Reservation] = weakref.WeakValueDictionary()
        self._arena: bytearray | None = None  # made on the first receive_buffer()
        self._arena_end = 0  # the arena's bytes past this are free
        self._landing: memoryview | None = None  # what receive_buffer() handed out last
        self._landing_reservation: _Reservation | None = None
        self._spare: memoryview | None = None  # the unfilled end of the last fresh landing
        self._placed: memoryview | None = None  # received straight into its stream's reservation
        self._header_next = False  # receive a frame header alone, so no big body lands in the arena

    def reserve(self, stream_id: int, view: memoryview) -> _Reservation:
        """The next ``len(view)`` bytes of stream ``stream_id``'s DATA go into ``view``, in order,
        until the reservation is full or closed or the caller drops it. A DATA frame (or part of
        one) that does not fit closes it: what it placed is always the start of ``view``."""
        reservation = self._reservations[stream_id] = _Reservation(view)
        return reservation

    def add_data(self, data: Any) -> None:
        self._append(memoryview(data if type(data) is bytes else bytes(data)).cast("B"))  # ours to keep

    def _append(self, view: memoryview) -> None:
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

    def receive_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty); :meth:`received` says how many came."""
        left = self._body_left
        if left and not self._size:  # within a big DATA body
            reservation = self._reservations.get(self._body_stream)
            if reservation is not None and reservation.pos < len(reservation.view):
                size = min(left, len(reservation.view) - reservation.pos)
                self._landing_reservation = reservation
                self._landing = reservation.view[reservation.pos : reservation.pos + size]
                return self._landing
            self._landing_reservation = None
            spare = self._spare  # the rest of the last one, unless it is too big or small
            if spare is None or not min(left, _DIRECT_MIN) <= len(spare) <= left:
                spare = self._spare = memoryview(bytearray(min(left, _LANDING)))
            self._landing = spare
            return spare
        self._spare = self._landing_reservation = None
        if self._arena is None:
            self._arena = bytearray(_ARENA)
        if not self._size:
            self._arena_end = 0
            if self._header_next:
                self._landing = memoryview(self._arena)[:9]
                return self._landing
        else:  # a frame's start is here: room for at least its rest
            need = 9 - self._size
            if need <= 0:
                need = max(int.from_bytes(self._peek(3), "big") + 9 - self._size, 1)
            if _ARENA - self._arena_end < need:
                if self._size + need > _ARENA:  # a frame bigger than the arena (not a big DATA body)
                    self._landing = memoryview(bytearray(need))
                    return self._landing
                pending = self._take(self._size)
                self._arena[: len(pending)] = pending
                self._views.append(memoryview(self._arena)[: len(pending)])
                self._size = self._arena_end = len(pending)
        self._landing = memoryview(self._arena)[self._arena_end :]
        return self._landing

    def received(self, size: int) -> None:
        """``size`` bytes arrived at the start of what :meth:`receive_buffer` handed out."""
        landing = self._landing
        if landing is None or not 0 < size <= len(landing):
            raise RuntimeError(f"received {size} bytes into {'nothing' if landing is None else len(landing)}")
        self._landing = None
        view = landing[:size]
        reservation = self._landing_reservation
        if reservation is not None:
            self._landing_reservation = None
            reservation.pos += size
            self._placed = view
        elif landing.obj is self._arena:
            self._arena_end += size
            self._header_next = False
        elif landing is self._spare:
            self._spare = landing[size:] if size < len(landing) else None
        self._append(view)

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
        if new_frame is None:
            return self.__next__()
        if type(new_frame) is DataFrame and self._reservations and new_frame.data:
            reservation = self._reservations.get(new_frame.stream_id)
            placed = None if reservation is None else self._place(reservation, memoryview(new_frame.data), whole=True)
            if placed is not None:
                new_frame.data = cast(bytes, placed)
        return new_frame

    def _next_piece(self) -> Frame:
        if not self._size:
            raise StopIteration
        view = self._views.popleft()
        piece = view[: self._body_left] if len(view) > self._body_left else view
        if piece is not self._placed:  # not received straight into its place
            reservation = self._reservations.get(self._body_stream) if self._reservations else None
            placed = None if reservation is None else self._place(reservation, piece, whole=False)
            if placed is not None:
                piece = placed
            elif piece.obj is self._arena:  # the arena is reused: out of it
                piece = memoryview(piece.tobytes())
        self._placed = None
        if len(piece) < len(view):
            self._views.appendleft(view[len(piece) :])
        self._size -= len(piece)
        self._body_left -= len(piece)
        f = DataFrame(self._body_stream, cast(bytes, piece))  # h2 needs only len() of it; grpclib, a buffer
        f.body_len = len(piece)
        if not self._body_left:
            if self._body_end:
                f.flags.add("END_STREAM")
            else:  # its stream's next DATA frame is likely next: its header alone is received first
                self._header_next = True
        new_frame = self._update_header_buffer(f)  # raises inside a header block, as for any DATA frame
        assert new_frame is f
        return f

    def _place(self, reservation: _Reservation, data: memoryview, *, whole: bool) -> memoryview | None:
        """``data`` copied into ``reservation``, or only its start if it fills it and not
        ``whole``; None if none of it fits (the reservation closes: what follows would be out
        of order)."""
        room = len(reservation.view) - reservation.pos
        size = len(data) if len(data) <= room else 0 if whole else room
        if not size:
            reservation.close()
            return None
        place = reservation.view[reservation.pos : reservation.pos + size]
        place[:] = data[:size]
        reservation.pos += size
        return place


class _FastBuffer(Buffer):
    """grpclib's receive buffer; a read of at least ``_CHUNKS_MIN`` bytes first widens the
    stream's window to fit it, and returns the frames' data as a fast_proto.Chunks instead of
    joining it (otherwise grpclib 0.4.9's Buffer.read). Once ``_HEAD`` bytes of it are here and
    more is to come, the message is received into a buffer of its own instead (a
    fast_proto.Owned, in which the frame buffer places the stream's DATA as it arrives:
    ``reserve``)."""

    def __init__(self, ack_callback: Any, widen: Any, reserve: Any = None) -> None:
        super().__init__(ack_callback)
        self._widen = widen
        self._reserve = reserve
        self._sink: Any = None  # while set, what arrives goes there at once (divert), not to _unacked
        self._owed = 0  # bytes a sink took and h2 was not yet told of (acknowledged in batches)
        self.ack_batch = 0  # bytes: see FastStream.divert

    def add(self, data: Any, ack_size: int) -> None:
        sink = self._sink
        if sink is None:
            super().add(data, ack_size)
            return
        self._owe(ack_size)
        if data:
            sink(data)

    def _owe(self, size: int) -> None:
        """``size`` bytes taken by a sink: acknowledged once ``ack_batch`` of them are (each
        acknowledgement costs h2 its bookkeeping; the peer's window stays open meanwhile)."""
        self._owed += size
        if self._owed >= self.ack_batch:
            self._ack_callback(self._owed)
            self._owed = 0

    def eof(self) -> None:
        sink = self._sink
        if sink is None:
            super().eof()
            return
        self._eof = True
        sink(None)

    def divert(self, sink: Any, *, acknowledge: bool = True) -> None:
        """See :meth:`FastStream.divert`; ``acknowledge``: back to queueing, tell h2 of what
        the sink took (not on a connection that is gone)."""
        self._sink = sink
        if sink is None:
            if self._owed and acknowledge:
                self._ack_callback(self._owed)
            self._owed = 0
            return
        acked, self._acked = self._acked, collections.deque()
        self._acked_size = 0
        while acked:
            if self._sink is not sink:  # it went back to queueing: the rest stays to be read
                self._acked.extend(acked)
                self._acked_size += sum(size for _, size in acked)
                return
            sink(acked.popleft().data)
        while self._sink is sink and not self._unacked.empty():
            data, _, ack_size = self._unacked.get_nowait()  # (b"", 0, 0): the end's mark, or an empty frame
            self._owe(ack_size)
            if data:
                sink(data)
        if self._sink is sink and self._eof and self._unacked.empty():
            sink(None)

    def unread(self, data: Any) -> None:
        """Put ``data`` (acknowledged already) back before what is still to be read."""
        if len(data):
            self._acked.appendleft(AckedData(memoryview(data), len(data)))
            self._acked_size += len(data)

    async def read(self, size: int) -> Any:
        if size < _CHUNKS_MIN:
            return await super().read(size)
        if not self._eof and self._acked_size < size:
            self._widen(size)
        if not self._eof or not self._unacked.empty():
            while self._acked_size < size:
                if self._unacked.empty() and self._reserve is not None and self._acked_size >= _HEAD and not self._eof:
                    return await self._read_owned(size)  # all that came is in _acked, the rest is to come
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

    async def _read_owned(self, size: int) -> Any:
        """The rest of ``read(size)`` once at least ``_HEAD`` bytes of it are here, in ``_acked``,
        and no more: they are copied into a new buffer, the rest is placed there by the frame
        buffer as it arrives (or copied, what it did not place)."""
        head = bytearray()  # enough of the start for owned_buffer to find the big value in it
        for chunk, _ in self._acked:
            head += chunk[: _GUESS - len(head)]
            if len(head) == _GUESS:
                break
        owned = fast_proto.owned_buffer(size, head)
        view = owned.buffers[0]
        pos = 0
        for chunk, chunk_size in self._acked:
            view[pos : pos + chunk_size] = chunk
            pos += chunk_size
        self._acked.clear()
        self._acked_size = 0
        reservation = self._reserve(view[pos:])
        try:
            while pos < size:
                data, data_size, ack_size = await self._unacked.get()
                if not ack_size:
                    break
                self._ack_callback(ack_size)
                data = memoryview(data)
                if data.obj is view.obj:  # placed by the frame buffer, right after what came before
                    pos += data_size
                    continue
                used = min(data_size, size - pos)
                view[pos : pos + used] = data[:used]
                pos += used
                if used < data_size:
                    self._acked.append(AckedData(data[used:], data_size - used))
                    self._acked_size += data_size - used
        except BaseException:  # what came stays for a next read, as with grpclib's Buffer
            self._acked.appendleft(AckedData(view[:pos], pos))
            self._acked_size += pos
            raise
        finally:
            reservation.close()
        if pos < size:
            raise AssertionError("Received less data than expected")
        return owned


class FastStream(Stream):
    """grpclib's stream, receiving into a _FastBuffer and sending big DATA frames without copies."""

    def init_stream(self, stream_id: int, connection: Connection) -> None:
        super().init_stream(stream_id, connection)
        frames = self._h2_connection.incoming_buffer
        reserve = partial(frames.reserve, stream_id) if isinstance(frames, FastFrameBuffer) else None
        self.buffer = _FastBuffer(partial(connection.ack, stream_id), self._widen, reserve)
        # the receive window this side has given the stream
        self._window = connection.stream_window if isinstance(connection, _FastConnection) else MAX_WINDOW

    def divert(self, sink: Any) -> None:
        """Hand what this stream receives to ``sink`` instead of queueing it for
        :meth:`recv_data`: each DATA frame's data (``bytes`` or a ``memoryview`` of it, valid
        after the call), and ``None`` once the peer ended the stream; first what came and was
        not read yet, in order. What it is handed is acknowledged for flow control in batches
        of up to a quarter of the stream's receive window (the peer can always send on).
        ``None`` instead of a sink: back to queueing (what was handed over is acknowledged
        then). A sink may divert back to queueing (and :meth:`unread` what it took and did not
        use) while it is called."""
        buffer = self.buffer
        assert isinstance(buffer, _FastBuffer)
        buffer.ack_batch = self._window // 4
        buffer.divert(sink, acknowledge=not self.connection.is_closing())

    def unread(self, data: Any) -> None:
        """Put ``data`` back before what :meth:`recv_data` reads next (it was received and
        acknowledged: a diverted stream's sink took it and did not use it)."""
        buffer = self.buffer
        assert isinstance(buffer, _FastBuffer)
        buffer.unread(data)

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
            if self._transport.is_closing():
                # The connection is gone (its peer died): grpclib would write the rest frame by
                # frame into the closed transport, and asyncio log a warning for each write past
                # the fifth ("socket.send() raised exception.").
                raise StreamTerminatedError("Connection lost")
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

    def send_now(self, data: bytes) -> bool:
        """``data`` as one DATA frame, written now, if nothing would make :meth:`send_data`
        wait: the connection writable and open, the windows and the frame size big enough;
        True if so, else False (nothing sent)."""
        assert self.id is not None
        h2_conn = self._h2_connection
        transport = self._transport
        size = len(data)
        if (
            not self.connection.write_ready.is_set() or transport.is_closing()
            or size > h2_conn.max_outbound_frame_size or size > h2_conn.local_flow_control_window(self.id)
        ):
            return False
        if isinstance(h2_conn, _FastH2Connection):  # h2's bookkeeping without its serializing and copies
            pending = h2_conn.data_to_send()  # what h2 queued before (window updates...) goes first
            transport.write(b"".join((pending, h2_conn.data_frame_header(self.id, size, False), data)))
        else:
            h2_conn.send_data(self.id, data)
            transport.write(h2_conn.data_to_send())
        self.data_sent += size
        self.connection.data_sent += size
        self.connection.data_send_process()
        return True

    def _send_frame(self, body: list[Any], size: int, end_stream: bool) -> None:
        assert self.id is not None
        h2_conn = self._h2_connection
        transport = self._transport
        if size < _DIRECT_MIN or not isinstance(h2_conn, _FastH2Connection):
            data = body[0] if len(body) == 1 and type(body[0]) is bytes else b"".join(body)
            h2_conn.send_data(self.id, data, end_stream=end_stream)
            transport.write(h2_conn.data_to_send())
            return
        # Frames h2 queued earlier (window updates...) go first, then the header: one write with
        # the small pieces that follow it (a message's first frame has a few field headers before
        # its big value); a big piece is written as it is.
        small = bytearray(h2_conn.data_to_send())
        small += h2_conn.data_frame_header(self.id, size, end_stream)
        for piece in body:
            if len(piece) < _DIRECT_MIN:
                small += piece
                continue
            if small:
                transport.write(bytes(small))
                small.clear()
            if transport.is_closing():  # lost mid-frame: the rest would be written into nothing
                raise StreamTerminatedError("Connection lost")
            transport.write(piece)
        if small:
            transport.write(bytes(small))
