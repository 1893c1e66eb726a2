"""The floor of an in-band round trip to a remote worker: ``n`` bytes sent over one TCP connection
(plain, or with mutual TLS from Python's ``ssl``) to an echo process that receives all of them
and then sends them back, blocking sockets, nothing of ours.

    python -m benchmarks.bulk_floor serve HOST N [CERT KEY CA]   # prints its port, then echoes

:class:`BulkEcho` is the client side.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

_CHUNK = 1 << 20  # what one recv_into/send asks for


def _receive(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got : got + _CHUNK])
        if not n:
            raise ConnectionError(f"the peer closed after {got} of {len(view)} bytes")
        got += n


def _send(sock: socket.socket, view: memoryview) -> None:
    for start in range(0, len(view), _CHUNK):
        sock.sendall(view[start : start + _CHUNK])


def serve(host: str, n: int, tls: tuple[str, str, str] | None) -> None:
    listener = socket.create_server((host, 0))
    print(listener.getsockname()[1], flush=True)
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[0], tls[1])
        context.load_verify_locations(tls[2])
        context.verify_mode = ssl.CERT_REQUIRED
        sock = context.wrap_socket(sock, server_side=True)
    view = memoryview(bytearray(n))
    with sock:
        while True:
            try:
                _receive(sock, view)
            except ConnectionError:
                return
            _send(sock, view)


@contextlib.contextmanager
def echo_server(host: str, n: int, tls: tuple[str, str, str] | None) -> Iterator[int]:
    """A ``serve`` process on ``host``; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bulk_floor", "serve", host, str(n), *(tls or ())], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()


class BulkEcho:
    """A connection to a ``serve`` process on ``host`` for ``n``-byte round trips (TLS when given:
    ``(cert, key, ca)`` for each side); use it as a context manager."""

    def __init__(
        self, host: str, n: int, *, server_tls: tuple[str, str, str] | None = None,
        client_tls: tuple[str, str, str] | None = None, server_name: str | None = None,
    ) -> None:
        self.host, self.n, self.server_tls, self.client_tls, self.server_name = host, n, server_tls, client_tls, server_name
        self.data = memoryview(bytearray(i % 251 for i in range(256)) * (n // 256 + 1))[:n]
        self.back = memoryview(bytearray(n))
        self._stack = contextlib.ExitStack()
        self._sock: socket.socket | None = None

    def __enter__(self) -> BulkEcho:
        port = self._stack.enter_context(echo_server(self.host, self.n, self.server_tls))
        sock = socket.create_connection((self.host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.client_tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.client_tls[2])
            context.load_cert_chain(self.client_tls[0], self.client_tls[1])
            sock = context.wrap_socket(sock, server_hostname=self.server_name or self.host)
        self._sock = self._stack.enter_context(sock)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def round_trip(self) -> float:
        """Seconds to send the ``n`` bytes and receive them back; raises if they came back changed."""
        assert self._sock is not None
        self.back[:1] = b"\xff"  # the first byte sent is 0
        t0 = time.perf_counter()
        _send(self._sock, self.data)
        _receive(self._sock, self.back)
        elapsed = time.perf_counter() - t0
        if self.back[:4096] != self.data[:4096] or self.back[-4096:] != self.data[-4096:]:
            raise RuntimeError("the bulk echo came back changed")
        return elapsed


if __name__ == "__main__":
    _, command, host, size, *paths = sys.argv
    assert command == "serve"
    serve(host, int(size), (paths[0], paths[1], paths[2]) if paths else None)
