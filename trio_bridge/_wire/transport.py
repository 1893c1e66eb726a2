"""Addresses and channels, the same on both sides.

Addresses are ``"unix:/path/to.sock"`` or ``"tcp:host:port"``.

Flow control: a stream's HTTP/2 window is what a sender may run ahead of a reader that stopped
reading, so it bounds the backpressure of streaming tools in bytes. grpclib's default (4 MiB)
let a generator of small chunks run ~350,000 chunks ahead of a slow consumer; 256 KiB keeps
that to ~20,000 with no loss of stream throughput (49k chunks/s either way, measured) and bulk
transfers within noise. 64 KiB cost a quarter of stream throughput. (That is the channels'
window, what a host reads with; servers keep grpclib's 4 MiB.) A stream asked to read a message
bigger than its window widens it to the message's size, at most ``http2.MAX_WINDOW``: a big message
then crosses without a WINDOW_UPDATE round trip every 128 KiB, and streams of small messages
keep their window (see ``http2.py``).

The channel, server and codec classes here choose, once, between our fast paths and grpclib's
stock ones, as :mod:`overrides` decided at import (on untested releases of grpclib, h2,
hyperframe or betterproto2, and with ``TRIO_BRIDGE_STOCK_WIRE``: the stock ones).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Collection, Mapping
from ssl import SSLContext
from typing import Any, cast

import betterproto2
import grpclib.client
import grpclib.server
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import H2Protocol

from trio_bridge._errors import TrioBridgeError
from trio_bridge._wire import call_messages, fast_proto, overrides
from trio_bridge._wire.auth import PeerCheck, require_secret
from trio_bridge._wire.errors import Refusals, StatusDetailsCodec
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.limits import NOT_PROTOBUF, request_problem
from trio_bridge._wire.standard_services import ServingStatus, health_service, with_standard_services

STREAM_WINDOW = 256 * 1024  # bytes
CONNECTION_WINDOW = 4 * 1024 * 1024  # bytes: many streams share a connection

_CONFIG = Configuration(http2_stream_window_size=STREAM_WINDOW, http2_connection_window_size=CONNECTION_WINDOW)


def keepalive_config(seconds: float) -> Configuration:
    """A server's configuration that sends each connection an HTTP/2 PING every ``seconds``
    while it has a stream open, and closes a connection whose PING is unanswered ``seconds``
    later (its RPCs' handlers are cancelled): a peer gone silently (its machine died, a partition)
    is noticed within ``2 * seconds``. Every HTTP/2 client answers PINGs (h2 does it itself).

    grpclib's defaults would send at most 2 PINGs until the server next sends data, and none
    within 300 s of the last: a silent peer of an idle stream would never be noticed. Half the
    interval as that minimum lets a timer that fires a little early still ping.

    On our HTTP/2 protocol the close is an abort (``http2._FastConnection.close``); on grpclib's
    stock one (:mod:`overrides`) it is graceful, which over TLS waits up to 30 s more for the
    silent peer's close_notify before the handlers learn of it. On uvloop, timers run before I/O
    is read: a loop blocked for longer than ``seconds`` just after a PING closes the connection
    even if the ACK came (a host's health check fails such a worker sooner).

    Raises:
        ValueError: ``seconds`` is not positive.
    """
    if not seconds > 0:
        raise ValueError(f"keepalive must be a positive number of seconds, not {seconds!r}")
    return Configuration(
        _keepalive_time=seconds, _keepalive_timeout=seconds, _keepalive_permit_without_calls=False,
        _http2_max_pings_without_data=0, _http2_min_sent_ping_interval_without_data=seconds / 2,
    )


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
        if host.startswith("[") and host.endswith("]"):  # an IPv6 address, as URLs write it
            host = host[1:-1]
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


class _CheckedChannel(Channel):
    """A grpclib channel that fails a call with ``ConnectionResetError`` when its connection is
    lost as it opens. grpclib 0.4's ``Channel.__connect__`` (client.py) returns the protocol it
    made without looking again, and a peer that closes at once (a worker exiting while the pool
    shuts it down) has by then had ``connection_lost`` close it: the call then failed with
    ``AttributeError: ... no attribute '_transport'`` instead of a transport error."""

    async def __connect__(self) -> H2Protocol:
        protocol = await super().__connect__()
        if getattr(protocol.handler, "connection_lost", False):  # a client's Handler has it
            raise ConnectionResetError("the connection closed as it opened (the peer closed it at once)")
        return protocol


class _FastChannel(_CheckedChannel):
    """A grpclib channel whose connections are _FastH2Protocols. Overrides grpclib 0.4's private
    ``Channel._protocol_factory`` (client.py), which makes an ``H2Protocol`` the same way."""

    def _protocol_factory(self) -> H2Protocol:
        from trio_bridge._wire.http2 import FastH2Protocol  # imported only where overrides.HTTP2

        return FastH2Protocol(grpclib.client.Handler(), self._config, self._h2_config)


class _AbstractSocketChannel(_CheckedChannel):
    """A channel to a Linux abstract-namespace Unix socket (a path that starts with NUL) that
    connects the socket itself: uvloop's ``create_unix_connection(path=...)`` hands the path to
    libuv's ``uv_pipe_connect``, which reads it as a NUL-terminated string, so an abstract name
    fails with ``OSError: [Errno 22]`` (MagicStack/uvloop issue 528). A connected socket passed as
    ``sock=`` (public asyncio API) works on every loop. Overrides grpclib 0.4's private
    ``Channel._create_connection`` (client.py), which for a ``path`` does only that call: needed
    for correctness, so kept with grpclib's stock protocol too (:data:`overrides.ABSTRACT`)."""

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


class _FastAbstractSocketChannel(_AbstractSocketChannel, _FastChannel):
    """An _AbstractSocketChannel whose connections are _FastH2Protocols."""


def open_channel(address: str, ssl: SSLContext | None = None, *, server_name: str | None = None) -> Channel:
    """A grpclib client channel to ``address`` (connects lazily, on the first call); TCP over
    TLS with ``ssl`` (a client context: ``TLSConfig.client_context()``), whose peer's
    certificate must name ``server_name`` (default: the address's host; grpclib's
    ``ssl_target_name_override``)."""
    scheme, where, port = parse_address(address)
    plain: type[Channel] = _FastChannel if overrides.HTTP2 else _CheckedChannel
    if scheme == "unix":
        kind = plain
        if where.startswith("\0") and overrides.ABSTRACT:
            kind = _FastAbstractSocketChannel if overrides.HTTP2 else _AbstractSocketChannel
        return kind(path=where, config=_CONFIG, codec=_FastCodec(), status_details_codec=StatusDetailsCodec())
    config = _CONFIG if server_name is None or ssl is None else dataclasses.replace(_CONFIG, ssl_target_name_override=server_name)
    return plain(host=where, port=port, config=config, ssl=ssl, codec=_FastCodec(), status_details_codec=StatusDetailsCodec())


def _parts_min() -> float:
    """The smallest encoding the codec hands to a stream as its parts (FastStreams only)."""
    if not overrides.HTTP2:
        return float("inf")
    from trio_bridge._wire.http2 import PARTS_MIN

    return PARTS_MIN


class _FastCodec(ProtoCodec):
    """grpclib's ``ProtoCodec`` for betterproto2 messages, with :mod:`fast_proto`'s encoding
    (byte-identical to betterproto2's, without its whole-body copies at every nesting level);
    grpclib's own where :data:`overrides.CODEC` is off."""

    _PARTS_MIN = _parts_min()

    def encode(self, message: Any, message_type: Any) -> Any:
        if not isinstance(message, message_type):
            raise TypeError(f"Message must be of type {message_type!r}, not {type(message)!r}")
        if overrides.CODEC and message_type is pb.CallResult and (common := call_messages.encode_result(message)) is not None:
            return common  # a worker's usual answer, by hand
        if overrides.CODEC and isinstance(message, betterproto2.Message):
            parts = fast_proto.serialize(message)
            # Only our streams (FastStream) take Parts: every codec of ours sends through them.
            return parts if len(parts) >= self._PARTS_MIN else parts.tobytes()
        return super().encode(message, message_type)

    def decode(self, data: Any, message_type: Any) -> Any:
        if overrides.CODEC and isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
            return fast_proto.parse(message_type, data)
        return super().decode(data.tobytes() if isinstance(data, fast_proto.Chunks) else data, message_type)


class _ValidatingCodec(_FastCodec):
    """A server's codec, which checks every request before its handler runs: one that does not
    parse, or that breaks a limit (:mod:`limits`), is the client's fault: ``INVALID_ARGUMENT``
    (with an ErrorInfo of kind ``invalid_argument`` naming the problem) and, per kind of problem,
    one short log line at most every 10 seconds (grpclib's default for what does not parse is
    status UNKNOWN and a full traceback per request: a log flood from one bad client)."""

    def __init__(self) -> None:
        self._refusals = Refusals()

    def decode(self, data: Any, message_type: Any) -> Any:
        if overrides.CODEC and message_type is pb.CallMessage and (common := call_messages.parse_execute(data)) is not None:
            return common  # a worker's usual request, by hand: it is within the limits
        try:
            message = super().decode(data, message_type)
        except Exception as exc:
            problem = f"malformed {getattr(message_type, '__name__', 'message')}: {type(exc).__name__}: {exc}"
            raise self._refusals.refuse(NOT_PROTOBUF, problem, type_name="DecodeError") from None
        found = request_problem(message)
        if found is not None:
            kind, problem = found
            raise self._refusals.refuse(kind, problem, type_name="DecodeError" if kind == NOT_PROTOBUF else "InvalidArgumentError")
        return message


class _CheckedServer(grpclib.server.Server):
    """A grpclib server whose connections are each checked by ``peers`` (see :class:`PeerCheck`)
    before their first byte: a security boundary, so on every path. Overrides grpclib 0.4's
    private ``Server._protocol_factory`` (server.py), wrapping the ``H2Protocol`` it makes (the
    handler is registered with the server there)."""

    peers: PeerCheck | None = None

    def _new_protocol(self) -> H2Protocol:
        return super()._protocol_factory()

    def _protocol_factory(self) -> H2Protocol:
        protocol = self._new_protocol()
        peers = self.peers
        if peers is not None:
            connection_made = protocol.connection_made

            def checked(transport: asyncio.BaseTransport) -> None:
                if not peers.refused(transport):
                    connection_made(transport)
                    return
                # Nothing was set up: no HTTP/2 connection to lose, no request to wait for.
                protocol.handler.close()
                protocol.connection_lost = lambda exc: None  # type: ignore[method-assign]

            protocol.connection_made = checked  # type: ignore[method-assign]
        return protocol


class _FastServer(_CheckedServer):
    """A checked server whose connections are _FastH2Protocols, taking the handler and
    configurations of the ``H2Protocol`` grpclib makes."""

    def _new_protocol(self) -> H2Protocol:
        from trio_bridge._wire.http2 import FastH2Protocol  # imported only where overrides.HTTP2

        made = super()._new_protocol()
        return FastH2Protocol(made.handler, made.config, made.h2_config)


class _CoalescingServer(_CheckedServer):
    """A checked server whose connections coalesce their writes (``CoalescingTransport``):
    measured on a worker, a unary call's CPU (host + worker) x0.87-0.95, its latency x0.98.
    Wraps the transport its protocol is given."""

    def _new_protocol(self) -> H2Protocol:
        from trio_bridge._wire.http2 import CoalescingTransport  # imported only where overrides.COALESCE

        protocol = super()._new_protocol()
        connection_made = protocol.connection_made

        def coalescing(transport: asyncio.BaseTransport) -> None:
            loop = asyncio.get_running_loop()
            connection_made(cast(asyncio.Transport, CoalescingTransport(cast(asyncio.Transport, transport), loop)))

        protocol.connection_made = coalescing
        return protocol


class _FastCoalescingServer(_CoalescingServer, _FastServer):
    """A _CoalescingServer whose connections are _FastH2Protocols."""


def new_server(
    services: list[Any], secret: str, *, coalesce_writes: bool = False, allowed_uids: Collection[int] = (),
    keepalive: float | None = None,
) -> tuple[grpclib.server.Server, Any]:
    """A grpclib server for ``services`` and the standard ones (health, reflection: see
    :mod:`standard_services`) that sends an RPC's ErrorInfo in its status details (see
    :mod:`errors`), refuses calls without ``secret`` (if not empty; health
    excepted) and answers malformed requests with ``INVALID_ARGUMENT``; on a Unix socket, it
    closes a connection from another uid than its own, root's and ``allowed_uids`` before any
    byte, health included (:class:`PeerCheck`); with
    ``coalesce_writes``, each connection sends what it writes in one loop iteration as one
    write (a worker's replies); with ``keepalive`` (seconds), it closes a connection whose peer
    stops answering PINGs (see :func:`keepalive_config`). Returns it and its health status
    (``.set(False)``: draining).

    Raises:
        ValueError: ``keepalive`` is not positive.
    """
    everything, health = with_standard_services(services)
    if not hasattr(grpclib.server.Server, "_protocol_factory"):  # where PeerCheck hooks in
        raise TrioBridgeError(
            f"grpclib {overrides.installed_versions()['grpclib']} has no Server._protocol_factory, which the check of "
            f"a Unix socket's peer needs: install a tested release (pip install 'grpclib{overrides.TESTED['grpclib']}')"
        )
    coalesce = coalesce_writes and overrides.COALESCE
    if overrides.HTTP2:
        kind: type[_CheckedServer] = _FastCoalescingServer if coalesce else _FastServer
    else:
        kind = _CoalescingServer if coalesce else _CheckedServer
    config = None if keepalive is None else keepalive_config(keepalive)
    server = kind(everything, codec=_ValidatingCodec(), status_details_codec=StatusDetailsCodec(), config=config)
    server.peers = PeerCheck(allowed_uids)
    if secret:
        require_secret(server, secret)
    return server, health


def new_health_server(statuses: Mapping[str, ServingStatus]) -> grpclib.server.Server:
    """A grpclib server of ``grpc.health.v1.Health`` alone, answering for each service name in
    ``statuses`` with its status: no secret, no reflection, no other RPC (UNIMPLEMENTED), so it
    reveals nothing but those statuses. Serve it without TLS: an orchestrator's probe has none."""
    kind = _FastServer if overrides.HTTP2 else _CheckedServer
    return kind([health_service(statuses)], codec=_ValidatingCodec(), status_details_codec=StatusDetailsCodec())
