"""How fast would a call be over a plain framing instead of HTTP/2, all else alike? The pool's
call (gRPC's ``WorkerService.Calls`` stream, h2 on both sides) against a prototype call stream
whose frames are a 4-byte little-endian length and exactly the bytes of one of that stream's gRPC
messages; beside ``trio_parallel.run_sync`` and a raw Unix-socket ping-pong (``floor.py``'s), in
one process, interleaved rounds; then each side's CPU per call.

    python -m benchmarks.boundary.plain_frames [ROUNDS]
    python -m benchmarks.boundary.plain_frames profile [N [bare|service]]   # cProfile, both sides

The prototype: a worker process on a Unix socket pair, closed (and waited for) on exit.

- Host (Trio), as the pool's ``H2CallStream``: the arguments' ``codec.encode``; the request the
  pool's ``Calls._request`` makes (``c<hex>-N`` call id, no deadline, session or trace) encoded by
  ``call_messages.encode_execute`` and written by the caller (a non-blocking ``send``; a writer
  task takes what the socket does not); the caller parked by ``_aio.CallStreamBase`` (the pool's
  stream's base: ``wait_task_rescheduled``, rescheduled by call id; a cancelled caller sends
  ``cancel``); a reader task (Trio's epoll, in a nursery an async context manager owns) splits
  the frames, parses each answer with ``call_messages.parse_result`` and delivers it; the
  result's ``codec.decode``.
- Worker, on uvloop as the pool's (``plain asyncio``: asyncio's loop): an ``asyncio.Protocol``
  whose ``data_received`` splits the frames and decodes each request as the worker's server
  codec does (``call_messages.parse_execute``, else ``fast_proto.parse``; ``limits.request_problem``),
  runs it as a task (``cancel`` cancels it) and writes the answer (``call_messages.encode_result``,
  else ``fast_proto``). ``plain bare``: the call is ``codec.decode``,
  the tool (``async def`` awaited; sync: ``executor.submit`` + ``wrap_future`` in a copied context,
  as ``WorkerService._in_thread``), ``codec.encode``. ``plain service``: the worker's own
  ``WorkerService.run_call`` (admission, ``SessionContext``, deadline timer, ``asyncio.timeout``,
  slot release): only the transport differs from the pool's worker.
- ``fake pool``: ``trio_bridge.testing.open_fake_pool`` (the pool's host path, fake in-Trio
  workers, no transport): what the pool's own layers cost above a call stream, plus the fake's.

Not in the prototype, per call: on the host, the pool above its call stream (``Calls``: open
check, router and dispatcher slot, ``ToolCall``, deadline, metrics, outcome; ``GrpcWorker.execute``
and its error mapping) and HTTP/2 (h2's frame header and state to send; ``receive_data``, its
events and window acknowledgements to receive; gRPC's 5-byte prefix); on the worker, HTTP/2
(``FastH2Protocol`` and h2's parsing, ``DirectStream``'s divert, statistics and framing, the
``sending`` lock, ``reply_pending``), and in ``plain bare`` ``WorkerService``'s bookkeeping. Per
connection, not per call: the secret and peer checks, flow control, keepalive, the drain notice;
and no big-message paths (shared memory, owned buffers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import cProfile
import itertools
import os
import pstats
import secrets
import socket
import statistics
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import betterproto2
import trio
import trio_parallel

import trio_bridge
from benchmarks.floor import StockFloor, noop
from benchmarks.timing import cpu_split, timed, timed_calls
from trio_bridge._aio import CallStreamBase, TransportError
from trio_bridge._wire import call_messages, fast_proto
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import timeout_to_wire
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.limits import request_problem
from trio_bridge.testing import open_fake_pool

ADAPTER = "benchmarks.adapters:Bench"
TOOLS = ("anoop", "noop")
PER_ROUND = 300
_LENGTH = struct.Struct("<I")
# label: (worker mode, worker loop)
PROTOTYPES = {"plain bare": ("bare", "uvloop"), "plain service": ("service", "uvloop"), "plain asyncio": ("bare", "asyncio")}
_PROFILE_ENV = "PLAIN_FRAMES_PROFILE"  # the worker profiles its connection's life into this file


def _split(data: bytes) -> tuple[list[memoryview], bytes]:
    """The bodies of the whole frames ``data`` holds, and what is left of a frame still arriving."""
    view, pos, end = memoryview(data), 0, len(data)
    bodies = []
    while end - pos >= 4:
        (size,) = _LENGTH.unpack_from(data, pos)
        if end - pos - 4 < size:
            break
        bodies.append(view[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return bodies, data[pos:]


def _frame(message: pb.CallMessage | pb.CallResult | bytes) -> bytes:
    body = message if isinstance(message, bytes) else fast_proto.serialize(message).tobytes()
    return _LENGTH.pack(len(body)) + body


# ---- the host's side (Trio) ----
class PlainCallStream(CallStreamBase):
    """The calls of one prototype worker, on a connected socket (non-blocking): what
    ``H2CallStream`` does, with plain frames instead of h2. :meth:`run` reads until the socket ends."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(lambda: None)
        self._sock = sock
        self._out = bytearray()  # what the socket did not take at once (the writer sends it)
        self._wake = trio.Event()

    def _send_execute(self, request: pb.ExecuteToolRequest) -> None:
        encoded = call_messages.encode_execute(request)
        self._write(_frame(pb.CallMessage(execute=request) if encoded is None else encoded))

    def _send(self, message: pb.CallMessage) -> None:
        if self.ended:
            raise TransportError("the call stream ended")
        self._write(_frame(message))

    def _write(self, data: bytes) -> None:
        if not self._out:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.fail(f"the connection failed: {exc}")
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._wake.set()
        self._out += data

    async def run(self) -> None:
        """Read and deliver replies (the reader), and send what waits (the writer), until the
        worker closes the connection or this is cancelled; then every waiting call fails."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self.fail("the call stream ended")

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._out:
                await trio.lowlevel.wait_writable(self._sock)
                with contextlib.suppress(BlockingIOError):
                    del self._out[: self._sock.send(self._out)]

    async def _read_loop(self) -> None:
        sock, pending = self._sock, b""
        while True:
            await trio.lowlevel.wait_readable(sock)  # a reply is never there yet: wait, then read
            try:
                data = sock.recv(256 * 1024)
            except BlockingIOError:
                continue
            if not data:
                self.fail("the worker closed the connection")
                return
            if pending:
                data, pending = pending + data, b""
            bodies, pending = _split(data)
            for body in bodies:
                result = call_messages.parse_result(body)
                self.deliver(result if result is not None else fast_proto.parse(pb.CallResult, body.tobytes()))


class PlainWorker:
    """A prototype worker process and its call stream; :meth:`call` is one call as the pool makes it."""

    def __init__(self, stream: PlainCallStream, pid: int) -> None:
        self.stream = stream
        self.pid = pid
        self._prefix = f"c{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        request = pb.ExecuteToolRequest(
            tool_name=tool, arguments=encode(arguments, path="arguments"), call_id=f"{self._prefix}{next(self._ids)}",
            timeout_seconds=timeout_to_wire(None),
        )
        response = await self.stream.execute(request)
        if response.error is not None:
            raise RuntimeError(f"the prototype worker failed the call: {response.error.kind}: {response.error.message}")
        return decode(response.result)


@contextlib.asynccontextmanager
async def open_plain_worker(mode: str, loop: str, env: dict[str, str] | None = None) -> AsyncIterator[PlainWorker]:
    """A prototype worker process (``mode``: ``"bare"`` or ``"service"``; ``loop``: ``"uvloop"``
    or ``"asyncio"``) on one end of a socket pair; it exits when its end closes (this exit)."""
    host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        host_end.setblocking(False)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "benchmarks.boundary.plain_frames", "worker", str(worker_end.fileno()), mode, loop],
            pass_fds=(worker_end.fileno(),), stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
    except BaseException:
        host_end.close()
        raise
    finally:
        worker_end.close()
    stream = PlainCallStream(host_end)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run)
            try:
                yield PlainWorker(stream, process.pid)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        host_end.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


# ---- the worker's side (asyncio) ----
async def anoop(x: int = 0) -> int:
    return x


WORKER_TOOLS: dict[str, Callable[..., Any]] = {"anoop": anoop, "noop": noop}
Execute = Callable[[pb.ExecuteToolRequest], Awaitable[pb.ExecuteToolResponse]]


def _bare(executor: ThreadPoolExecutor) -> Execute:
    async def execute(request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        arguments = decode(request.arguments, owned=True)
        function = WORKER_TOOLS[request.tool_name]
        if function is anoop:  # (the worker knows each tool's kind from its definition)
            result = await function(**arguments)
        else:  # as WorkerService._in_thread
            context = contextvars.copy_context()
            result = await asyncio.wrap_future(executor.submit(context.run, partial(function, **arguments)))
        return pb.ExecuteToolResponse(result=encode(result, path="result"))

    return execute


class _Frames(asyncio.Protocol):
    """The worker's end of the connection: each request a task, each answer written when it ends."""

    def __init__(self, execute: Execute, closed: asyncio.Future[None]) -> None:
        self._execute = execute
        self._closed = closed
        self._pending = b""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        bodies, self._pending = _split(data)
        for body in bodies:
            # as the worker's server codec: the common request by hand (within the limits), any other checked
            message = call_messages.parse_execute(body)
            if message is None:
                message = fast_proto.parse(pb.CallMessage, body.tobytes())
                if (problem := request_problem(message)) is not None:
                    raise ValueError(f"a request the worker's codec refuses: {problem}")
            kind, value = betterproto2.which_one_of(message, "kind")
            if kind == "execute" and isinstance(value, pb.ExecuteToolRequest):
                self._running[value.call_id] = asyncio.get_running_loop().create_task(self._run(value))
            elif kind == "cancel" and isinstance(value, str) and (task := self._running.get(value)) is not None:
                task.cancel()

    async def _run(self, request: pb.ExecuteToolRequest) -> None:
        try:
            response = await self._execute(request)
        except asyncio.CancelledError:
            return
        finally:
            self._running.pop(request.call_id, None)
        answer = pb.CallResult(call_id=request.call_id, response=response)
        self._transport.write(_frame(call_messages.encode_result(answer) or answer))  # by hand where the worker's is

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._running.values():
            task.cancel()
        if not self._closed.done():
            self._closed.set_result(None)


async def _serve(fd: int, mode: str) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tool")  # the pool's worker: concurrency 1
    if mode == "service":
        from trio_bridge.worker._adapter import load_adapter_class
        from trio_bridge.worker._server import WorkerService

        adapter = load_adapter_class(ADAPTER)()
        adapter.setup()
        execute: Execute = WorkerService(ADAPTER, adapter, 1).run_call
    else:
        execute = _bare(executor)
    closed = loop.create_future()
    sock = socket.socket(fileno=fd)
    await loop.connect_accepted_socket(lambda: _Frames(execute, closed), sock)
    profile = os.environ.get(_PROFILE_ENV)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    await closed
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    executor.shutdown(wait=False)


def worker_main(fd: int, mode: str, loop: str) -> None:
    from trio_bridge.worker._server import loop_factory

    with asyncio.Runner(loop_factory=loop_factory({"TRIO_BRIDGE_WORKER_LOOP": loop})) as runner:
        runner.run(_serve(fd, mode))


# ---- the measurements ----
async def self_check(worker: PlainWorker, label: str) -> None:
    """16 calls of each tool in flight at once, each answer checked; then a cancelled call."""
    for tool in TOOLS:
        results: dict[int, Any] = {}

        async def one(i: int, tool: str = tool, results: dict[int, Any] = results) -> None:
            results[i] = await worker.call(tool, {"x": i})

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
        if results != {i: i for i in range(16)}:
            raise AssertionError(f"{label} {tool}: 16 calls in flight answered {results}")
        with trio.move_on_after(0):  # cancelled as it waits: it sends ``cancel``; the stream goes on
            await worker.call(tool, {"x": -1})
        if await worker.call(tool, {"x": 16}) != 16:
            raise AssertionError(f"{label} {tool}: the call after a cancelled one answered wrong")


async def main(rounds: int) -> None:
    lifecycle = trio_bridge.Lifecycle(health_check_interval=0)
    floor = await trio.to_thread.run_sync(StockFloor)
    try:
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(trio_bridge.open_pool(ADAPTER, size=1, lifecycle=lifecycle))
            context = await stack.enter_async_context(trio_parallel.open_worker_context())
            fake = (await stack.enter_async_context(open_fake_pool({"anoop": anoop}, lifecycle=lifecycle))).pool
            plain = {label: await stack.enter_async_context(open_plain_worker(*how)) for label, how in PROTOTYPES.items()}
            for label, worker in plain.items():
                await self_check(worker, label)
            paths: dict[str, Callable[[int], Awaitable[list[float]]]] = {
                "trio_parallel": lambda n: timed(lambda i: context.run_sync(noop, i), n),
                "socket ping-pong": lambda n: trio.to_thread.run_sync(floor.measure, "socket", "", n),
                "fake pool anoop": lambda n: timed_calls(fake, "anoop", n),
            }
            for tool in TOOLS:
                paths[f"pool {tool}"] = lambda n, tool=tool: timed_calls(pool, tool, n)
                for label, worker in plain.items():
                    paths[f"{label} {tool}"] = lambda n, w=worker, tool=tool: timed(lambda i: w.call(tool, {"x": i}), n)
            for measure in paths.values():
                await measure(100)
            samples: dict[str, list[float]] = collections.defaultdict(list)
            for _ in range(rounds):
                for name, measure in paths.items():
                    samples[name] += await measure(PER_ROUND)
            peer, wire = statistics.median(samples["trio_parallel"]), statistics.median(samples["socket ping-pong"])
            print(f"one call at a time, p50 ({rounds} rounds of {PER_ROUND}), and its ratio to trio_parallel's and the socket's")
            for name, s in samples.items():
                p50 = statistics.median(s)
                print(f"  {name:22} {p50 * 1e6:6.0f} µs   / trio_parallel {p50 / peer:5.2f}   / socket {p50 / wire:5.1f}")
            print("CPU per call of anoop (2,000 calls):")
            pool_pid = pool.workers()[0].pid
            assert pool_pid is not None
            splits = {"pool": (lambda n: timed_calls(pool, "anoop", n), pool_pid)}
            for label, worker in plain.items():
                splits[label] = (lambda n, w=worker: timed(lambda i: w.call("anoop", {"x": i}), n), worker.pid)
            for label, (measure, pid) in splits.items():
                split = await cpu_split(measure, pid, 2000)
                print(f"  {label:14} " + ", ".join(f"{k} {v:.0f} µs" for k, v in split.items()))
    finally:
        await trio.to_thread.run_sync(floor.close)


def _rows(source: cProfile.Profile | str) -> Any:
    return pstats.Stats(source).stats.items()  # pyright: ignore[reportAttributeAccessIssue]  # (not in typeshed)


def _top(source: cProfile.Profile | str, title: str, n: int) -> None:
    """The 15 functions with most time of their own, per call (µs), under cProfile; the
    thread's busy time leaves out epoll's wait."""
    table = {k: v for k, v in _rows(source) if k[2] != "<method 'poll' of 'select.epoll' objects>"}  # epoll's wait: idle
    busy = sum(row[2] for row in table.values())
    print(f"{title}: busy {busy / n * 1e6:.0f} µs per call; top 15 by own time: own µs, cumulative µs, calls, per call")
    for (path, line, name), (_, calls, own, cumulative, _) in sorted(table.items(), key=lambda kv: -kv[1][2])[:15]:
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        print(f"  {own / n * 1e6:6.1f} {cumulative / n * 1e6:7.1f} {calls / n:5.1f}  {where}")


async def profile(n: int, mode: str) -> None:
    """cProfile of ``n`` calls of ``anoop`` on the prototype worker of ``mode``: the host's thread
    (those ``n`` calls) and the worker (every call it served, warm-up included)."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"plain-frames-{os.getpid()}.prof")
    try:
        async with open_plain_worker(mode, "uvloop", {_PROFILE_ENV: path}) as worker:
            await self_check(worker, f"plain {mode}")
            await timed(lambda i: worker.call("anoop", {"x": i}), 500)
            profiler = cProfile.Profile()
            profiler.enable()
            await timed(lambda i: worker.call("anoop", {"x": i}), n)
            profiler.disable()
        _top(profiler, f"host (Trio's thread), plain {mode}", n)
        served = next(row[1] for key, row in _rows(path) if key[2] == "_run" and key[0] == __file__)
        _top(path, f"worker, plain {mode} ({served} calls)", served)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:2] == ["profile"]:
        trio.run(profile, int(sys.argv[2]) if len(sys.argv) > 2 else 5000, sys.argv[3] if len(sys.argv) > 3 else "bare")
    else:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5)
