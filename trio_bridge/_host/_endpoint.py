"""A pool's HTTP endpoint (``open_pool(metrics_address=...)``), read-only: ``/metrics``, its
registry as Prometheus text, and ``/status``, a JSON snapshot of the pool for ``trio-bridge
top`` -- workers, queue, calls, sessions, recent errors. Served by prometheus_client's own
threaded WSGI server; its threads end with the pool.

``/metrics`` is open to whoever reaches the address (Prometheus scrapes it). ``/status`` shows
pids, addresses and recent error text (which can hold user data): beyond loopback it answers
only a request bearing the pool's token (``Authorization: Bearer TOKEN``), unless the pool was
opened with ``status_public=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

import trio
from prometheus_client.registry import CollectorRegistry

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.auth import RateLimitedWarning
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.contract import METRICS_PATH, STATUS_PATH
from trio_bridge._wire.listeners import MIN_TOKEN, loopback
from trio_bridge._wire.transport import parse_address


class Endpoint(NamedTuple):
    """Where a pool serves its endpoint, and the token ``/status`` asks for (``None``: none)."""

    host: str
    port: int
    status_token: str | None


def checked_metrics_address(address: Any, *, token: Any, status_public: Any) -> Endpoint | None:
    """``open_pool(metrics_address=, token=, status_public=)``: ``None``, or ``"HOST:PORT"``
    (``tcp:`` optional; port 0 picks a free one). On loopback ``/status`` is open; on any other
    address (a wildcard such as ``0.0.0.0`` or ``::`` included, and any host name but
    ``localhost``) it asks for ``token`` as a bearer, unless ``status_public`` is true.

    Raises:
        InvalidArgumentError: the address is not of that form; ``status_public`` is not a bool;
            or the address is not loopback and there is neither a token (>= 16 characters) nor
            ``status_public=True`` (the message says which to give).
    """
    if address is None:
        return None
    if not isinstance(address, str):
        raise InvalidArgumentError(f"metrics_address must be 'HOST:PORT', not {short_repr(address)}")
    try:
        _, host, port = parse_address(address if address.startswith("tcp:") else f"tcp:{address}")
    except ValueError as exc:
        raise InvalidArgumentError(f"metrics_address: {exc}") from None
    if status_public is not None and not isinstance(status_public, bool):
        raise InvalidArgumentError(f"status_public must be True or False, not {short_repr(status_public)}")
    if loopback(host) or status_public:
        return Endpoint(host, port, None)
    if token is None:
        raise InvalidArgumentError(
            f"metrics_address {host}:{port} is not loopback, and its /status shows the pool's pids, addresses "
            "and recent error text to whoever reaches it: give token=... (a shared secret of at least "
            f"{MIN_TOKEN} characters, which `trio-bridge top --token-file FILE` sends), bind 127.0.0.1, or "
            "pass status_public=True (TRIO_BRIDGE_STATUS_PUBLIC=1) to show it to anyone; /metrics stays open either way"
        )
    if not isinstance(token, str) or len(token) < MIN_TOKEN:
        raise InvalidArgumentError(
            f"token must be a shared secret of at least {MIN_TOKEN} characters (it guards /status on {host}:{port})"
        )
    return Endpoint(host, port, token)


def pool_status(
    *, adapter: str, workers: Callable[[], Iterable[Any]], statistics: Callable[[], Any],
    recent_errors: Callable[[], Iterable[dict[str, object]]], gauges: Callable[[], dict[str, int]],
) -> dict[str, Any]:
    """The ``/status`` document: ``{"adapter", "time" (Unix seconds), "statistics" (as
    ``PoolStatistics``), "workers" (as ``WorkerInfo`` each), "state" ({"sessions", "variables",
    "watchers"}, what the backend counts), "recent_errors" ([{"time", "tool", "outcome",
    "error"}])}``. Read from another thread than the pool's: a read racing a change is tried again."""
    def read() -> dict[str, Any]:
        stats = statistics()
        return {
            "adapter": adapter, "time": time.time(),
            "statistics": {**dataclasses.asdict(stats), "calls": stats.calls},
            "workers": [dataclasses.asdict(w) for w in workers()],
            "state": gauges(), "recent_errors": list(recent_errors()),
        }

    for _ in range(2):
        with contextlib.suppress(RuntimeError):  # a dict changed size while we read it
            return read()
    return read()


@contextlib.asynccontextmanager
async def serving(
    registry: CollectorRegistry, endpoint: Endpoint, status: Callable[[], dict[str, Any]],
) -> AsyncIterator[str]:
    """Serve ``/metrics`` (``registry``) and ``/status`` (``status()`` as JSON) on
    ``http://HOST:PORT`` (``endpoint``) while the block runs; yields ``"HOST:PORT"`` as bound.
    ``/status`` answers 401 (``WWW-Authenticate: Bearer``) to a request without
    ``Authorization: Bearer TOKEN`` where ``endpoint.status_token`` is set.

    Raises:
        InvalidArgumentError: the address cannot be bound (in use, not this machine's).
    """
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app

    host, port, token = endpoint
    metrics = make_wsgi_app(registry)
    refusals = RateLimitedWarning(logging.getLogger("trio_bridge"))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == STATUS_PATH and token is not None and not _bears(environ.get("HTTP_AUTHORIZATION", ""), token):
            refusals.warn(f"refused {STATUS_PATH} to {environ.get('REMOTE_ADDR') or 'a peer'}: missing or wrong token")
            body = f"{STATUS_PATH} needs the pool's token: send 'Authorization: Bearer TOKEN' (trio-bridge top --token-file FILE)\n".encode()
            start_response("401 Unauthorized", [
                ("WWW-Authenticate", 'Bearer realm="trio-bridge"'), ("Content-Type", "text/plain"),
                ("Content-Length", str(len(body))),
            ])
            return [body]
        if path == STATUS_PATH:
            body = json.dumps(status(), default=str).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == METRICS_PATH:
            return metrics(environ, start_response)
        body = f"not found: this endpoint serves {METRICS_PATH} and {STATUS_PATH}\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    except OSError as exc:
        raise InvalidArgumentError(f"metrics_address {host}:{port}: cannot listen there: {exc.strerror or exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="trio-bridge metrics", daemon=True)
    thread.start()
    try:
        yield f"{host}:{server.server_address[1]}"
    finally:
        with trio.CancelScope(shield=True):  # the server's threads must not outlive the pool
            # shutdown() returns once serve_forever has stopped (it polls every 0.5 s)
            await trio.to_thread.run_sync(server.shutdown)
            server.server_close()
            await trio.to_thread.run_sync(thread.join)


def _bears(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer (constant-time compare)."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())
