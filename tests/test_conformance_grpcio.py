"""The wire contract, checked by a peer written from ``docs/wire.md`` alone on another gRPC stack.

``tests/conformance_client.py`` runs in its own interpreter (``-I``: no path to this repository)
and refuses any import of ``trio_bridge``: its grpcio stubs come from ``proto/`` via
``grpc_tools.protoc``, its payload codec and shared-memory reader/writer from the specification.
It starts a worker process as the process contract says and calls every ``WorkerService`` RPC,
and calls every ``HostService`` RPC of a live pool (on its TCP listener, with the token). This
test opens that pool, runs the client, and asserts what the client observed.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import trio

import trio_bridge
from trio_bridge._wire.contract import WIRE_VERSION
from trio_bridge.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "conformance_client.py"
PROTO = ROOT / "proto" / "trio_bridge" / "v1" / "bridge.proto"
STATUS_PROTO = ROOT / "proto" / "google" / "rpc" / "status.proto"
ADAPTER = "tests.adapters:Echo"
TOKEN = "conformance-token-0123456789"


def _rpcs(service: str) -> set[str]:
    text = PROTO.read_text()
    body = re.search(r"service " + service + r" \{(.*?)\n\}", text, re.S)
    assert body is not None
    return set(re.findall(r"^\s*rpc (\w+)\(", body.group(1), re.M))


def test_the_client_imports_nothing_of_trio_bridge_and_calls_every_rpc():
    source = CLIENT.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("trio_bridge", "tests") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("trio_bridge", "tests")
    worker, host = _rpcs("WorkerService"), _rpcs("HostService")
    assert {"Ping", "Calls", "ExecuteStreamingTool"} <= worker and {"Heartbeat", "WatchVariables", "Join"} <= host
    for rpc in worker | host:
        assert re.search(rf'(stub\.|call\("){rpc}\b', source), f"the conformance client never calls {rpc}"


def test_the_specification_states_the_current_contract_version():
    assert f"**Contract version: {WIRE_VERSION}**" in (ROOT / "docs" / "wire.md").read_text()


async def shout(text: str) -> str:
    return text.upper()


async def echo_host(value: object) -> object:
    return value


def explode(message: str) -> None:
    raise ValueError(message)


async def nap(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


async def countdown(n: int):
    for i in range(n, 0, -1):
        yield i


async def countdown_then_fail(n: int):
    for i in range(n, 0, -1):
        yield i
    raise RuntimeError("no more")


def session_only() -> str:
    return "mine"


@pytest.mark.real_process
async def test_a_grpcio_client_written_from_the_spec_drives_a_worker_and_the_host(tmp_path, caplog):
    # The pool says which remote workers joined it (a sample of pool.workers() could miss one the
    # client stops within milliseconds of its dial-back).
    caplog.set_level(logging.INFO, logger="trio_bridge")
    port = free_port("127.0.0.1")
    async with trio_bridge.open_pool(
        ADAPTER, size=2, remote=trio_bridge.RemoteWorkers(listen=f"tcp://127.0.0.1:{port}", token=TOKEN),
        lifecycle=trio_bridge.Lifecycle(restart_backoff=(0.1, 0.5)),
    ) as pool:
        for function in (shout, echo_host, explode, nap, countdown, countdown_then_fail):
            pool.host_tool(function)
        async with pool.session(ttl=600, metadata={"owner": "conformance", "big": 2**60}) as session:
            session.register_host_tool(session_only)
            await session.register_variable("seed", "integer", 7)
            config = {
                "python": sys.executable, "adapter": ADAPTER, "root": str(ROOT), "proto": str(PROTO), "status_proto": str(STATUS_PROTO),
                "wire_version": WIRE_VERSION, "host": f"tcp:127.0.0.1:{port}", "token": TOKEN, "session_id": session.id,
                "pool_worker_id": pool.workers()[0].id,
            }
            with trio.fail_after(300):
                done = await trio.run_process(
                    [sys.executable, "-I", str(CLIENT), json.dumps(config)], capture_stdout=True, capture_stderr=True,
                    check=False, cwd=tmp_path,
                )
    joined = {m.group(1) for r in caplog.records if (m := re.fullmatch(r"worker at (\S+) joined the pool \(slot \d+\)", r.getMessage()))}
    stderr = done.stderr.decode(errors="replace")[-5000:]
    assert done.stdout, stderr
    report = json.loads(done.stdout)
    assert "failure" not in report, report["failure"] + stderr
    assert done.returncode == 0, stderr
    assert report["imported_trio_bridge"] == [] and report["stub_modules"] == ["bridge_pb2", "bridge_pb2_grpc", "rpc_status_pb2"]
    _check_worker(report["worker"])
    _check_host(report["host"], session_id=config["session_id"])
    assert joined == {report["host"]["join"]["address"]}  # the worker that joined, dialed back


def _error(outcome: dict, kind: str, type_: str | None = None, message: str = "") -> dict:
    """The ErrorInfo of a failure (an RPC's status details, or a CallResult's in-band error)."""
    assert outcome.get("error"), outcome
    info = outcome["error"]
    assert info["kind"] == kind and message in info["message"], info
    if type_ is not None:
        assert info["type"] == type_, info
    return info


def _failed(outcome: dict, status: str, kind: str, type_: str | None = None, message: str = "") -> dict:
    """An RPC that ended with the gRPC ``status`` and, in its details, the ErrorInfo described."""
    assert outcome.get("status") == status, outcome
    return _error(outcome, kind, type_, message)


def _check_worker(w: dict) -> None:
    # the process contract
    assert re.fullmatch(r"TRIO_BRIDGE_READY unix:/.+/worker\.sock", w["ready_line"])
    assert w["lifeline_exit"] == 5
    assert w["bad_adapter_exit"] == 3 and "cannot import module 'no_such_module' for adapter 'no_such_module:Nothing'" in w["bad_adapter_stderr"]
    assert w["exit_code"] == 0

    # the handshake
    assert w["ping_without_secret"]["code"] == "UNAUTHENTICATED"
    other = w["describe_other_version"]
    assert other["code"] == "FAILED_PRECONDITION" and f"wire contract {WIRE_VERSION}" in other["details"] and "999" in other["details"]
    described = w["describe"]
    assert described["adapter"] == ADAPTER and described["wire_version"] == WIRE_VERSION and described["concurrency"] == 4
    tools = described["tools"]
    assert tools["add"]["parameters"] == [["a", "int", True, None], ["b", "int", False, "2"]]
    assert tools["echo"]["description"] == "Return the arguments as given" and not tools["echo"]["streaming"]
    assert tools["count"]["streaming"] and tools["count"]["parameters"][1] == ["delay", "float", False, "0.0"]
    assert w["ping"]["pid_is_the_process"] and w["ping"]["active_calls"] == [] and w["ping"]["uptime"] > 0

    # values: every tag both ways; arrays through shared memory: ours forwarded, the worker's own
    echo = w["echo"]
    assert echo["has_result"] and echo["same"], echo["got"]
    assert {"a", "b", "d", "f", "n"} <= set(echo["tag_kinds"])
    if echo["ours"]:
        assert "m" in echo["tag_kinds"]
        (ours, by_worker_1), (theirs, by_worker_2) = sorted(echo["segments"], key=lambda s: s[0] not in echo["ours"])
        assert ours in echo["ours"] and not by_worker_1  # passed back along, not copied
        assert theirs not in echo["ours"] and by_worker_2  # written by the worker (its pid in the name)
    assert w["echo_5_mib"]

    # refusals and failures: standard status codes, the ErrorInfo in the status details
    assert "echo" in _failed(w["unknown_tool"], "NOT_FOUND", "tool_not_found")["available"]
    raised = _failed(w["tool_raised"], "UNKNOWN", "tool_error", "ValueError", "boom")
    assert "ValueError: boom" in raised["traceback"] and w["tool_raised"]["message"] == "ValueError: boom"
    _failed(w["missing_argument"], "INVALID_ARGUMENT", "invalid_argument", message="missing required argument(s) 'a'")
    assert w["default_argument"] == {"result": "3"}
    assert w["big_sum"]["value"] and w["big_sum"]["json"] == '{"\\u0000tb":"n","h":"8000000000000000"}'
    _failed(w["streaming_tool_unary"], "INVALID_ARGUMENT", "invalid_argument", message="is a streaming tool")
    _failed(w["bare_nan"], "INVALID_ARGUMENT", "invalid_argument", message="NaN is not JSON")
    _failed(w["bad_int_tag"], "INVALID_ARGUMENT", "invalid_argument", message="tag 'n'")
    _failed(w["bad_blob_index"], "INVALID_ARGUMENT", "invalid_argument", message="must index Payload.blobs")
    _failed(w["empty_call_id"], "INVALID_ARGUMENT", "invalid_argument", message="call_id is empty")
    _failed(w["unencodable_result"], "INTERNAL", "encode_error", message='result["items"][3]: object of type Unencodable')
    _failed(w["deadline"], "DEADLINE_EXCEEDED", "deadline_exceeded", "TimeoutError")
    assert w["deadline_took"] < 10
    _failed(w["duplicate_call_id"], "INVALID_ARGUMENT", "invalid_argument", message="already running")
    assert w["duplicate_first"] == {"result": "1.0"}
    assert w["malformed_message"]["code"] == "INVALID_ARGUMENT"

    # Calls: finishing order, a cancelled call never answered, half-close drains
    calls = w["calls"]
    assert calls["order"] == ["s-add", "s-echo", "s-slow", "s-last"] and "s-long" not in calls["results"]
    assert calls["results"]["s-add"] == {"result": "3"} and calls["results"]["s-echo"] == {"result": "[18446744073709551616, nan]"}
    assert calls["long_was_in_flight"] and calls["cancelled_freed"] and calls["ended"] == "OK"

    # streams
    count = w["stream_count"]
    assert count["chunks"] and count["messages"] >= 3 and max(count["sizes"]) <= 256 and count["end"] == {"status": "OK"}
    fails = w["stream_fails"]
    assert fails["chunks"] == [0, 1, 2]  # every chunk before the failure, then the status
    assert _failed(fails["end"], "UNKNOWN", "tool_error", "RuntimeError")["message"] == "broke after 3"
    unary = w["stream_unary_tool"]
    assert unary["messages"] == 0 and unary["chunks"] == []
    _failed(unary["end"], "INVALID_ARGUMENT", "invalid_argument", message="not a streaming tool")
    unencodable = w["stream_unencodable"]
    assert unencodable["chunks"] == [0, 1]
    _failed(unencodable["end"], "INTERNAL", "encode_error", message="chunk[2]")
    assert w["stream_special"]
    assert w["stream_cancel"] == {"first": True, "freed": True}

    # sessions and shutdown
    assert w["sessions"] == [0, 0]
    assert w["shutdown_reply"] == 0
    _failed(w["after_shutdown"], "UNAVAILABLE", "draining")
    assert w["drained_call"] == {"result": "1.0"}


def _check_host(h: dict, *, session_id: str) -> None:
    assert h["without_secret"]["code"] == "UNAUTHENTICATED"
    assert h["heartbeat"] == [True, False]
    session = h["session"]
    assert session["id"] == session_id and session["ttl"] == 600
    assert session["metadata"] == repr({"owner": "conformance", "big": 2**60}) and session["variable_count"] == 1
    _failed(h["session_missing"], "NOT_FOUND", "state", "SessionNotFoundError")

    v = h["variables"]
    (registered,) = v["register"]["variables"]
    assert registered["name"] == "temperature" and registered["type"] == "float" and registered["version"] == 0
    assert registered["value"] == "0.5" and registered["constraints"] == {"min": 0.0, "max": 2.0}
    assert registered["metadata"] == repr({"unit": "K", "big": 2**60}) and registered["source"] == "worker:conformance"
    assert registered["id"] and registered["times"] and v["register"]["state_version"] >= 2
    assert v["register_tensor"]["variables"][0]["value"].startswith("array([[0., 1., 2.],")
    assert v["register_big"]["variables"][0]["value"] == str(2**60)
    assert v["get"]["variables"][0]["value"] == "0.5" and v["get_by_id"]["variables"][0]["name"] == "temperature"
    _failed(v["get_missing"], "NOT_FOUND", "state", "VariableNotFoundError")
    _failed(v["get_nothing"], "INVALID_ARGUMENT", "invalid_argument")
    assert [x["name"] for x in v["get_many"]["variables"]] == ["temperature", "counter"]
    everything = {x["name"]: x for x in v["get_all"]["variables"]}
    assert set(everything) == {"seed", "temperature", "weights", "counter"} and everything["seed"]["source"] == "host"
    assert v["set"]["variables"][0]["version"] == 1 and v["set"]["variables"][0]["value"] == "0.7"
    _failed(v["set_conflict"], "ABORTED", "state", "VersionConflictError")
    _failed(v["set_invalid"], "INVALID_ARGUMENT", "state", "InvalidVariableError")
    _failed(v["set_malformed"], "INVALID_ARGUMENT", "invalid_argument", message="Infinity is not JSON")
    assert v["after_refusals"]["variables"][0]["value"] == "0.7" and v["after_refusals"]["variables"][0]["version"] == 1
    assert {x["name"]: x["value"] for x in v["set_many_atomic"]["variables"]} == {"temperature": "1.0", "counter": str(-(2**60))}
    partial = v["set_many_partial"]
    assert [x["name"] for x in partial["variables"]] == ["temperature"] and partial["errors"]["counter"]["type"] == "InvalidVariableError"
    assert [x["name"] for x in v["list"]["variables"]] == ["temperature"]
    assert [x["name"] for x in v["list_all"]["variables"]] == ["counter", "seed", "temperature", "weights"]
    assert [entry[:2] for entry in v["history"]["history"]] == [[0, "0.5"], [1, "0.7"], [2, "1.0"], [3, "1.5"]]
    assert v["rollback"]["variables"][0]["value"] == "0.7" and v["rollback"]["variables"][0]["version"] == 4
    assert v["depend"]["variables"][0]["depends_on"] == ["counter"]
    _failed(v["cycle"], "FAILED_PRECONDITION", "state", "DependencyCycleError")
    assert v["optimize"]["variables"][0]["optimizer_id"] == "opt-1" and v["optimize"]["lock_lease_seconds"] >= 0
    _failed(v["locked"], "FAILED_PRECONDITION", "state", "VariableLockedError")
    assert v["optimizer_writes"]["variables"][0]["value"] == "0.2"
    assert v["stop_optimizing"]["variables"][0]["optimizer_id"] == ""
    assert v["delete"]["state_version"] > 0
    _failed(v["deleted"], "NOT_FOUND", "state", "VariableNotFoundError")

    initial, change, heartbeat = h["watch"]
    assert [u[:2] + u[3:4] for u in initial] == [["temperature", "initial", "0.2"]]
    assert [u[:4] + u[5:6] for u in change] == [["temperature", "change", "0.2", "1.25", "worker:conformance"]]
    assert heartbeat == []
    assert h["watch_unknown"]["batches"] == [] and h["watch_bad_buffer"]["batches"] == []
    _failed(h["watch_unknown"]["end"], "NOT_FOUND", "state", "VariableNotFoundError")
    _failed(h["watch_bad_buffer"]["end"], "INVALID_ARGUMENT", "invalid_argument", message="x-trio-bridge-watch-buffer")

    tools = h["host_tools"]
    assert sorted(tools) == ["countdown", "countdown_then_fail", "echo_host", "explode", "nap", "shout"]
    assert tools["shout"] == [False, [["text", "str", True]]] and tools["countdown"][0] is True
    assert "session_only" in h["host_tools_in_session"]
    assert h["host_tool"] == {"result": "HI"} and h["host_tool_values"]
    assert "shout" in _failed(h["host_tool_unknown"], "NOT_FOUND", "tool_not_found")["available"]
    assert "ValueError: kaput" in _failed(h["host_tool_raised"], "UNKNOWN", "tool_error", "ValueError", "kaput")["traceback"]
    _failed(h["host_tool_streaming_unary"], "INVALID_ARGUMENT", "invalid_argument", message="is a streaming tool")
    _failed(h["host_tool_deadline"], "DEADLINE_EXCEEDED", "deadline_exceeded", "TimeoutError")
    assert h["host_tool_in_session"] == {"result": "mine"}
    assert h["host_stream"]["chunks"] and h["host_stream"]["messages"] >= 3 and h["host_stream"]["end"] == {"status": "OK"}
    assert h["host_stream_fails"]["chunks"] == [3, 2, 1]
    _failed(h["host_stream_fails"]["end"], "UNKNOWN", "tool_error", "RuntimeError", "no more")
    assert h["routed"] == {"result": 2**63}
    assert h["routed_in_session"] == {"result": [float("inf")]}
    _failed(h["routed_unknown"], "NOT_FOUND", "tool_not_found")

    _failed(h["join_refused"], "INVALID_ARGUMENT", "invalid_argument", message="this pool serves 'tests.adapters:Echo'")
    assert h["join"]["reply_size"] == 0 and h["join"]["dialed_back"]
