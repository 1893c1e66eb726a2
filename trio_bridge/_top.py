"""``trio-bridge top``: a live view of a running pool, read from its HTTP endpoint's ``/status``
(``open_pool(monitoring=Monitoring(address=...))``; see ``trio_bridge/_host/_endpoint.py``), drawn with rich."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trio_bridge._wire.contract import STATUS_PATH

_RECENT_ERRORS_SHOWN = 5


def status_url(address: str) -> str:
    """``http://HOST:PORT/status`` for ``HOST:PORT``, ``tcp:HOST:PORT`` or an ``http://`` URL."""
    address = address.strip()
    if address.startswith(("http://", "https://")):
        base = address.rstrip("/")
        return base if base.endswith(STATUS_PATH) else base + STATUS_PATH
    return f"http://{address.removeprefix('tcp:').removeprefix('//')}{STATUS_PATH}"


def fetch_status(address: str, timeout: float = 2.0, token: str | None = None) -> dict[str, Any]:
    """The pool's ``/status`` document, asked with ``token`` as a bearer where given (a pool
    beyond loopback asks for its ``Monitoring(token=)``).

    Raises:
        PermissionError: the pool answered 401: it wants a token, or another one.
        OSError: it cannot be reached (``urllib.error.URLError`` is one), or did not answer with
            a status document.
    """
    url = status_url(address)
    request = urllib.request.Request(url)
    if token is not None:  # unredirected: a redirect elsewhere does not carry it along
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise
        exc.close()
        raise PermissionError(
            f"{url} answered 401 Unauthorized: "
            + ("the pool refused this token (is it the pool's Monitoring(token=...)?)" if token is not None else
               "the pool wants its token: give --token-file FILE (owner-only) or set TRIO_BRIDGE_TOKEN")
        ) from None
    if not isinstance(document, dict) or "workers" not in document:
        raise OSError(f"{url} did not answer with a trio-bridge status")
    return document


def render(status: dict[str, Any] | None, address: str, error: str | None = None) -> RenderableType:
    """One frame: the pool's figures, its workers, and its recent errors; or why it cannot be read."""
    if status is None:
        return Text(f"trio-bridge top {address}: cannot read the pool: {error}", style="red")
    stats = status["statistics"]
    state = status.get("state") or {}
    head = Text.assemble(
        ("trio-bridge top ", "bold"), (f"{status['adapter']}  ", "cyan"),
        f"workers {stats['workers_ready']}/{stats['size']} ready  queue {stats['queued']}  in flight {stats['in_flight']}  ",
        f"calls {stats['calls']:,} (ok {stats['calls_completed']:,}, failed {stats['calls_failed']:,}, "
        f"crashed {stats['calls_crashed']:,}, cancelled {stats['calls_cancelled'] + stats['calls_cancelled_queued']:,}, "
        f"refused {stats['calls_refused']:,}, replayed {stats.get('calls_replayed', 0):,})  p50 {_ms(stats['latency_p50'])}  p99 {_ms(stats['latency_p99'])}  ",
        f"restarts {stats['restarts']}  recycles {sum(stats.get('recycles', {}).values())}",
    )
    figures = Text(
        "  ".join(f"{name} {state[name]:,}" for name in ("sessions", "variables", "watchers") if name in state)
        or "sessions: not counted by this state backend",
        style="dim",
    )
    table = Table(expand=False, box=None, header_style="bold")
    for column, justify in (
        ("worker", "left"), ("pid", "right"), ("where", "left"), ("state", "left"), ("RSS", "right"), ("CPU", "right"),
        ("calls", "right"), ("in flight", "right"), ("p50", "right"), ("p99", "right"), ("last recycle", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for w in status["workers"]:
        table.add_row(
            w["id"], str(w["pid"] or "-"), ("remote " if w.get("remote") else "") + _where(w["address"]),
            Text(w["state"], style={"ready": "green", "draining": "yellow", "dead": "red"}.get(w["state"], "")),
            _mib(w.get("rss")), _seconds(w.get("cpu_seconds")), f"{w['calls_served']:,}", str(w["in_flight"]),
            _ms(w.get("latency_p50")), _ms(w.get("latency_p99")), w.get("last_recycle_reason") or "",
        )
    parts: list[RenderableType] = [head, figures, table]
    errors = status.get("recent_errors") or []
    if errors:
        parts.append(Text("recent errors", style="bold red"))
        for e in errors[-_RECENT_ERRORS_SHOWN:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(e["time"])))
            parts.append(Text(f"{stamp} {e['tool']} ({e['outcome']}): {e['error']}", overflow="ellipsis", no_wrap=True))
    return Group(*parts)


def run_top(address: str, *, interval: float, once: bool, console: Console, token: str | None = None) -> int:
    """``trio-bridge top``: redraw every ``interval`` seconds until Ctrl-C; ``once``: print one
    frame and return. ``token``: sent as a bearer (see :func:`fetch_status`). Returns the exit
    status (1: the pool could not be read, with ``once``)."""
    if once:
        view, ok = _frame(address, token)
        console.print(view)
        return 0 if ok else 1
    with Live(_frame(address, token)[0], console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_frame(address, token)[0])
        except KeyboardInterrupt:
            return 0


async def live_view(address: str, *, console: Console, interval: float = 0.5) -> None:
    """The same view inside a Trio program (``trio-bridge run ... --top``), until cancelled;
    the requests run in a thread, so the pool's own work is not held up."""
    first, _ = await trio.to_thread.run_sync(_frame, address)
    with Live(first, console=console, refresh_per_second=4, transient=False) as live:
        while True:
            await trio.sleep(interval)
            live.update((await trio.to_thread.run_sync(_frame, address))[0])


def _frame(address: str, token: str | None = None) -> tuple[RenderableType, bool]:
    """One frame of the view, and whether the pool could be read (else the frame says why)."""
    try:
        return render(fetch_status(address, token=token), address), True
    except (OSError, ValueError) as exc:
        return render(None, address, _reason(exc)), False


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return str(exc.reason)
    return str(exc)


def _where(address: str) -> str:
    return "local" if address.startswith("unix:") else address.removeprefix("tcp:")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _mib(nbytes: int | None) -> str:
    return "-" if not nbytes else f"{nbytes / 2**20:,.0f} MiB"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"
