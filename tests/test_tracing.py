"""OpenTelemetry traces: one trace across host -> worker -> host tool -> another worker, joined
by the W3C traceparent each call carries; nothing traced while no tracer provider is set."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from trio_bridge import open_pool


class Recorder(SpanProcessor):
    """Keeps the spans that end while it records (the process's provider outlives the test)."""

    def __init__(self) -> None:
        self.recording = False
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            self.spans.append(span)


@pytest.fixture
def host_spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    recorder = Recorder()
    provider.add_span_processor(recorder)
    recorder.recording = True
    try:
        yield recorder.spans
    finally:
        recorder.recording = False


@pytest.mark.real_process
async def test_one_trace_spans_host_worker_host_tool_and_another_worker(tmp_path, host_spans):
    spans_file = tmp_path / "worker-spans.jsonl"
    async with open_pool("tests.otel_adapters:Traced", size=2, adapter_options={"spans": str(spans_file)}) as pool:

        @pool.host_tool
        async def lookup(word: str) -> int:
            return await pool.execute("add", {"a": len(word)})  # back to a worker: the other one

        assert await pool.execute("ask_host", {"name": "lookup", "word": "abc"}) == 5
    worker = [json.loads(line) for line in spans_file.read_text().splitlines()]
    host = [
        {"name": s.name, "trace": f"0x{s.context.trace_id:032x}", "id": f"0x{s.context.span_id:016x}",
         "parent": f"0x{s.parent.span_id:016x}" if s.parent else None}
        for s in host_spans
    ]
    spans = host + [
        {"name": s["name"], "trace": s["context"]["trace_id"], "id": s["context"]["span_id"], "parent": s["parent_id"],
         "pid": s["resource"]["attributes"].get("process.pid")}
        for s in worker
    ]
    by_name = {s["name"]: s for s in spans}
    chain = [
        "trio_bridge call ask_host", "trio_bridge tool ask_host", "trio_bridge host tool lookup",
        "trio_bridge call add", "trio_bridge tool add",
    ]
    assert set(chain) <= set(by_name), sorted(by_name)
    assert len({by_name[name]["trace"] for name in chain}) == 1  # one trace
    assert by_name[chain[0]]["parent"] is None
    for parent, child in itertools.pairwise(chain):
        assert by_name[child]["parent"] == by_name[parent]["id"], (parent, child)


def test_nothing_is_traced_in_a_process_that_set_no_tracer_provider():
    code = (
        "from trio_bridge import _tracing\n"
        "with _tracing.span('x', kind='client') as traceparent:\n"
        "    assert traceparent == '' and _tracing.current_traceparent() == ''\n"
        "assert not _tracing.enabled()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_malformed_traceparent_starts_a_new_trace_and_logs_nothing(host_spans, caplog):
    """A client may send any ``traceparent`` (up to the wire's name limit): only a well-formed W3C
    one is handed to OpenTelemetry, which would log a warning for each bad one (a log flood a
    client could drive); a bad one makes a span of a new trace."""
    from trio_bridge import _tracing

    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for bad in ["x" * 1000, "00-" + "z" * 32 + "-b7ad6b7169203331-01", good.upper(), good + "-extra"]:
        with _tracing.span("call", kind="server", parent=bad):
            pass
    with _tracing.span("call", kind="server", parent=good):
        pass
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
    *bad_spans, child = host_spans
    assert len(bad_spans) == 4 and all(s.parent is None for s in bad_spans)
    assert child.parent is not None and f"{child.context.trace_id:032x}" == good.split("-")[1]
