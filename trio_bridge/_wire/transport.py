"""Addresses and channels, the same on both sides.

Addresses are ``"unix:/path/to.sock"`` or ``"tcp:host:port"``.

Flow control: a stream's HTTP/2 window is what a sender may run ahead of a reader that stopped
reading, so it bounds the backpressure of streaming tools in bytes. grpclib's default (4 MiB)
let a generator of small chunks run ~350,000 chunks ahead of a slow consumer; 256 KiB keeps
that to ~20,000 with no loss of stream throughput (49k chunks/s either way, measured) and bulk
transfers within noise. 64 KiB cost a quarter of stream throughput.
"""

from __future__ import annotations

import logging
import socket
from ssl import SSLContext
from typing import Any

import grpclib.server
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from trio_bridge._wire.auth import RateLimitedWarning, require_secret

STREAM_WINDOW = 256 * 1024  # bytes
CONNECTION_WINDOW = 4 * 1024 * 1024  # bytes: many streams share a connection

_CONFIG = Configuration(http2_stream_window_size=STREAM_WINDOW, http2_connection_window_size=CONNECTION_WINDOW)


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


def open_channel(address: str, ssl: SSLContext | None = None) -> Channel:
    """A grpclib client channel to ``address`` (connects lazily, on the first call); TCP over
    TLS with ``ssl`` (a client context: ``TLSConfig.client_context()``)."""
    scheme, where, port = parse_address(address)
    if scheme == "unix":
        return Channel(path=where, config=_CONFIG)
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


def new_server(services: list[Any], secret: str) -> grpclib.server.Server:
    """A grpclib server for ``services`` that refuses calls without ``secret`` (if not empty)
    and answers malformed requests with ``INVALID_ARGUMENT``."""
    server = grpclib.server.Server(services, codec=_ValidatingCodec())
    if secret:
        require_secret(server, secret)
    return server
