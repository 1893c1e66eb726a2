"""A grpclib server stream's messages, taken as they arrive and sent at once, without grpclib's
per-message machinery: the worker's call stream (``worker/_call_stream.py``), where each call is
one small message each way.

grpclib 0.4.9 queues each DATA frame's data in the stream's buffer (an ``asyncio.Queue``), and
the handler's task reads it back on its next turn: ``recv_message`` reads a 5-byte header, then
the body, acknowledging each piece, then dispatches grpclib's ``RecvMessage`` event; sending
goes through the ``SendMessage`` event, two ``struct.pack`` and a wait for writability even when
the connection is writable. :class:`DirectStream` has the stream's :class:`~http2.FastStream`
hand it each DATA frame's data as h2 parses it (``FastStream.divert``): it splits the messages
out itself and hands each one, decoded by the server's codec (the same checks, the same errors),
to its handler at once, within the same turn of the loop. A reply that can go at once (the
connection writable, the windows open) is written at once (``FastStream.send_now``), else as
grpclib would (``FastStream.send_data``, which waits).

Everything else stays grpclib's: the request's headers (and the secret's check), the reply's
headers and trailers, the status a failed handler ends with, ``RST_STREAM`` and ``GOAWAY`` (the
handler is cancelled), keepalive. A message of at least ``BIG`` bytes is read by grpclib's path
(``recv_message``: our fast buffers receive it without copies). Our servers register no
``RecvMessage`` or ``SendMessage`` listeners (only ``RecvRequest``: ``auth.py``), so skipping those
events changes nothing; the connection's message counts are kept as grpclib keeps them (the
server stream's own private ones, which nothing reads, are not). Used where
:data:`overrides.WORKER_CALLS` is on.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

from trio_bridge._wire import overrides

__all__ = ["BIG", "DirectStream"]

BIG = 256 * 1024  # bytes: a message this big is read by grpclib's path (without copies)
_PREFIX = struct.Struct(">?I")  # gRPC's message prefix: compressed flag, length
_BIG_ONE = object()  # what the sink says when a big message comes


class DirectStream:
    """The messages of one grpclib server stream (``grpclib.server.Stream`` on a FastStream),
    received into ``on_message`` as they arrive and sent by :meth:`send_message`. Make one with
    :meth:`of`."""

    def __init__(self, stream: Any, on_message: Callable[[Any], None]) -> None:
        self._stream = stream
        self._h2 = stream._stream
        self._codec = stream._codec
        self._recv_type = stream._recv_type
        self._send_type = stream._send_type
        self._on_message = on_message
        self._pending = b""  # the start of a message whose rest is still to come
        self._headers_sent = False  # every message of the stream is sent here (grpclib sends none)
        self._wake: asyncio.Future[Any] | None = None

    @classmethod
    def of(cls, stream: Any, on_message: Callable[[Any], None]) -> DirectStream | None:
        """A DirectStream for ``stream``, or None where it cannot be one (the wire's stock path,
        a stream not on our HTTP/2 protocol): then use the stream itself."""
        if not overrides.WORKER_CALLS:
            return None
        from trio_bridge._wire.http2 import FastStream

        names = ("_stream", "_codec", "_recv_type", "_send_type")
        if not all(hasattr(stream, name) for name in names) or not isinstance(stream._stream, FastStream):
            return None
        return cls(stream, on_message)

    async def receive(self) -> None:
        """Hand each message the client sends to ``on_message``, as it arrives, until the client
        ends its side of the stream; then return. Raises what grpclib's ``recv_message`` would: a
        message that the server's codec refuses (``GRPCError``), a compressed one
        (``NotImplementedError``), the stream ending inside a message (``AssertionError``)."""
        h2 = self._h2
        while True:
            self._wake = wake = asyncio.get_running_loop().create_future()
            try:
                h2.divert(self._received)
                outcome = await wake
            finally:
                h2.divert(None)
            if outcome is not _BIG_ONE:
                return
            message = await self._stream.recv_message()  # grpclib's path, whose buffers take big ones best
            if message is None:
                return
            self._on_message(message)

    def _received(self, data: Any) -> None:
        """The sink (FastStream.divert): ``data`` received, or None at the stream's end."""
        wake = self._wake
        if wake is None or wake.done():
            return
        if data is None:
            if self._pending:
                wake.set_exception(AssertionError("Received less data than expected"))  # as grpclib's Buffer.read
            else:
                wake.set_result(None)
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        pos, end = 0, len(data)
        try:
            while end - pos >= 5:
                compressed, size = _PREFIX.unpack_from(data, pos)
                if compressed:
                    raise NotImplementedError("Compression not implemented")  # as grpclib's recv_message
                if size >= BIG:
                    self._h2.divert(None)
                    self._h2.unread(data[pos:])
                    wake.set_result(_BIG_ONE)
                    return
                if end - pos - 5 < size:
                    break
                body = bytes(data[pos + 5 : pos + 5 + size])
                pos += 5 + size
                message = self._codec.decode(body, self._recv_type)
                self._count(received=True)
                self._on_message(message)
        except Exception as exc:
            self._h2.divert(None)
            wake.set_exception(exc)
            return
        if pos < end:
            self._pending = bytes(data[pos:])

    def _count(self, *, received: bool) -> None:
        """The connection's statistics, as grpclib's ``recv_message`` and ``send_message`` keep them."""
        connection = self._h2.connection
        if received:
            connection.messages_received += 1
            connection.last_message_received = time.monotonic()
        else:
            connection.messages_sent += 1
            connection.last_message_sent = time.monotonic()

    async def send_message(self, message: Any) -> None:
        """grpclib's ``Stream.send_message(message)``: the reply's headers first if not sent yet,
        then the message, written at once where nothing makes it wait. Raises as grpclib's would
        (the connection lost: ``StreamTerminatedError``)."""
        if not self._headers_sent:
            await self._stream.send_initial_metadata()
            self._headers_sent = True
        encoded = self._codec.encode(message, self._send_type)
        data = _PREFIX.pack(False, len(encoded)) + encoded  # a big encoding's Parts prepends it without a copy
        if type(data) is not bytes or not self._h2.send_now(data):
            await self._h2.send_data(data)
        self._count(received=False)
