"""A trio-bridge peer written from ``docs/wire.md`` alone, on grpcio: the conformance client.

It imports nothing of ``trio_bridge`` (an import hook refuses it): its gRPC stubs are generated
from ``proto/`` at run time with ``grpc_tools.protoc``, and its payload codec and shared-memory
reader and writer follow the specification. It plays both roles a third party could:

- a **host** of its own worker process: it starts ``python -m trio_bridge.worker`` as the process
  contract says (flags, environment, ready line, lifeline, shared-memory directory) and drives
  every ``WorkerService`` RPC;
- a **worker** of a live pool: it calls every ``HostService`` RPC on the pool's TCP listener.

Usage: ``python -I tests/conformance_client.py CONFIG_JSON`` (``tests/test_conformance_grpcio.py``
runs it). It prints one JSON object, the observations, which the test asserts on.
"""

from __future__ import annotations

import sys


class _NoTrioBridge:
    """Make the rule real: any import of trio_bridge fails."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "trio_bridge" or name.startswith("trio_bridge."):
            raise ImportError(f"the conformance client must not import {name}")
        return None


sys.meta_path.insert(0, _NoTrioBridge())

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import importlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------------------------
# stubs from the .proto alone


def generate_stubs(proto_file: str, status_proto_file: str, out: str) -> tuple[Any, Any, Any]:
    """``bridge_pb2`` and ``bridge_pb2_grpc`` compiled from ``proto_file``, and ``rpc_status_pb2``
    (google.rpc.Status) from ``status_proto_file``, into ``out``. The files are compiled from a
    directory of their own, so the modules are top-level (``bridge_pb2``), not
    ``trio_bridge.v1.*``; the proto packages, which the wire sees, are unchanged."""
    source = os.path.join(out, "src")
    os.makedirs(source)
    shutil.copy(proto_file, os.path.join(source, "bridge.proto"))
    shutil.copy(status_proto_file, os.path.join(source, "rpc_status.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{source}", f"--python_out={out}", f"--grpc_python_out={out}",
         "bridge.proto", "rpc_status.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    return importlib.import_module("bridge_pb2"), importlib.import_module("bridge_pb2_grpc"), importlib.import_module("rpc_status_pb2")


# ---------------------------------------------------------------------------------------------
# the payload codec (docs/wire.md, sections 3 and 4)

TAG = "\x00tb"
MAX_EXACT = 2**53 - 1
HEADER = 4096
FIELDS = struct.Struct("<QQd")  # state, generation, sent at
SENT, READ = 1, 2
SEGMENT_NAME = re.compile(r"[0-9]+-[0-9]+-[0-9a-f]{8}\Z")
TYPESTR = re.compile(r"[<>|][biufcmMSUV][0-9]+(\[[0-9]*[A-Za-z]+\])?\Z")


class InSharedMemory:
    """Send this array through a shared-memory segment of ours (not in-band)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


class SharedMemory:
    """This process's view of a shared-memory directory: segments it writes, references it reads."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._counter = itertools.count()
        self.written: list[str] = []

    def write(self, array: np.ndarray) -> dict[str, Any]:
        data = np.ascontiguousarray(array).tobytes()
        name = f"{os.getpid()}-{next(self._counter)}-{secrets.token_hex(4)}"
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, HEADER + len(data))
            os.pwrite(fd, data, HEADER)
            os.pwrite(fd, FIELDS.pack(SENT, 1, time.time()), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.written.append(name)
        return {TAG: "m", "n": name, "g": 1, "o": 0, "d": array.dtype.str, "s": list(array.shape)}

    def read(self, name: str, generation: int, offset: int, dtype: np.dtype, shape: list[int]) -> np.ndarray:
        if not SEGMENT_NAME.match(name):
            raise ValueError(f"malformed segment name {name!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR)
        try:
            if HEADER + offset + nbytes > os.fstat(fd).st_size:
                raise ValueError(f"segment {name} is too small")
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if FIELDS.unpack(os.pread(fd, FIELDS.size, 0))[1] != generation:
                    raise ValueError(f"segment {name} was taken back")
                os.pwrite(fd, struct.pack("<Q", READ), 0)
                data = os.pread(fd, nbytes, HEADER + offset)  # a copy: we may let go at once
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def encode(pb2: Any, value: Any, shm: SharedMemory | None = None) -> Any:
    """A ``Payload`` for ``value``."""
    blobs: list[bytes] = []

    def convert(v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            if -MAX_EXACT <= v <= MAX_EXACT:
                return v
            return {TAG: "n", "h": ("-" if v < 0 else "") + format(abs(v), "x")}
        if isinstance(v, float):
            if math.isnan(v):
                return {TAG: "f", "v": "nan"}
            if math.isinf(v):
                return {TAG: "f", "v": "inf" if v > 0 else "-inf"}
            return v
        if isinstance(v, (bytes, bytearray)):
            blobs.append(bytes(v))
            return {TAG: "b", "i": len(blobs) - 1}
        if isinstance(v, InSharedMemory):
            assert shm is not None
            return shm.write(v.array)
        if isinstance(v, np.ndarray):
            blobs.append(np.ascontiguousarray(v).tobytes())
            return {TAG: "a", "i": len(blobs) - 1, "d": v.dtype.str, "s": list(v.shape)}
        if isinstance(v, (list, tuple)):
            return [convert(item) for item in v]
        if isinstance(v, dict):
            items = {key: convert(item) for key, item in v.items()}
            if TAG in items:
                return {TAG: "d", "v": [[key, item] for key, item in items.items()]}
            return items
        raise TypeError(f"cannot encode {type(v).__name__}")

    document = json.dumps(convert(value), separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return pb2.Payload(json=document.encode("ascii"), blobs=blobs)


def raw(pb2: Any, document: bytes, blobs: list[bytes] | None = None) -> Any:
    return pb2.Payload(json=document, blobs=blobs or [])


def strict_json(document: bytes) -> Any:
    """Parse as a strict parser of another language would; raises on NaN/Infinity or an int
    beyond a double's exact range."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def exact(text: str) -> int:
        if abs(int(text)) > MAX_EXACT:
            raise ValueError(f"integer {text} is beyond a double's exact range")
        return int(text)

    return json.loads(document.decode("utf-8"), parse_constant=refuse, parse_int=exact)


def decode(payload: Any, shm: SharedMemory | None = None, seen: list[dict[str, Any]] | None = None) -> Any:
    """The value of a ``Payload`` (``None`` if absent or empty). ``seen`` collects its tags."""
    if payload is None or not payload.json:
        return None
    blobs = list(payload.blobs)

    def blob(obj: dict[str, Any]) -> bytes:
        index = obj["i"]
        if type(index) is not int or not 0 <= index < len(blobs):
            raise ValueError(f"blob index {index!r} out of range")
        return blobs[index]

    def array_type(obj: dict[str, Any]) -> tuple[np.dtype, list[int]]:
        if not TYPESTR.match(obj["d"]) or not all(type(n) is int and n >= 0 for n in obj["s"]):
            raise ValueError(f"malformed array tag {obj!r}")
        return np.dtype(obj["d"]), obj["s"]

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        obj = dict(pairs)
        if TAG not in obj:
            return obj
        kind = obj[TAG]
        if seen is not None:
            seen.append(obj)
        if kind == "b":
            return blob(obj)
        if kind == "n":
            if not re.fullmatch(r"-?[0-9a-f]+", obj["h"]):
                raise ValueError(f"malformed int tag {obj!r}")
            return int(obj["h"], 16)
        if kind == "f":
            return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[obj["v"]]
        if kind == "d":
            return {key: item for key, item in obj["v"]}
        if kind == "a":
            dtype, shape = array_type(obj)
            data = blob(obj)
            if len(data) != math.prod(shape) * dtype.itemsize:
                raise ValueError("array data does not fit its dtype and shape")
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        if kind == "m":
            if shm is None:
                raise ValueError("a shared-memory reference, but no directory")
            dtype, shape = array_type(obj)
            return shm.read(obj["n"], obj["g"], obj["o"], dtype, shape)
        raise ValueError(f"unknown tag {kind!r}")

    strict_json(payload.json)  # what a strict parser of another language would accept
    return json.loads(payload.json.decode("utf-8"), object_pairs_hook=hook, parse_constant=lambda name: 1 / 0)


def same(a: Any, b: Any) -> bool:
    """Equal in type and value: NaN equals NaN, the sign of zero counts, arrays by dtype, shape and bytes."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return type(b) is list and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return type(b) is float and ((math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)))
    return type(a) is type(b) and a == b


def error(info: Any) -> dict[str, Any] | None:
    """An ErrorInfo as a dict (``None`` when the field is not set)."""
    if info is None:
        return None
    return {"kind": info.kind, "type": info.type, "message": info.message, "traceback": info.traceback, "available": list(info.available)}


def has(message: Any, field: str) -> bool:
    return message.HasField(field)


ERROR_INFO_TYPE_URL = "type.googleapis.com/trio_bridge.v1.ErrorInfo"


def collect(pb2: Any, status_pb2: Any, call: Any) -> tuple[list[Any], dict[str, Any]]:
    """A server stream's messages, and how it ended: ``{"status": "OK"}``, or its :func:`failure`."""
    messages: list[Any] = []
    try:
        for message in call:
            messages.append(message)
    except grpc.RpcError as exc:
        return messages, failure(pb2, status_pb2, exc)
    return messages, {"status": "OK"}


def failure(pb2: Any, status_pb2: Any, exc: Any) -> dict[str, Any]:
    """A failed RPC as the error model says (docs/wire.md, section 8): its status code and
    message, and the ErrorInfo in the google.rpc.Status of its ``grpc-status-details-bin``
    trailer (``None`` when there is none)."""
    code = exc.code()
    details = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
    info = None
    if details is not None:
        status = status_pb2.Status.FromString(details)
        assert status.code == code.value[0], f"the details say {status.code}, the status {code}"
        found = [pb2.ErrorInfo.FromString(d.value) for d in status.details if d.type_url == ERROR_INFO_TYPE_URL]
        info = found[0] if found else None
    return {"status": code.name, "message": exc.details(), "error": error(info)}


# ---------------------------------------------------------------------------------------------
# worker processes, started as the process contract says (docs/wire.md, section 5)


class WorkerProcess:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.address: str | None = None

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip("\n"))

    def ready_line(self, timeout: float = 90.0) -> str | None:
        """The ready line's address (``None``: it exited first)."""
        found: list[str] = []

        def read() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("TRIO_BRIDGE_READY "):
                    found.append(text)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            return None
        self.address = found[0].removeprefix("TRIO_BRIDGE_READY ")
        return found[0]

    def wait(self, timeout: float = 30.0) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_stderr(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.stderr):
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, 9)
            self.popen.wait()
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()


def worker_command(python: str, adapter: str, listen: str, *extra: str) -> list[str]:
    return [python, "-m", "trio_bridge.worker", "--adapter", adapter, "--listen", listen, "--concurrency", "4",
            "--heartbeat-interval", "5", *extra]


def worker_env(config: dict[str, Any], secret: str, shm_dir: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_BRIDGE_")}
    env.update({
        "TRIO_BRIDGE_SECRET": secret, "TRIO_BRIDGE_WORKER_ID": "conformance-worker", "TRIO_BRIDGE_ADAPTER_OPTIONS": "{}",
        "TRIO_BRIDGE_HOST_PID": str(os.getpid()), "PYTHONPATH": config["root"],
    })
    if shm_dir is not None:
        env.update({"TRIO_BRIDGE_SHM_DIR": shm_dir, "TRIO_BRIDGE_SHM_THRESHOLD": "1024"})
    return env


def channel(target: str) -> grpc.Channel:
    # grpcio refuses messages over 4 MiB unless told otherwise (docs/wire.md, section 9)
    return grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])


def grpc_target(address: str) -> str:
    """A trio-bridge address (section 1) as a grpcio target."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        return f"unix-abstract:{rest[1:]}" if rest.startswith("@") else f"unix:{rest}"
    return rest.removeprefix("//")


def status_of(call: Any) -> dict[str, Any]:
    """The gRPC status a call failed with."""
    try:
        call()
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details()}
    return {"code": "OK", "details": ""}


# ---------------------------------------------------------------------------------------------
# WorkerService


def drive_worker(
    pb2: Any, pb2_grpc: Any, status_pb2: Any, report: dict[str, Any], main: WorkerProcess, lifeline: WorkerProcess,
    broken: WorkerProcess, secret: str, shm: SharedMemory | None,
) -> None:
    r: dict[str, Any] = report.setdefault("worker", {})
    r["ready_line"] = main.ready_line()
    assert main.address is not None, f"no ready line; stderr: {main.stderr[-20:]}"

    # the process contract: lifeline, and a bad adapter
    lifeline.ready_line()
    assert lifeline.popen.stdin is not None
    lifeline.popen.stdin.close()
    r["lifeline_exit"] = lifeline.wait(30)
    r["bad_adapter_exit"] = broken.wait(90)
    r["bad_adapter_stderr"] = "\n".join(broken.stderr)

    ch = channel(grpc_target(main.address))
    stub = pb2_grpc.WorkerServiceStub(ch)
    md = [("x-trio-bridge-secret", secret)]
    ids = (f"k{n}" for n in itertools.count(1))

    def request(tool: str, arguments: Any = None, **fields: Any) -> Any:
        payload = arguments if isinstance(arguments, pb2.Payload) else encode(pb2, arguments or {}, shm)
        fields.setdefault("call_id", next(ids))
        return pb2.ExecuteToolRequest(tool_name=tool, arguments=payload, **fields)

    def execute(tool: str, arguments: Any = None, **fields: Any) -> Any:
        return stub.ExecuteTool(request(tool, arguments, **fields), metadata=md, timeout=60)

    # ---- authentication and the handshake
    r["ping_without_secret"] = status_of(lambda: stub.Ping(pb2.PingRequest(), timeout=30))
    r["describe_other_version"] = status_of(
        lambda: stub.Describe(pb2.DescribeRequest(trio_bridge_version="9.9.9", wire_version=999), metadata=md, timeout=30)
    )
    described = stub.Describe(pb2.DescribeRequest(trio_bridge_version="conformance", wire_version=report["wire_version"]), metadata=md, timeout=30)
    r["describe"] = {
        "adapter": described.adapter, "pid": described.pid, "concurrency": described.concurrency,
        "wire_version": described.wire_version, "python_version": described.python_version,
        "tools": {
            t.name: {
                "streaming": t.streaming, "description": t.description,
                "parameters": [[p.name, p.type, p.required, repr(decode(p.default)) if has(p, "default") else None] for p in t.parameters],
            }
            for t in described.tools
        },
    }
    ping = stub.Ping(pb2.PingRequest(), metadata=md, timeout=30)
    r["ping"] = {"pid_is_the_process": ping.pid == main.popen.pid, "active_calls": list(ping.active_calls), "uptime": ping.uptime_seconds}

    # ---- values: every tag, both ways, in-band and through shared memory
    value: dict[str, Any] = {
        "none": None, "flags": [True, False], "text": "é\x00\u2603", "ints": [0, -1, MAX_EXACT, -MAX_EXACT, MAX_EXACT + 1, -(2**64), 3**200],
        "floats": [1.5, 2.0, -0.0, math.nan, math.inf, -math.inf, 5e-324],
        "bytes": b"\x00\xff" * 3, "small": np.arange(6, dtype="<i4").reshape(2, 3), "complex": np.array([1 + 2j], dtype="<c16"),
        "big_endian": np.array([1, 258], dtype=">u2"), "when": np.array(["2024-01-02"], dtype="<M8[D]"),
        "tag_like": {TAG: "b", "i": 0}, "nested_tag_like": [{TAG: "f", "v": "nan", "x": [math.inf]}],
        "tuple": (1, "two"),
    }
    if shm is not None:
        value["in_band_big"] = np.arange(512, dtype="<f8")  # past the threshold: the worker sends it back by segment
        value["ours"] = InSharedMemory(np.arange(1000, dtype=">i4"))  # our segment: forwarded back as it is
    echoed = execute("echo", {"value": value})
    tags: list[dict[str, Any]] = []
    got = decode(echoed.result, shm, tags)
    expected = {k: (v.array if isinstance(v, InSharedMemory) else v) for k, v in value.items()}
    r["echo"] = {
        "has_result": has(echoed, "result"), "same": same(expected, got), "got": repr(got)[:2000],
        "tag_kinds": sorted({t[TAG] for t in tags}),
        "segments": [[t["n"], t["n"].split("-")[0] == str(main.popen.pid)] for t in tags if t[TAG] == "m"],
        "ours": shm.written if shm is not None else [],
    }
    big = bytes(range(256)) * (5 << 12)  # 5 MiB in-band: past grpcio's default limit
    r["echo_5_mib"] = decode(execute("echo", {"value": big}).result) == big

    # ---- refusals and failures: a status with the ErrorInfo in its details
    def outcome(call: Any) -> Any:
        try:
            response = call()
        except grpc.RpcError as exc:
            return failure(pb2, status_pb2, exc)
        return {"result": repr(decode(response.result, shm))}

    def in_band(response: Any) -> Any:  # a CallResult's: calls share the Calls stream
        return {"error": error(response.error)} if has(response, "error") else {"result": repr(decode(response.result, shm))}

    r["unknown_tool"] = outcome(lambda: execute("no_such_tool"))
    r["tool_raised"] = outcome(lambda: execute("fail", {"message": "boom"}))
    r["missing_argument"] = outcome(lambda: execute("add", {}))
    r["default_argument"] = outcome(lambda: execute("add", {"a": 1}))
    big_sum = execute("add", {"a": 2**62, "b": 2**62})
    r["big_sum"] = {"value": decode(big_sum.result) == 2**63, "json": big_sum.result.json.decode()}
    r["streaming_tool_unary"] = outcome(lambda: execute("count", {"n": 3}))
    r["bare_nan"] = outcome(lambda: execute("echo", raw(pb2, b'{"value":NaN}')))
    r["bad_int_tag"] = outcome(lambda: execute("echo", raw(pb2, b'{"value":{"\\u0000tb":"n","h":"0x1f"}}')))
    r["bad_blob_index"] = outcome(lambda: execute("echo", raw(pb2, b'{"value":{"\\u0000tb":"b","i":3}}', [b"x"])))
    r["empty_call_id"] = outcome(lambda: execute("add", {"a": 1}, call_id=""))
    r["unencodable_result"] = outcome(lambda: execute("unencodable"))
    started = time.monotonic()
    r["deadline"] = outcome(lambda: execute("async_sleep", {"seconds": 30}, timeout_seconds=0.3))
    r["deadline_took"] = time.monotonic() - started
    slow = stub.ExecuteTool.future(request("async_sleep", {"seconds": 1.0}, call_id="dup"), metadata=md, timeout=60)
    time.sleep(0.3)
    r["duplicate_call_id"] = outcome(lambda: execute("add", {"a": 1}, call_id="dup"))
    r["duplicate_first"] = outcome(slow.result)
    r["malformed_message"] = status_of(
        # a DescribeRequest whose string field is not UTF-8: not valid proto3
        lambda: ch.unary_unary("/trio_bridge.v1.WorkerService/Describe")(b"\x0a\x02\xff\xfe", metadata=md, timeout=30)
    )

    # ---- Calls: one stream, results in finishing order, cancel by id
    outbox: queue.Queue[Any] = queue.Queue()

    def requests() -> Any:
        while (message := outbox.get()) is not None:
            yield message

    results = stub.Calls(requests(), metadata=md)
    order: list[str] = []
    received: dict[str, Any] = {}

    def take() -> None:
        result = next(results)
        order.append(result.call_id)
        received[result.call_id] = in_band(result.response)

    outbox.put(pb2.CallMessage(execute=request("async_sleep", {"seconds": 60}, call_id="s-long")))
    outbox.put(pb2.CallMessage(execute=request("add", {"a": 1, "b": 2}, call_id="s-add")))
    take()
    in_flight = list(stub.Ping(pb2.PingRequest(), metadata=md, timeout=30).active_calls)
    outbox.put(pb2.CallMessage(cancel="s-long"))
    outbox.put(pb2.CallMessage(cancel="s-not-running"))
    outbox.put(pb2.CallMessage(execute=request("async_sleep", {"seconds": 0.5}, call_id="s-slow")))
    outbox.put(pb2.CallMessage(execute=request("echo", {"value": [2**64, math.nan]}, call_id="s-echo")))
    take()
    take()
    freed = _wait_until(lambda: "s-long" not in stub.Ping(pb2.PingRequest(), metadata=md, timeout=30).active_calls, 10)
    outbox.put(pb2.CallMessage(execute=request("async_sleep", {"seconds": 0.3}, call_id="s-last")))
    time.sleep(0.1)
    outbox.put(None)  # half-close: the worker answers what runs, then ends the stream
    for result in results:
        order.append(result.call_id)
        received[result.call_id] = in_band(result.response)
    r["calls"] = {
        "order": order, "results": received, "long_was_in_flight": "s-long" in in_flight, "cancelled_freed": freed,
        "ended": results.code().name,
    }

    # ---- ExecuteStreamingTool
    def stream(tool: str, arguments: Any, call_id: str) -> dict[str, Any]:
        batches, end = collect(pb2, status_pb2, stub.ExecuteStreamingTool(request(tool, arguments, call_id=call_id), metadata=md, timeout=60))
        chunks: list[Any] = []
        for batch in batches:
            chunks.extend((decode(batch.chunks, shm) or []) if has(batch, "chunks") else [])
        return {
            "messages": len(batches), "sizes": [len(decode(b.chunks) or []) if has(b, "chunks") else 0 for b in batches],
            "chunks": chunks, "end": end,
        }

    counted = stream("count", {"n": 600}, "t-count")
    r["stream_count"] = {**counted, "chunks": counted["chunks"] == list(range(600))}
    r["stream_fails"] = stream("fail_midway", {"n": 3}, "t-fail")
    r["stream_unary_tool"] = stream("echo", {"value": 1}, "t-unary")
    r["stream_unencodable"] = stream("unencodable_after", {"n": 2}, "t-unenc")
    special = [math.nan, 2**64, b"x", {TAG: "n"}]
    echoed_chunks = stream("echo_chunks", {"value": special, "times": 3}, "t-special")
    r["stream_special"] = same([special] * 3, echoed_chunks["chunks"])
    call = stub.ExecuteStreamingTool(request("count", {"n": 1_000_000, "delay": 0.001}, call_id="t-cancel"), metadata=md)
    first = next(call)
    call.cancel()
    r["stream_cancel"] = {
        "first": len(decode(first.chunks) or []) > 0,
        "freed": _wait_until(lambda: not stub.Ping(pb2.PingRequest(), metadata=md, timeout=30).active_calls, 10),
    }

    # ---- sessions
    initialized = stub.InitializeSession(
        pb2.InitializeSessionRequest(session_id="conf-session", metadata=encode(pb2, {"owner": "conformance"})), metadata=md, timeout=30
    )
    cleaned = stub.CleanupSession(pb2.CleanupSessionRequest(session_id="conf-session"), metadata=md, timeout=30)
    r["sessions"] = [initialized.ByteSize(), cleaned.ByteSize()]

    # ---- Shutdown: calls in flight finish, new ones are refused, the process exits 0
    draining = stub.ExecuteTool.future(request("async_sleep", {"seconds": 1.0}, call_id="drain"), metadata=md, timeout=60)
    time.sleep(0.3)
    r["shutdown_reply"] = stub.Shutdown(pb2.ShutdownRequest(grace_seconds=20), metadata=md, timeout=30).ByteSize()
    r["after_shutdown"] = outcome(lambda: execute("add", {"a": 1}))
    r["drained_call"] = outcome(draining.result)
    r["exit_code"] = main.wait(30)
    ch.close()


def _wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# HostService


def drive_host(pb2: Any, pb2_grpc: Any, status_pb2: Any, config: dict[str, Any], r: dict[str, Any], joining: WorkerProcess) -> None:
    ch = channel(grpc_target(config["host"]))
    stub = pb2_grpc.HostServiceStub(ch)
    md = [("x-trio-bridge-secret", config["token"]), ("x-trio-bridge-worker", "conformance")]
    session = config["session_id"]

    def outcome(call: Any) -> Any:
        try:
            response = call()
        except grpc.RpcError as exc:
            return failure(pb2, status_pb2, exc)
        return {"result": decode(response.result)} if hasattr(response, "result") else {"reply_size": response.ByteSize()}

    def variables(call: Any) -> Any:
        try:
            reply = call()
        except grpc.RpcError as exc:
            return failure(pb2, status_pb2, exc)
        return {
            "variables": [
                {
                    "id": v.id, "name": v.name, "type": v.type, "value": repr(decode(v.value)), "constraints": decode(v.constraints),
                    "metadata": repr(decode(v.metadata)), "version": v.version, "source": v.source, "optimizer_id": v.optimizer_id,
                    "depends_on": list(v.depends_on), "times": v.created_at > 0 and v.updated_at >= v.created_at,
                }
                for v in reply.variables
            ],
            "errors": {name: error(info) for name, info in reply.errors.items()},
            "state_version": reply.state_version, "lock_lease_seconds": reply.lock_lease_seconds,
            "history": [[h.version, repr(decode(h.value)), h.source] for h in reply.history],
        }

    r["without_secret"] = status_of(lambda: stub.Heartbeat(pb2.HeartbeatRequest(worker_id="w0"), timeout=30))
    r["heartbeat"] = [
        stub.Heartbeat(pb2.HeartbeatRequest(worker_id=config["pool_worker_id"], pid=os.getpid()), metadata=md, timeout=30).known,
        stub.Heartbeat(pb2.HeartbeatRequest(worker_id="ghost"), metadata=md, timeout=30).known,
    ]

    # ---- sessions
    got = stub.GetSession(pb2.GetSessionRequest(session_id=session), metadata=md, timeout=30)
    r["session"] = {
        "id": got.id, "ttl": got.ttl, "metadata": repr(decode(got.metadata)), "variable_count": got.variable_count,
        "state_version": got.state_version,
    }
    r["session_missing"] = outcome(lambda: stub.GetSession(pb2.GetSessionRequest(session_id="no-such-session"), metadata=md, timeout=30))

    # ---- variables
    def call(method: str, message: Any, **options: Any) -> Any:
        return variables(lambda: getattr(stub, method)(message, metadata=md, timeout=30, **options))

    p = lambda value: encode(pb2, value)  # noqa: E731
    v: dict[str, Any] = {}
    v["register"] = call("RegisterVariable", pb2.RegisterVariableRequest(
        session_id=session, name="temperature", type="float", value=p(0.5), constraints=p({"min": 0.0, "max": 2.0}),
        metadata=p({"unit": "K", "big": 2**60})))
    v["register_tensor"] = call("RegisterVariable", pb2.RegisterVariableRequest(
        session_id=session, name="weights", type="tensor", value=p(np.arange(6, dtype="<f4").reshape(2, 3)),
        constraints=p({"shape": [2, 3], "dtype": "float32"})))
    v["register_big"] = call("RegisterVariable", pb2.RegisterVariableRequest(session_id=session, name="counter", type="integer", value=p(2**60)))
    variable_id = v["register"]["variables"][0]["id"]
    v["get"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session, names=["temperature"]))
    v["get_by_id"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session, names=[variable_id]))
    v["get_missing"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session, names=["nope"]))
    v["get_nothing"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session))
    v["get_many"] = call("GetVariables", pb2.GetVariablesRequest(session_id=session, names=["temperature", "counter"]))
    v["get_all"] = call("GetVariables", pb2.GetVariablesRequest(session_id=session, all=True))
    v["set"] = call("SetVariable", pb2.SetVariableRequest(session_id=session, name="temperature", value=p(0.7), expected_version=0))
    v["set_conflict"] = call("SetVariable", pb2.SetVariableRequest(session_id=session, name="temperature", value=p(0.9), expected_version=0))
    v["set_invalid"] = call("SetVariable", pb2.SetVariableRequest(session_id=session, name="temperature", value=p(5.0)))
    v["set_malformed"] = call("SetVariable", pb2.SetVariableRequest(session_id=session, name="temperature", value=raw(pb2, b"Infinity")))
    v["after_refusals"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session, names=["temperature"]))
    v["set_many_atomic"] = call("SetVariables", pb2.SetVariablesRequest(
        session_id=session, updates=p({"temperature": 1.0, "counter": -(2**60)}), atomic=True))
    v["set_many_partial"] = call("SetVariables", pb2.SetVariablesRequest(
        session_id=session, updates=p({"temperature": 1.5, "counter": "x"}), atomic=False))
    v["list"] = call("ListVariables", pb2.ListVariablesRequest(session_id=session, pattern="t*"))
    v["list_all"] = call("ListVariables", pb2.ListVariablesRequest(session_id=session))
    v["history"] = call("VariableHistory", pb2.VariableRequest(session_id=session, name="temperature"))
    v["rollback"] = call("RollbackVariable", pb2.RollbackVariableRequest(session_id=session, name="temperature", version=1))
    v["depend"] = call("AddDependency", pb2.AddDependencyRequest(session_id=session, dependent="temperature", dependency="counter"))
    v["cycle"] = call("AddDependency", pb2.AddDependencyRequest(session_id=session, dependent="counter", dependency="temperature"))
    v["optimize"] = call("StartOptimization", pb2.OptimizationRequest(session_id=session, name="temperature", optimizer_id="opt-1"))
    v["locked"] = call("SetVariable", pb2.SetVariableRequest(session_id=session, name="temperature", value=p(0.1)))
    v["optimizer_writes"] = call("SetVariable", pb2.SetVariableRequest(
        session_id=session, name="temperature", value=p(0.2), optimizer_id="opt-1"))
    v["stop_optimizing"] = call("StopOptimization", pb2.OptimizationRequest(session_id=session, name="temperature", optimizer_id="opt-1"))
    v["delete"] = call("DeleteVariable", pb2.VariableRequest(session_id=session, name="weights"))
    v["deleted"] = call("GetVariable", pb2.GetVariablesRequest(session_id=session, names=["weights"]))
    r["variables"] = v

    # ---- WatchVariables
    watch = stub.WatchVariables(
        pb2.WatchVariablesRequest(session_id=session, names=["temperature"], include_initial=True, heartbeat_seconds=0.3),
        metadata=[*md, ("x-trio-bridge-watch-buffer", "16")],
    )

    def updates(batch: Any) -> Any:
        return [[u.name, u.kind, repr(decode(u.old_value)), repr(decode(u.new_value)), u.version, u.source, u.coalesced] for u in batch.updates]

    watched = [updates(next(watch))]
    stub.SetVariable(pb2.SetVariableRequest(session_id=session, name="temperature", value=p(1.25)), metadata=md, timeout=30)
    watched.append(updates(next(watch)))
    watched.append(updates(next(watch)))  # nothing happens for 0.3 s: a heartbeat
    watch.cancel()
    r["watch"] = watched
    batches, end = collect(pb2, status_pb2, stub.WatchVariables(
        pb2.WatchVariablesRequest(session_id=session, names=["nope"], include_initial=True), metadata=md, timeout=30))
    r["watch_unknown"] = {"batches": [updates(b) for b in batches], "end": end}
    batches, end = collect(pb2, status_pb2, stub.WatchVariables(
        pb2.WatchVariablesRequest(session_id=session, names=["temperature"]), metadata=[*md, ("x-trio-bridge-watch-buffer", "zero")],
        timeout=30))
    r["watch_bad_buffer"] = {"batches": [updates(b) for b in batches], "end": end}

    # ---- host tools
    def specs(reply: Any) -> Any:
        return {t.name: [t.streaming, [[q.name, q.type, q.required] for q in t.parameters]] for t in reply.tools}

    r["host_tools"] = specs(stub.ListHostTools(pb2.ListHostToolsRequest(), metadata=md, timeout=30))
    r["host_tools_in_session"] = sorted(specs(stub.ListHostTools(pb2.ListHostToolsRequest(session_id=session), metadata=md, timeout=30)))

    def tool_request(name: str, arguments: Any, **fields: Any) -> Any:
        return pb2.ExecuteToolRequest(tool_name=name, arguments=p(arguments), call_id="conformance-call", **fields)

    def host_tool(name: str, arguments: Any, **fields: Any) -> Any:
        return outcome(lambda: stub.ExecuteHostTool(tool_request(name, arguments, **fields), metadata=md, timeout=60))

    r["host_tool"] = host_tool("shout", {"text": "hi"})
    special = {"nan": math.nan, "big": -(2**70), "raw": b"\x01", "tag_like": {TAG: "f", "v": "inf"}, "a": np.arange(3, dtype="<i2")}
    echoed = outcome(lambda: stub.ExecuteHostTool(tool_request("echo_host", {"value": special}), metadata=md, timeout=60))
    r["host_tool_values"] = same(special, echoed.get("result"))
    r["host_tool_unknown"] = host_tool("no_such_tool", {})
    r["host_tool_raised"] = host_tool("explode", {"message": "kaput"})
    r["host_tool_streaming_unary"] = host_tool("countdown", {"n": 2})
    r["host_tool_deadline"] = host_tool("nap", {"seconds": 30}, timeout_seconds=0.3)
    r["host_tool_in_session"] = host_tool("session_only", {}, session_id=session)
    batches, end = collect(pb2, status_pb2, stub.ExecuteStreamingHostTool(tool_request("countdown", {"n": 600}), metadata=md, timeout=60))
    chunks = [c for b in batches if has(b, "chunks") for c in decode(b.chunks)]
    r["host_stream"] = {"chunks": chunks == list(range(600, 0, -1)), "messages": len(batches), "end": end}
    failing, end = collect(
        pb2, status_pb2, stub.ExecuteStreamingHostTool(tool_request("countdown_then_fail", {"n": 3}), metadata=md, timeout=60)
    )
    r["host_stream_fails"] = {"chunks": [c for b in failing if has(b, "chunks") for c in decode(b.chunks)], "end": end}
    r["routed"] = outcome(lambda: stub.ExecuteTool(tool_request("add", {"a": 2**62, "b": 2**62}), metadata=md, timeout=60))
    r["routed_in_session"] = outcome(
        lambda: stub.ExecuteTool(tool_request("echo", {"value": [math.inf]}, session_id=session), metadata=md, timeout=60)
    )
    r["routed_unknown"] = outcome(lambda: stub.ExecuteTool(tool_request("no_such_tool", {}), metadata=md, timeout=60))

    # ---- Join
    r["join_refused"] = outcome(lambda: stub.Join(pb2.JoinRequest(address="tcp:127.0.0.1:9", adapter="other.module:Other"), metadata=md, timeout=30))
    joining.ready_line()
    assert joining.address is not None, f"the joining worker printed no ready line: {joining.stderr[-20:]}"
    worker_channel = channel(grpc_target(joining.address))
    worker_stub = pb2_grpc.WorkerServiceStub(worker_channel)
    worker_md = [("x-trio-bridge-secret", config["token"])]
    tools = sorted(t.name for t in worker_stub.Describe(
        pb2.DescribeRequest(trio_bridge_version="conformance", wire_version=config["wire_version"]), metadata=worker_md, timeout=30).tools)
    reply = stub.Join(pb2.JoinRequest(address=joining.address, adapter=config["adapter"], tools=tools), metadata=md, timeout=30)
    r["join"] = {
        "address": joining.address, "reply_size": reply.ByteSize(),
        "dialed_back": joining.wait_for_stderr("serving the host at", 60),
    }
    worker_channel.close()
    ch.close()


# ---------------------------------------------------------------------------------------------


class Processes:
    """The worker processes the client starts, all before any gRPC channel exists (grpcio and
    fork() do not mix well), as a host would (docs/wire.md, section 5)."""

    def __init__(self, config: dict[str, Any], work: str) -> None:
        python, adapter = config["python"], config["adapter"]
        self.secret = "conformance-" + secrets.token_hex(8)
        self.shm_dir = tempfile.mkdtemp(prefix="conformance-shm-", dir="/dev/shm") if os.access("/dev/shm", os.W_OK) else None
        env = worker_env(config, self.secret, None)
        self.main = WorkerProcess(worker_command(python, adapter, f"unix:{os.path.join(work, 'worker.sock')}"),
                                  worker_env(config, self.secret, self.shm_dir))
        self.lifeline = WorkerProcess(worker_command(python, adapter, "unix:@conformance-" + secrets.token_hex(6)), env)
        self.broken = WorkerProcess(worker_command(python, "no_such_module:Nothing", f"unix:{os.path.join(work, 'b.sock')}"), env)
        # a standalone worker on TCP, to offer to the host with Join (the pool's token is its secret)
        self.joining = WorkerProcess(
            worker_command(python, adapter, "tcp:127.0.0.1:0", "--standalone"),
            {**worker_env(config, config["token"], None), "TRIO_BRIDGE_WORKER_ID": ""},
        )

    def close(self) -> None:
        for process in (self.main, self.lifeline, self.broken, self.joining):
            process.kill()
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)


def main() -> None:
    config = json.loads(sys.argv[1])
    report: dict[str, Any] = {"wire_version": config["wire_version"]}
    failed = False
    with tempfile.TemporaryDirectory(prefix="conformance-") as work:
        processes = Processes(config, work)
        try:
            pb2, pb2_grpc, status_pb2 = generate_stubs(config["proto"], config["status_proto"], os.path.join(work, "stubs"))
            report["stub_modules"] = [pb2.__name__, pb2_grpc.__name__, status_pb2.__name__]
            shm = SharedMemory(processes.shm_dir) if processes.shm_dir else None
            drive_worker(pb2, pb2_grpc, status_pb2, report, processes.main, processes.lifeline, processes.broken, processes.secret, shm)
            drive_host(pb2, pb2_grpc, status_pb2, config, report.setdefault("host", {}), processes.joining)
        except Exception:
            report["failure"] = traceback.format_exc()
            failed = True
        finally:
            processes.close()
    report["imported_trio_bridge"] = sorted(name for name in sys.modules if name.split(".")[0] == "trio_bridge")
    print(json.dumps(report, default=repr))
    sys.stdout.flush()
    os._exit(1 if failed else 0)  # grpcio's threads need not be waited for


if __name__ == "__main__":
    main()
