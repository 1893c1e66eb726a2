"""A hostile grpcio client: malformed and oversized requests to every RPC of a worker and of a
host, from stubs compiled from ``proto/`` alone (as ``conformance_client.py`` does; it imports
nothing of ``trio_bridge``).

For each RPC it starts from a valid request and changes one thing at a time, by the field's type
in the .proto: strings empty, 64 KiB, 1 MB, not UTF-8; payloads that are not the documented JSON
(bad UTF-8, bare NaN, deep nesting, malformed tags, wrong types, huge shapes and counts); numbers
negative, NaN, infinite, extreme; repeated fields with 100,000 items; required parts missing;
unknown fields; and bytes that are not protobuf at all (sent with an identity serializer). The
set is fixed by a seed: the same inputs every run.

Usage: ``python -I tests/wire_fuzz_client.py CONFIG_JSON`` (``tests/test_wire_fuzz.py`` runs it;
``"only"``/``"skip"`` in the config select cases by ``service/Rpc/label`` substrings, to debug).
Prints one JSON object: every case's outcome, and what the peers said to good calls afterwards.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json
import random
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from conformance_client import ERROR_INFO_TYPE_URL, channel, encode, generate_stubs, grpc_target, raw
from google.protobuf.descriptor import FieldDescriptor

MB = 1 << 20
TIMEOUT = 20.0  # seconds per case: a live stream that never ends would show as DEADLINE_EXCEEDED

# Payload JSON documents that break the specification (docs/wire.md, sections 3 and 4), or
# that are valid JSON of the wrong shape.
BAD_DOCUMENTS: list[bytes] = [
    b"{", b"}", b"[1,", b"\xff\xfe", b"\xc3", b"NaN", b'{"value":NaN}', b'{"value":-Infinity}', b"null", b"[]", b"1", b'"x"',
    b"true", b'{"value":1}garbage', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"value":1' + b"0" * 5_000 + b"}", b'{"value":"\\ud800"}', b'{"\\u0000tb":"zz"}', b'{"value":{"\\u0000tb":"b"}}',
    b'{"value":{"\\u0000tb":"b","i":1180591620717411303424}}', b'{"value":{"\\u0000tb":"b","i":true}}',
    b'{"value":{"\\u0000tb":"a","i":0,"d":"<f8","s":[-1]}}', b'{"value":{"\\u0000tb":"a","i":0,"d":"<f8","s":[1000000000000000000000000000000]}}',
    b'{"value":{"\\u0000tb":"a","i":0,"d":"|O8","s":[1]}}', b'{"value":{"\\u0000tb":"a","i":0,"d":"<U99999999999","s":[1]}}',
    b'{"value":{"\\u0000tb":"a","i":0,"d":"<f8","s":' + b"[1," * 0 + b"[" + b"1," * 100_000 + b"1]}}",
    b'{"value":{"\\u0000tb":"m","n":"../../etc/passwd","g":1,"o":0,"d":"<f8","s":[1]}}',
    b'{"value":{"\\u0000tb":"m","n":"1-1-0000000a","g":1,"o":-1,"d":"<f8","s":[1]}}',
    b'{"value":{"\\u0000tb":"m","n":"' + b"x" * MB + b'","g":1,"o":0,"d":"<f8","s":[1]}}',
    b'{"value":{"\\u0000tb":"n","h":"' + b"f" * 100_000 + b'"}}', b'{"value":{"\\u0000tb":"n","h":"0x1"}}',
    b'{"value":{"\\u0000tb":"f","v":"NaN"}}', b'{"value":{"\\u0000tb":"d","v":[[1,2]]}}', b'{"value":{"\\u0000tb":"d","v":7}}',
    b'{"' + b"k" * MB + b'":1}', b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(100_000)) + b"}",
]
# The few of them tried on every other payload field.
SOME_DOCUMENTS = [BAD_DOCUMENTS[i] for i in (0, 3, 6, 8, 14, 18)]
BAD_BLOBS: list[list[bytes]] = [[b""] * 100_000, [b"x" * (2 * MB)]]
BAD_STRINGS: list[tuple[str, Any]] = [
    ("empty", ""), ("1MB", "n" * MB), ("nul", "a\x00b"), ("multibyte-8KiB", "\u00e9" * 4096), ("glob", "[" * 1000),
    ("not-utf8", b"\xff\xfe"),
]
BAD_DOUBLES = [float("nan"), float("inf"), float("-inf"), -1.0, 1e308, -1e308, 5e-324]
BAD_INTS = {
    FieldDescriptor.TYPE_INT32: [-1, -(2**31), 2**31 - 1], FieldDescriptor.TYPE_INT64: [-1, -(2**63), 2**63 - 1],
    FieldDescriptor.TYPE_UINT32: [2**32 - 1], FieldDescriptor.TYPE_UINT64: [2**64 - 1],
}


class Case:
    def __init__(self, service: str, rpc: str, label: str, body: bytes | list[bytes]) -> None:
        self.service, self.rpc, self.label, self.body = service, rpc, label, body


def message_counts(service: str, rpc: str, base: Any) -> list[Case]:
    """A request that is not one message: none, or two (a client that ignores the cardinality)."""
    return [Case(service, rpc, "no-message", []), Case(service, rpc, "two-messages", [to_bytes(base)] * 2)]


def raw_garbage(rng: random.Random) -> list[tuple[str, bytes]]:
    """Bytes that are not a protobuf message (or not of any of ours)."""
    return [
        ("raw:ff", b"\xff" * 16), ("raw:truncated-varint", b"\x08"), ("raw:length-past-end", b"\x0a\xff\xff\xff\x0f"),
        ("raw:wrong-wire-type", b"\x0d\x00\x00\x00\x00" * 3), ("raw:group", b"\x0b\x0c"), ("raw:field-0", b"\x00\x01"),
        ("raw:varint-11-bytes", b"\x08" + b"\xff" * 10 + b"\x01"),
        *((f"raw:random-{i}", rng.randbytes(rng.choice([1, 7, 64, 4096]))) for i in range(4)),
    ]


def mutations(pb2: Any, message: Any, path: str = "", *, all_documents: bool = False) -> Iterator[tuple[str, Any]]:
    """``(label, message)``: ``message`` with one field made wrong, for each field and each way;
    every bad document in its first payload field with ``all_documents``, a few otherwise."""
    documents = BAD_DOCUMENTS if all_documents else SOME_DOCUMENTS
    for field in message.DESCRIPTOR.fields:
        name, where = field.name, path + field.name
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED
        if field.type == FieldDescriptor.TYPE_STRING:
            if repeated:
                for label, value in (("100k-items", ["n"] * 100_000), ("1MB-item", ["n" * MB]), ("empty-items", ["", ""])):
                    yield f"{where}={label}", _with(message, lambda m, n=name, v=value: getattr(m, n).extend(v))
            else:
                for label, value in BAD_STRINGS:
                    if isinstance(value, bytes):  # a string field whose bytes are not UTF-8: serialized by hand
                        yield f"{where}={label}", _raw_string(message, field.number, value)
                    else:
                        yield f"{where}={label}", _with(message, lambda m, n=name, v=value: setattr(m, n, v))
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            for value in BAD_DOUBLES:
                yield f"{where}={value!r}", _with(message, lambda m, n=name, v=value: setattr(m, n, v))
        elif field.type in BAD_INTS:
            for value in BAD_INTS[field.type]:
                yield f"{where}={value}", _with(message, lambda m, n=name, v=value: setattr(m, n, v))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.name == "Payload" and not repeated:
            yield f"{where}=unset", _with(message, lambda m, n=name: m.ClearField(n))
            for document in documents:
                index = BAD_DOCUMENTS.index(document)
                yield f"{where}=doc{index}", _with(message, lambda m, n=name, d=document: getattr(m, n).CopyFrom(raw(pb2, d)))
            documents = SOME_DOCUMENTS
            for index, blobs in enumerate(BAD_BLOBS):
                yield f"{where}=blobs{index}", _with(message, lambda m, n=name, b=blobs: getattr(m, n).blobs.extend(b))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not repeated and message.HasField(name):
            for label, inner in mutations(pb2, getattr(message, name), where + ".", all_documents=all_documents):
                if isinstance(inner, bytes):
                    continue  # hand-made bytes of the inner message: covered at the top level
                yield label, _with(message, lambda m, n=name, i=inner: getattr(m, n).CopyFrom(i))
    unknown = message.SerializeToString() + b"\xf8\x07\x01" + b"\xfa\x07" + _varint(64 << 10) + b"u" * (64 << 10)
    yield f"{path}unknown-fields", unknown


def _with(message: Any, change: Callable[[Any], None]) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    change(copy)
    return copy


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _raw_string(message: Any, number: int, value: bytes) -> bytes:
    """``message`` with string field ``number`` set to bytes that are not UTF-8 (a later
    occurrence of a field wins in protobuf)."""
    return message.SerializeToString() + _varint(number << 3 | 2) + _varint(len(value)) + value


def to_bytes(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def worker_cases(pb2: Any, config: dict[str, Any], rng: random.Random) -> list[Case]:
    p = lambda value: encode(pb2, value)  # noqa: E731
    ids = iter(range(1, 10**9))
    bases: dict[str, Any] = {
        "Ping": pb2.PingRequest(),
        "Describe": pb2.DescribeRequest(trio_bridge_version="fuzz", wire_version=config["wire_version"]),
        "ExecuteTool": pb2.ExecuteToolRequest(tool_name="echo", arguments=p({"value": 1}), call_id="f"),
        "ExecuteStreamingTool": pb2.ExecuteToolRequest(tool_name="count", arguments=p({"n": 2}), call_id="f"),
        "InitializeSession": pb2.InitializeSessionRequest(session_id="fuzz-session", metadata=p({"k": 1})),
        "CleanupSession": pb2.CleanupSessionRequest(session_id="fuzz-session"),
        "Calls": pb2.CallMessage(execute=pb2.ExecuteToolRequest(tool_name="echo", arguments=p({"value": 1}), call_id="f")),
    }
    cases = []
    for rpc, base in bases.items():
        for label, message in [*mutations(pb2, base, all_documents=rpc in ("ExecuteTool", "InitializeSession")), *raw_garbage(rng)]:
            body = to_bytes(message)
            if rpc in ("ExecuteTool", "ExecuteStreamingTool", "Calls") and not label.startswith(("raw:", "call_id", "execute.call_id")):
                body = _unique_call_id(pb2, body, rpc, next(ids))
            elif rpc == "InitializeSession" and not label.startswith(("raw:", "session_id")):
                body += _string_field(1, f"fuzz-session-{next(ids)}")  # a new session: its metadata is read
            cases.append(Case("worker", rpc, label, body))
        if rpc != "Calls":
            cases.extend(message_counts("worker", rpc, base))
    # A tool that raises an error whose message holds what the client sent: 1 MB of it.
    cases.append(Case("worker", "ExecuteTool", "tool-error-1MB-message", to_bytes(pb2.ExecuteToolRequest(
        tool_name="fail", arguments=p({"message": "m" * MB}), call_id=f"fuzz-{next(ids)}"))))
    # Calls: a bad message after a good one on the same stream; a cancel of 1 MB.
    good = to_bytes(bases["Calls"])
    cases.append(Case("worker", "Calls", "good-then-garbage", [_unique_call_id(pb2, good, "Calls", next(ids)), b"\xff" * 8]))
    cases.append(Case("worker", "Calls", "cancel=1MB", [to_bytes(pb2.CallMessage(cancel="c" * MB))]))
    # Shutdown: only requests that must be refused (a valid one would stop the worker; random
    # bytes may parse, as unknown fields).
    refused = [("grace_seconds=nan", pb2.ShutdownRequest(grace_seconds=float("nan"))), ("grace_seconds=-1", pb2.ShutdownRequest(grace_seconds=-1))]
    for label, message in [*refused, *((label, body) for label, body in raw_garbage(rng) if not _parses(pb2.ShutdownRequest, body))]:
        cases.append(Case("worker", "Shutdown", label, to_bytes(message)))
    return cases


def _parses(cls: Any, body: bytes) -> bool:
    try:
        cls.FromString(body)
    except Exception:
        return False
    return True


def _string_field(number: int, value: str) -> bytes:
    """A string field, encoded: appended to a message, it replaces the field's value."""
    data = value.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _unique_call_id(pb2: Any, body: bytes, rpc: str, n: int) -> bytes:
    """``body`` with a call id of its own (sequential calls must not look like duplicates)."""
    if rpc == "Calls":
        message = pb2.CallMessage()
        try:
            message.ParseFromString(body)
        except Exception:
            return body
        if not message.HasField("execute"):
            return body
        message.execute.call_id = f"fuzz-{n}"
        return message.SerializeToString()
    return body + _string_field(4, f"fuzz-{n}")  # call_id


def host_cases(pb2: Any, config: dict[str, Any], rng: random.Random) -> list[Case]:
    p = lambda value: encode(pb2, value)  # noqa: E731
    s = config["session_id"]
    bases: dict[str, Any] = {
        "Heartbeat": pb2.HeartbeatRequest(worker_id="fuzz-ghost", pid=1),
        "GetSession": pb2.GetSessionRequest(session_id=s),
        "RegisterVariable": pb2.RegisterVariableRequest(session_id=s, name="fuzzed", type="float", value=p(0.5), constraints=p({"min": 0.0})),
        "GetVariable": pb2.GetVariablesRequest(session_id=s, names=["seed"]),
        "GetVariables": pb2.GetVariablesRequest(session_id=s, names=["seed"]),
        "SetVariable": pb2.SetVariableRequest(session_id=s, name="seed", value=p(8), metadata=p({"k": 1})),
        "SetVariables": pb2.SetVariablesRequest(session_id=s, updates=p({"seed": 9})),
        "ListVariables": pb2.ListVariablesRequest(session_id=s, pattern="s*"),
        "DeleteVariable": pb2.VariableRequest(session_id=s, name="no-such-variable"),
        "VariableHistory": pb2.VariableRequest(session_id=s, name="seed"),
        "RollbackVariable": pb2.RollbackVariableRequest(session_id=s, name="seed", version=0),
        "AddDependency": pb2.AddDependencyRequest(session_id=s, dependent="seed", dependency="other"),
        "StartOptimization": pb2.OptimizationRequest(session_id=s, name="no-such-variable", optimizer_id="o"),
        "StopOptimization": pb2.OptimizationRequest(session_id=s, name="no-such-variable", optimizer_id="o"),
        # a watch of a variable that does not exist ends at once (a live one would never end)
        "WatchVariables": pb2.WatchVariablesRequest(session_id=s, names=["no-such-variable"], include_initial=True),
        "ListHostTools": pb2.ListHostToolsRequest(session_id=s),
        "ExecuteHostTool": pb2.ExecuteToolRequest(tool_name="shout", arguments=p({"text": "hi"}), call_id="h"),
        "ExecuteStreamingHostTool": pb2.ExecuteToolRequest(tool_name="countdown", arguments=p({"n": 2}), call_id="h"),
        "ExecuteTool": pb2.ExecuteToolRequest(tool_name="echo", arguments=p({"value": 1}), call_id="h"),
        "Join": pb2.JoinRequest(address="tcp:127.0.0.1:9", adapter="fuzz:Nothing", tools=["t"]),
    }
    cases = []
    for rpc, base in bases.items():
        thorough = rpc in ("SetVariable", "ExecuteHostTool")
        for label, message in [*mutations(pb2, base, all_documents=thorough), *raw_garbage(rng)]:
            cases.append(Case("host", rpc, label, to_bytes(message)))
        cases.extend(message_counts("host", rpc, base))
    return cases


STREAMING = {"ExecuteStreamingTool", "WatchVariables", "ExecuteStreamingHostTool"}


def run_case(pb2: Any, status_pb2: Any, ch: grpc.Channel, service: str, case: Case, md: list[tuple[str, str]]) -> dict[str, Any]:
    path = f"/trio_bridge.v1.{'WorkerService' if service == 'worker' else 'HostService'}/{case.rpc}"
    started = time.monotonic()
    outcome: dict[str, Any] = {"service": case.service, "rpc": case.rpc, "label": case.label}
    try:
        if case.rpc == "Calls" or isinstance(case.body, list):
            bodies = case.body if isinstance(case.body, list) else [case.body]
            replies = list(ch.stream_stream(path)(iter(bodies), metadata=md, timeout=TIMEOUT))
            outcome["messages"] = len(replies)
            if case.rpc == "Calls":
                outcome["in_band"] = _in_band_kinds(pb2, replies)
        elif case.rpc in STREAMING:
            outcome["messages"] = len(list(ch.unary_stream(path)(case.body, metadata=md, timeout=TIMEOUT)))
        else:
            ch.unary_unary(path)(case.body, metadata=md, timeout=TIMEOUT)
        outcome["status"] = "OK"
    except grpc.RpcError as exc:
        outcome["status"] = exc.code().name
        message = exc.details() or ""
        outcome["message"] = message[:300]
        outcome["message_bytes"] = len(message.encode(errors="replace"))
        trailers = dict(exc.trailing_metadata() or ())
        details = trailers.get("grpc-status-details-bin")
        outcome["trailer_bytes"] = sum(len(k) + len(v) for k, v in trailers.items())
        if details is not None:
            status = status_pb2.Status.FromString(details)
            infos = [pb2.ErrorInfo.FromString(d.value) for d in status.details if d.type_url == ERROR_INFO_TYPE_URL]
            if infos:
                outcome["kind"], outcome["type"] = infos[0].kind, infos[0].type
    outcome["seconds"] = round(time.monotonic() - started, 3)
    return outcome


def _in_band_kinds(pb2: Any, replies: list[bytes]) -> list[str]:
    kinds = []
    for body in replies:
        result = pb2.CallResult.FromString(body)
        kinds.append(result.response.error.kind if result.response.HasField("error") else "result")
    return kinds


def main() -> None:
    config = json.loads(sys.argv[1])
    report: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="wire-fuzz-") as work:
            pb2, pb2_grpc, status_pb2 = generate_stubs(config["proto"], config["status_proto"], os.path.join(work, "stubs"))
            rng = random.Random(config.get("seed", 19))
            targets = {
                "worker": (config["worker"], config["worker_secret"], worker_cases(pb2, config, rng)),
                "host": (config["host"], config["host_secret"], host_cases(pb2, config, rng)),
            }
            outcomes = []
            for service, (address, secret, cases) in targets.items():
                md = [("x-trio-bridge-secret", secret), ("x-trio-bridge-worker", "fuzz")]
                ch = channel(grpc_target(address))
                for case in cases:
                    where = f"{case.service}/{case.rpc}/{case.label}"
                    if config.get("only", "") not in where or any(skip in where for skip in config.get("skip", ())):
                        continue
                    outcomes.append(run_case(pb2, status_pb2, ch, service, case, md))
                ch.close()
            report["outcomes"] = outcomes
            report["after"] = good_calls(pb2, pb2_grpc, config)
    except Exception:
        report["failure"] = traceback.format_exc()
    print(json.dumps(report))
    sys.stdout.flush()
    os._exit(0)  # grpcio's threads need not be waited for


def good_calls(pb2: Any, pb2_grpc: Any, config: dict[str, Any]) -> dict[str, Any]:
    """What a good client gets afterwards, on fresh connections."""
    after: dict[str, Any] = {}
    with channel(grpc_target(config["worker"])) as ch:
        stub, md = pb2_grpc.WorkerServiceStub(ch), [("x-trio-bridge-secret", config["worker_secret"])]
        after["worker_pid"] = stub.Ping(pb2.PingRequest(), metadata=md, timeout=30).pid
        reply = stub.ExecuteTool(pb2.ExecuteToolRequest(tool_name="add", arguments=encode(pb2, {"a": 40}), call_id="good"), metadata=md, timeout=30)
        after["worker_add"] = json.loads(reply.result.json)
    with channel(grpc_target(config["host"])) as ch:
        stub, md = pb2_grpc.HostServiceStub(ch), [("x-trio-bridge-secret", config["host_secret"])]
        after["host_session"] = stub.GetSession(pb2.GetSessionRequest(session_id=config["session_id"]), metadata=md, timeout=30).id
        reply = stub.ExecuteHostTool(pb2.ExecuteToolRequest(tool_name="shout", arguments=encode(pb2, {"text": "hi"}), call_id="good"), metadata=md, timeout=30)
        after["host_tool"] = json.loads(reply.result.json)
    return after


if __name__ == "__main__":
    main()
