"""A pool's HTTP endpoint (``Monitoring(address=...)``), read-only: ``/metrics``, its
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
from trio_bridge._wire.contract import METRICS_PATH, STATUS_PATH
from trio_bridge._wire.listeners import loopback
from trio_bridge._wire.transport import parse_address


class Endpoint(NamedTuple):
    """Where a pool serves its endpoint, and the token ``/status`` asks for (``None``: none)."""

    host: str
    port: int
    status_token: str | None


def metrics_endpoint(address: str | None, *, token: str | None, status_public: bool) -> Endpoint | None:
    """Where ``Monitoring.address`` (``None``, or a ``"HOST:PORT"`` checked by
    ``_options``; ``tcp:`` optional) serves, and the token ``/status`` asks for: none on
    loopback or with ``status_public``; else ``token`` (the options refused such an address
    without one)."""
    if address is None:
        return None
    _, host, port = parse_address(address if address.startswith("tcp:") else f"tcp:{address}")
    return Endpoint(host, port, None if loopback(host) or status_public else token)


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
