"""Addresses and channels, the same on both sides.

Addresses are ``"unix:/path/to.sock"`` or ``"tcp:host:port"``.

Flow control: a stream's HTTP/2 window is what a sender may run ahead of a reader that stopped
reading, so it bounds the backpressure of streaming tools in bytes. grpclib's default (4 MiB)
let a generator of small chunks run ~350,000 chunks ahead of a slow consumer; 256 KiB keeps
that to ~20,000 with no loss of stream throughput (49k chunks/s either way, measured) and bulk
transfers within noise. 64 KiB cost a quarter of stream throughput.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from ssl import SSLContext
from typing import Any, cast

import grpclib.server
import h2.connection
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol

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


class _AbstractSocketChannel(Channel):
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
        return (_AbstractSocketChannel if where.startswith("\0") else Channel)(path=where, config=_CONFIG)
    return Channel(host=where, port=port, config=_CONFIG, ssl=ssl)


class _ValidatingCodec(ProtoCodec):
    """A request that does not parse is the client's fault: ``INVALID_ARGUMENT`` and one short
    log line at most every 10 seconds (grpclib's default is status UNKNOWN and a full traceback
    per request: a log flood from one bad client)."""

    def __init__(self) -> None:
        self._log = RateLimitedWarning(logging.getLogger("trio_bridge.wire"))

    def decode(self, data: bytes, message_type: Any) -> Any:
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


class _CoalescingServer(grpclib.server.Server):
    """A grpclib server whose connections coalesce their writes (``_CoalescingTransport``):
    measured on a worker, a unary call's CPU (host + worker) x0.87-0.95, its latency x0.98.
    Overrides grpclib 0.4's private ``Server._protocol_factory`` (server.py), wrapping the
    transport its protocol is given; the protocol itself is grpclib's, unchanged."""

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
    server = (_CoalescingServer if coalesce_writes else grpclib.server.Server)(services, codec=_ValidatingCodec())
    if secret:
        require_secret(server, secret)
    return server
