"""The stock floors: stock grpclib carrying the pool's calls, and a raw socket ping-pong, nothing of ours.

    python -m benchmarks.floor [--loop uvloop|asyncio]            # a short demo: p50s and throughput
    python -m benchmarks.floor server --loop L PATH                # one stock grpclib server on a Unix socket
    python -m benchmarks.floor echo PATH                           # one raw Unix-socket echo server
    python -m benchmarks.floor client --loop L --echo E PATH...    # one stock client (line protocol on stdin)

``bench.py`` compares ``pool.execute`` with what stock parts do for the same call, each in
processes of their own (server and client), over Unix sockets:

- **server** (``serve``): ``grpclib.server.Server`` on the event loop named by ``--loop``
  (``uvloop``: ``uvloop.new_event_loop``; ``asyncio``: asyncio's default, the selector loop),
  serving the pool's worker service with the messages the pool speaks (the generated betterproto2
  classes of ``trio_bridge._wire.generated.trio_bridge.v1``, stock betterproto2):

  - ``WorkerService.Calls``, one long-lived bidirectional stream per connection, as the pool's
    worker serves it: each ``CallMessage.execute`` runs as its own task, its ``CallResult`` is
    sent when it finishes (an ``asyncio.Lock`` keeps concurrent writes whole);
  - ``WorkerService.ExecuteTool``, one unary RPC per call (HEADERS, DATA and trailers each way).

  A call decodes the arguments (``json.loads`` of ``Payload.json``), runs the tool and encodes its
  result (``json.dumps`` into a ``Payload``). Tools: ``noop`` (a sync function, through
  ``loop.run_in_executor`` on the loop's default thread pool, as the worker runs a sync tool),
  ``anoop`` (an ``async def``, awaited), ``inline_noop`` (a sync function called on the loop, as
  the worker runs ``@tool(inline=True)``). No session, deadline, cancellation or error mapping:
  less work than a worker, so a floor at least as fast.
- **client** (``_Client``): ``grpclib.client.Channel(path=...)`` on the same kind of loop. A call,
  as timed, is what ``pool.execute`` does for its caller: encode the arguments, send, receive,
  decode the result. On the stream: one ``send_message`` and one ``recv_message`` on a stream
  opened once (sequential calls); with many calls in flight, a reader task hands each
  ``CallResult`` to its caller by ``call_id``. Unary: the generated stub's ``execute_tool``.
- **echo** (``echo``): a blocking Unix stream socket that sends back what it reads. The client's
  ``socket`` measure sends the bytes of one encoded ``CallMessage`` (a ``noop`` call) and reads
  as many back: two processes, one round trip through the kernel, nothing else -- the physical
  floor.

Neither grpclib process imports ``trio_bridge._wire.transport`` (which subclasses grpclib's channel
and server and patches h2), the worker, the host, the codec, Trio or the host's asyncio boundary; only the
generated message classes (which import ``trio_bridge`` lazily: ``_errors``, ``_version``),
grpclib, h2 and betterproto2 (and uvloop when ``--loop uvloop``). Each process checks this about
itself at start-up and reports it in its first line (``stock()``); ``StockFloor`` refuses to
run when any is not stock.

Why separate processes: a floor inside the benchmark process would share the pool's patched h2
and the harness's GIL. The client is its own process for the same reason.

The client's line protocol (one command per line, one JSON line back):

- ``measure stream|unary TOOL N``: N sequential calls on the first server; ``measure socket N``:
  N raw ping-pongs with the echo server; ``{"samples": [seconds, ...]}``;
- ``throughput stream|unary TOOL IN_FLIGHT SECONDS``: IN_FLIGHT tasks each calling in a loop
  until SECONDS have passed, task i on server i mod the number of servers (stream: that server's
  one stream); ``{"calls", "seconds", "calls_per_s"}``;
- end of input: the client exits. Servers exit at the end of their standard input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPS = ("uvloop", "asyncio")
CALLS = "/trio_bridge.v1.WorkerService/Calls"

# trio_bridge modules a stock floor process may import: the package (lazy), its errors and version, and the
# generated messages. Anything else of ours (transport, worker, _aio, codec, host) is refused.
ALLOWED_OURS = ("trio_bridge", "trio_bridge._errors", "trio_bridge._version", "trio_bridge._wire", "trio_bridge._wire.generated")


def noop(x: int = 0) -> int:
    return x


async def anoop(x: int = 0) -> int:
    return x


def inline_noop(x: int = 0) -> int:
    return x


TOOLS: dict[str, Any] = {"noop": noop, "anoop": anoop, "inline_noop": inline_noop}
INLINE = {"inline_noop"}


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The ``asyncio.Runner`` loop factory of ``--loop``: uvloop's, or ``None`` (asyncio's default)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def stock(loop_kind: str) -> dict[str, Any]:
    """What this process runs on: the floor is stock only if ``problems`` is empty."""
    import h2
    import h2.connection

    loop = asyncio.get_running_loop()
    name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    ours = sorted(m for m in sys.modules if m == "trio_bridge" or m.startswith("trio_bridge."))
    problems = [f"imports {m}" for m in ours if not (m in ALLOWED_OURS or m.startswith("trio_bridge._wire.generated."))]
    problems += [f"imports {m}" for m in ("trio", "trio_bridge._aio") if m in sys.modules]
    if loop_kind != "uvloop" and "uvloop" in sys.modules:
        problems.append("imports uvloop")
    if "repr" in vars(h2.connection):
        problems.append("h2.connection.repr is patched")
    expected = "uvloop.Loop" if loop_kind == "uvloop" else "asyncio.unix_events._UnixSelectorEventLoop"
    if name != expected:
        problems.append(f"loop is {name}, not {expected}")
    return {"pid": os.getpid(), "loop": name, "h2": h2.__version__, "trio_bridge_modules": ours, "problems": problems}


def _reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _exit_at_end_of_input(on_end: Callable[[], object]) -> None:
    def wait() -> None:
        sys.stdin.buffer.read()
        on_end()

    threading.Thread(target=wait, daemon=True).start()


# ---- the grpclib server ----
async def serve(path: str, loop_kind: str) -> None:
    import betterproto2
    import grpclib.const
    import grpclib.exceptions
    import grpclib.server

    from trio_bridge._wire.generated.trio_bridge import v1 as pb

    loop = asyncio.get_running_loop()

    async def execute(request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        function = TOOLS.get(request.tool_name)
        if function is None:
            raise grpclib.exceptions.GRPCError(grpclib.const.Status.NOT_FOUND, request.tool_name)
        arguments = json.loads(request.arguments.json) if request.arguments is not None else {}
        if inspect.iscoroutinefunction(function):
            result = await function(**arguments)
        elif request.tool_name in INLINE:
            result = function(**arguments)
        else:
            result = await loop.run_in_executor(None, functools.partial(function, **arguments))
        return pb.ExecuteToolResponse(result=pb.Payload(json=json.dumps(result).encode()))

    class StockWorker(pb.WorkerServiceBase):
        async def execute_tool(self, message: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
            return await execute(message)

        async def _calls(self, stream: grpclib.server.Stream[pb.CallMessage, pb.CallResult]) -> None:
            sending = asyncio.Lock()  # one message at a time: concurrent writes would interleave frames
            tasks: set[asyncio.Task[None]] = set()

            async def run(request: pb.ExecuteToolRequest) -> None:
                response = await execute(request)
                async with sending:
                    await stream.send_message(pb.CallResult(call_id=request.call_id, response=response))

            async for message in stream:
                kind, value = betterproto2.which_one_of(message, "kind")
                if kind == "execute" and isinstance(value, pb.ExecuteToolRequest):
                    task = asyncio.create_task(run(value))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            # Calls served by a plain grpclib handler (the generated base offers an async generator,
            # which answers in order; the worker answers each call as it finishes).
            mapping = super().__mapping__()
            mapping[CALLS] = grpclib.const.Handler(
                self._calls, grpclib.const.Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult
            )
            return mapping

    server = grpclib.server.Server([StockWorker()])
    await server.start(path=path)
    stop = asyncio.Event()
    _exit_at_end_of_input(lambda: loop.call_soon_threadsafe(stop.set))
    _reply({"server": path, **stock(loop_kind)})
    await stop.wait()
    server.close()
    await server.wait_closed()


# ---- the raw echo server ----
def echo(path: str) -> None:
    """Send back what one connection sends, until it closes (or this process's input ends)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    _exit_at_end_of_input(lambda: os._exit(0))
    _reply({"echo": path, "pid": os.getpid(), "problems": []})
    connection, _ = listener.accept()
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    while n := connection.recv_into(buffer):
        connection.sendall(view[:n])
    os._exit(0)  # not a normal exit: the thread still reading stdin would make shutdown abort


# ---- the client ----
class _Client:
    def __init__(self, paths: list[str], echo_path: str, stack: contextlib.AsyncExitStack) -> None:
        from grpclib.client import Channel

        from trio_bridge._wire.generated.trio_bridge import v1 as pb

        self.pb = pb
        self.paths = paths
        self.stack = stack
        self.channels = [Channel(path=path) for path in paths]
        self.stubs = [pb.WorkerServiceStub(channel) for channel in self.channels]
        self.streams: list[Any] = []
        self.sending: list[asyncio.Lock] = []
        self.echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.echo.connect(echo_path)
        self.ping = bytes(self.request("noop", 1))  # the raw floor carries a call's bytes
        self.pong = bytearray(len(self.ping))

    def request(self, tool: str, x: int) -> Any:
        pb = self.pb
        return pb.CallMessage(execute=pb.ExecuteToolRequest(
            tool_name=tool, arguments=pb.Payload(json=json.dumps({"x": x}).encode()), call_id=str(x)
        ))

    async def hello(self) -> dict[str, Any]:
        """Connect, open the streams and make a call of each kind: no timed call pays for it."""
        import grpclib.const

        for channel in self.channels:
            stream = await self.stack.enter_async_context(
                channel.request(CALLS, grpclib.const.Cardinality.STREAM_STREAM, self.pb.CallMessage, self.pb.CallResult)
            )
            await stream.send_request()
            self.streams.append(stream)
            self.sending.append(asyncio.Lock())
        for i in range(len(self.channels)):
            await self.unary_call(i, "noop", 0)
            await self.stream_call(i, "noop", 0)
        self.socket_ping()
        return {"client": self.paths}

    async def unary_call(self, server: int, tool: str, x: int) -> Any:
        """One call as ``pool.execute`` makes it, as a unary RPC: arguments in, result out."""
        return _result(await self.stubs[server].execute_tool(self.request(tool, x).execute))

    async def stream_call(self, server: int, tool: str, x: int) -> Any:
        """The same call on the server's stream, nothing else in flight on it."""
        stream = self.streams[server]
        await stream.send_message(self.request(tool, x))
        result = await stream.recv_message()
        return _result(result.response)

    def socket_ping(self) -> None:
        self.echo.sendall(self.ping)
        view, got = memoryview(self.pong), 0
        while got < len(self.pong):
            got += self.echo.recv_into(view[got:])

    async def measure(self, kind: str, tool: str, n: int) -> dict[str, Any]:
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            if kind == "socket":
                self.socket_ping()
            elif kind == "stream":
                await self.stream_call(0, tool, i)
            else:
                await self.unary_call(0, tool, i)
            samples.append(time.perf_counter() - t0)
        return {"samples": samples}

    async def throughput(self, kind: str, tool: str, in_flight: int, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        done = 0
        waiting: dict[str, asyncio.Future[Any]] = {}
        serial = 0

        async def read(server: int) -> None:  # until its stream answers the call named "end"
            while True:
                result = await self.streams[server].recv_message()
                if result.call_id == "end":
                    return
                waiting.pop(result.call_id).set_result(_result(result.response))

        async def multiplexed_call(server: int) -> Any:
            nonlocal serial
            serial += 1
            call_id = str(serial)
            request = self.request(tool, 1)
            request.execute.call_id = call_id
            waiting[call_id] = future = loop.create_future()
            async with self.sending[server]:
                await self.streams[server].send_message(request)
            return await future

        async def caller(server: int) -> None:
            nonlocal done
            while loop.time() < deadline:
                if kind == "stream":
                    await multiplexed_call(server)
                else:
                    await self.unary_call(server, tool, 1)
                done += 1

        readers = [asyncio.create_task(read(i)) for i in range(len(self.streams))] if kind == "stream" else []
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(i % len(self.channels)) for i in range(in_flight)))
        elapsed = time.perf_counter() - t0
        for i, stream in enumerate(self.streams[:len(readers)]):
            end = self.request("noop", 0)
            end.execute.call_id = "end"
            async with self.sending[i]:
                await stream.send_message(end)
        await asyncio.gather(*readers)
        return {"calls": done, "seconds": elapsed, "calls_per_s": done / elapsed}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.echo.close()


def _result(response: Any) -> Any:
    """The decoded result of an ``ExecuteToolResponse``."""
    if response is None or response.result is None:
        raise RuntimeError(f"the floor's server answered without a result: {response!r}")
    return json.loads(response.result.json)


async def run_client(paths: list[str], echo_path: str, loop_kind: str) -> None:
    """Answer the commands on standard input, one at a time, in this one task."""
    from grpclib.exceptions import StreamTerminatedError

    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        client = _Client(paths, echo_path, stack)
        try:
            _reply({**await client.hello(), **stock(loop_kind)})
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                command, kind, *args = line.split()
                if command == "measure" and kind == "socket":
                    _reply(await client.measure(kind, "", int(args[0])))
                elif command == "measure":
                    _reply(await client.measure(kind, args[0], int(args[1])))
                elif command == "throughput":
                    _reply(await client.throughput(kind, args[0], int(args[1]), float(args[2])))
                else:
                    _reply({"error": f"unknown command {line.strip()!r}"})
            for stream in client.streams:
                # the harness may be closing the servers already: the measurements are done
                with contextlib.suppress(RuntimeError, OSError, StreamTerminatedError):
                    await stream.end()
        finally:
            client.close()


# ---- the harness's side: blocking, no asyncio here (the harness runs Trio) ----
class StockFloor:
    """``servers`` stock grpclib server processes, one raw echo server, and one stock client
    process connected to all of them, on ``loop`` (``"uvloop"`` or ``"asyncio"``).

    Blocking methods: call them from a thread (``trio.to_thread.run_sync``) while the pool is idle.
    """

    def __init__(self, servers: int = 1, loop: str = "uvloop") -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, not {loop!r}")
        self.loop = loop
        self._tmp = tempfile.TemporaryDirectory()
        self.paths = [os.path.join(self._tmp.name, f"floor{i}.sock") for i in range(servers)]
        echo_path = os.path.join(self._tmp.name, "echo.sock")
        self._processes: list[subprocess.Popen[str]] = []
        try:
            self.servers = [self._start("server", "--loop", loop, path) for path in self.paths]
            self.echo = self._start("echo", echo_path)
            self.client = self._start("client", "--loop", loop, "--echo", echo_path, *self.paths)
        except BaseException:
            self.close()
            raise
        self.info = {
            "loop": loop, "servers": [s[1] for s in self.servers], "client": self.client[1],
            "echo": self.echo[1], "versions": _versions(),
        }

    def _start(self, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.floor", *args],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._processes.append(process)
        hello = self._read(process)
        if hello["problems"]:
            raise RuntimeError(f"the floor's {args[0]} is not stock: {'; '.join(hello['problems'])}")
        return process, hello

    @staticmethod
    def _read(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"a floor process exited ({process.args}): exit status {process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the floor's client: {reply['error']}")
        return reply

    def _ask(self, command: str) -> dict[str, Any]:
        process = self.client[0]
        assert process.stdin is not None
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return self._read(process)

    def measure(self, kind: str, tool: str, n: int) -> list[float]:
        """Seconds per call of ``n`` sequential calls on the first server: ``kind`` ``"stream"``
        (its one bidirectional stream) or ``"unary"`` (an RPC per call); ``"socket"``: seconds
        per raw ping-pong with the echo server (``tool`` ignored)."""
        if kind == "socket":
            return self._ask(f"measure socket {n}")["samples"]
        return self._ask(f"measure {kind} {tool} {n}")["samples"]

    def throughput(self, kind: str, tool: str, in_flight: int, seconds: float) -> dict[str, Any]:
        """``in_flight`` concurrent callers for ``seconds``, spread evenly over the servers."""
        return self._ask(f"throughput {kind} {tool} {in_flight} {seconds}")

    def close(self) -> None:
        for process in reversed(self._processes):  # the client first: end of input, it exits
            if process.stdin is not None:
                process.stdin.close()
        for process in reversed(self._processes):
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self._processes.clear()
        self._tmp.cleanup()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("grpclib", "h2", "betterproto2", "uvloop"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def demo(loop: str) -> None:
    floor = StockFloor(servers=2, loop=loop)
    try:
        print(json.dumps(floor.info, indent=2))
        for kind, tool in (("socket", ""), ("stream", "noop"), ("stream", "anoop"), ("unary", "noop"), ("unary", "anoop")):
            floor.measure(kind, tool, 200)
            samples = sorted(floor.measure(kind, tool, 1000))
            print(f"{kind} {tool}: p50 {samples[len(samples) // 2] * 1e6:.0f} µs")
        for kind in ("stream", "unary"):
            floor.throughput(kind, "anoop", 64, 0.3)
            t = floor.throughput(kind, "anoop", 64, 2.0)
            print(f"{kind}, anoop, 64 in flight on 2 servers: {t['calls_per_s']:,.0f} calls/s")
    finally:
        floor.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--loop", choices=LOOPS, default="uvloop")
    commands = parser.add_subparsers(dest="command")
    server = commands.add_parser("server")
    server.add_argument("--loop", choices=LOOPS, default="uvloop")
    server.add_argument("path")
    commands.add_parser("echo").add_argument("path")
    client = commands.add_parser("client")
    client.add_argument("--loop", choices=LOOPS, default="uvloop")
    client.add_argument("--echo", required=True)
    client.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.command is None:
        demo(args.loop)
    elif args.command == "echo":
        echo(args.path)
    else:
        coroutine = serve(args.path, args.loop) if args.command == "server" else run_client(args.paths, args.echo, args.loop)
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            runner.run(coroutine)


if __name__ == "__main__":
    main()
