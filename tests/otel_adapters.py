"""An adapter whose workers trace with the OpenTelemetry SDK, exporting each finished span as a
JSON line to the file named by its ``spans`` option (what the tracing test reads)."""

from __future__ import annotations

import os

from trio_bridge.worker import Adapter, SessionContext, tool


class Traced(Adapter):
    def setup(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

        out = open(self.options["spans"], "a", buffering=1)  # lives as long as the worker
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n",
        )))
        trace.set_tracer_provider(provider)

    @tool
    def ask_host(self, ctx: SessionContext, name: str, word: str) -> object:
        return ctx.call_host_tool(name, word=word)

    @tool
    def add(self, a: int, b: int = 2) -> int:
        return a + b

    @tool
    def pid(self) -> int:
        return os.getpid()
