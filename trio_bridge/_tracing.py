"""OpenTelemetry traces of calls, when OpenTelemetry is installed (``trio-bridge[otel]``) and the
process has a tracer provider (the SDK's, set by the program): a span per call on the host and
in the worker, and per host-tool call, joined by the W3C ``traceparent`` of the caller's span,
which travels in the call's request (``ExecuteToolRequest.traceparent``: calls share one gRPC
stream, so per-call gRPC metadata does not exist for them). One trace then shows host ->
worker -> host tool -> another worker.

Off -- OpenTelemetry not installed, or no provider set -- a call pays a few attribute lookups
and an ``isinstance``: no span, no context, no string.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator, Mapping
from typing import Any

_INSTALLED = importlib.util.find_spec("opentelemetry") is not None
_TRACER_NAME = "trio_bridge"


_api: Any = None  # (opentelemetry.trace, its no-op provider classes), once imported: off, a call pays no import


def _provider() -> Any:
    """The program's tracer provider, or ``None`` when traces are off."""
    global _api
    if not _INSTALLED:
        return None  # no import statement run: the cheapest way off
    if _api is None:
        from opentelemetry import trace
        from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

        _api = (trace, (ProxyTracerProvider, NoOpTracerProvider))
    trace, unset = _api
    provider = trace.get_tracer_provider()  # asked each time: a program may set one later
    if isinstance(provider, unset):
        return None  # the program set none: nothing would record
    return provider


# W3C Trace Context, section 3.2: version-trace_id-parent_id-flags, lower-case hex
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


@contextlib.contextmanager
def span(name: str, *, kind: str, parent: str = "", attributes: Mapping[str, Any] | None = None) -> Iterator[str]:
    """A span named ``name`` (``kind``: ``"client"``, ``"server"`` or ``"internal"``) for the
    block, current in it; a child of ``parent`` (a W3C ``traceparent``) if given, else of the
    current span. Yields the ``traceparent`` to send on (``""`` when traces are off). An
    exception leaving the block is recorded on the span and goes on."""
    provider = _provider()
    if provider is None:
        yield ""
        return
    tracer = provider.get_tracer(_TRACER_NAME)  # the SDK's takes a lock: only where a span is made
    from opentelemetry.propagate import extract, inject
    from opentelemetry.trace import SpanKind

    # Only a well-formed W3C traceparent reaches OpenTelemetry: it logs a warning for each bad
    # one, a log flood that a client could drive (our own refusals are rate-limited).
    context = extract({"traceparent": parent}) if _TRACEPARENT.fullmatch(parent) else None
    with tracer.start_as_current_span(
        name, context=context, kind=SpanKind[kind.upper()], attributes=dict(attributes or {}),
    ):
        carrier: dict[str, str] = {}
        inject(carrier)
        yield carrier.get("traceparent", "")


def current_traceparent() -> str:
    """The current span's W3C ``traceparent`` (``""`` when traces are off or there is none)."""
    if _provider() is None:
        return ""
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")


def enabled() -> bool:
    """Traces are on in this process (see the module doc)."""
    return _provider() is not None
