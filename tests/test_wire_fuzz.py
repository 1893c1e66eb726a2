"""Malformed and oversized requests from a hostile grpcio client, to a real worker of a real pool
and to its real host service: each gets a precise status (never UNKNOWN), an ErrorInfo saying
what was wrong, and at most one log line per kind of refusal per rate-limit window (no
traceback); the worker keeps its process and keeps serving, and the pool restarts nothing.

``tests/wire_fuzz_client.py`` sends them (its stubs compiled from ``proto/`` alone, raw bytes
where a message is not protobuf at all) and reports what it saw; this test runs it against a
pool and asserts on that report and on the pool's and the worker's logs.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import trio

import trio_bridge
from trio_bridge._wire.contract import REFUSAL_LOG_INTERVAL, WIRE_VERSION

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "wire_fuzz_client.py"
ADAPTER = "tests.adapters:Echo"
# What may answer a bad request: never UNKNOWN (a server fault, or grpclib's default for an
# exception) and never INTERNAL (trio-bridge's own fault); OK where the request was acceptable.
ACCEPTABLE = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS", "ABORTED"}


async def shout(text: str) -> str:
    return text.upper()


async def countdown(n: int):
    for i in range(n, 0, -1):
        yield i


@pytest.mark.real_process
async def test_malformed_and_oversized_requests_get_precise_statuses_and_kill_nothing(caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")  # the pool's log, and its workers' stderr lines
    async with trio_bridge.open_pool(ADAPTER, size=1) as pool:
        pool.host_tool(shout)
        pool.host_tool(countdown)
        async with pool.session(ttl=600) as session:
            await session.register_variable("seed", "integer", 7)
            (worker,) = pool.workers()
            restarts = pool.statistics().restarts
            config = {
                "proto": str(ROOT / "proto" / "trio_bridge" / "v1" / "bridge.proto"),
                "status_proto": str(ROOT / "proto" / "google" / "rpc" / "status.proto"),
                "wire_version": WIRE_VERSION, "session_id": session.id, "seed": 19,
                "worker": worker.address, "worker_secret": pool._spec.secret,
                "host": pool._spec.host_address, "host_secret": pool._spec.secret,
            }
            started = trio.current_time()
            with trio.fail_after(240):
                done = await trio.run_process(
                    [sys.executable, "-I", str(CLIENT), json.dumps(config)], capture_stdout=True, capture_stderr=True, check=False,
                )
            elapsed = trio.current_time() - started
            assert done.stdout, done.stderr.decode(errors="replace")[-5000:]
            report = json.loads(done.stdout)
            assert "failure" not in report, report["failure"]
            after_workers = pool.workers()
            assert pool.statistics().restarts == restarts
    # The pool has closed: every line its worker wrote to stderr has been logged.

    outcomes = report["outcomes"]
    # A tool's own error is UNKNOWN (docs/wire.md, section 8), its message cut to fit the trailer.
    (tool_error,) = [o for o in outcomes if o["label"] == "tool-error-1MB-message"]
    assert (tool_error["status"], tool_error["kind"]) == ("UNKNOWN", "tool_error") and tool_error["trailer_bytes"] < 8192, tool_error
    outcomes.remove(tool_error)
    counts = collections.Counter(f"{o['service']} {o['status']}" for o in outcomes)
    print(f"{len(outcomes)} requests in {elapsed:.1f} s: {dict(sorted(counts.items()))}")
    # DEADLINE_EXCEEDED: the server's, for a deadline of 5e-324 s (not the client's own timeout).
    wrong = [o for o in outcomes if o["status"] not in ACCEPTABLE and o.get("kind") != "deadline_exceeded"]
    assert not wrong, f"{len(wrong)} answered with the wrong status, e.g. {wrong[:5]}"
    # Every refusal says why: an ErrorInfo in its details (but a refused handshake, which is the
    # exchange's own: docs/wire.md, section 8), and a bounded message.
    refused = [o for o in outcomes if o["status"] != "OK"]
    handshakes = [o for o in refused if (o["rpc"], o["status"]) == ("Describe", "FAILED_PRECONDITION")]
    assert all(o.get("kind") for o in refused if o not in handshakes), [o for o in refused if not o.get("kind")][:5]
    assert max(o["trailer_bytes"] for o in refused) < 8192  # grpcio's default limit on metadata

    # The worker kept its process and serves; the host serves.
    assert [w.pid for w in after_workers] == [worker.pid] and report["after"]["worker_pid"] == worker.pid
    assert report["after"]["worker_add"] == 42 and report["after"]["host_tool"] == "HI"

    # No traceback anywhere (the host's log, the worker's stderr); each server logs each kind of
    # refusal, at most once per rate-limit window.
    lines = [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage()[:500] for r in caplog.records if r.exc_info][:3]
    assert not [line for line in lines if "Traceback" in line], [line[:500] for line in lines if "Traceback" in line][:3]
    assert max(map(len, lines)) < 1000
    logged = collections.Counter(
        ("worker" if line.startswith("[") else "host", m.group(1)) for line in lines if (m := re.search(r"refused a request \((.+?)\)", line))
    )
    windows = 1 + int(elapsed // REFUSAL_LOG_INTERVAL)
    assert all(n <= windows for n in logged.values()), (logged, elapsed)
    for side in ("worker", "host"):
        assert {kind for where, kind in logged if where == side} >= {"not protobuf", "over a limit", "a wrong number", "malformed payload"}, logged
