"""A pool's HTTP endpoint (``open_pool(metrics_address=...)``), read-only: ``/metrics``, its
registry as Prometheus text, and ``/status``, a JSON snapshot of the pool for ``trio-bridge
top`` -- workers, queue, calls, sessions, recent errors. Served by prometheus_client's own
threaded WSGI server; its threads end with the pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import trio
from prometheus_client.registry import CollectorRegistry

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.contract import METRICS_PATH, STATUS_PATH
from trio_bridge._wire.transport import parse_address


def checked_metrics_address(address: Any) -> tuple[str, int] | None:
    """``open_pool(metrics_address=)``: ``None``, or ``"HOST:PORT"`` (``tcp:`` optional; port 0
    picks a free one).

    Raises:
        InvalidArgumentError: it is not of that form.
    """
    if address is None:
        return None
    if not isinstance(address, str):
        raise InvalidArgumentError(f"metrics_address must be 'HOST:PORT', not {short_repr(address)}")
    try:
        _, host, port = parse_address(address if address.startswith("tcp:") else f"tcp:{address}")
    except ValueError as exc:
        raise InvalidArgumentError(f"metrics_address: {exc}") from None
    return host, port


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
    registry: CollectorRegistry, host: str, port: int, status: Callable[[], dict[str, Any]],
) -> AsyncIterator[str]:
    """Serve ``/metrics`` (``registry``) and ``/status`` (``status()`` as JSON) on
    ``http://host:port`` while the block runs; yields ``"host:port"`` as bound.

    Raises:
        InvalidArgumentError: the address cannot be bound (in use, not this machine's).
    """
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler, make_wsgi_app

    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
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
