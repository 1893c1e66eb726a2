"""The stock floor of issue 9: a bare grpclib client calling a bare grpclib server, nothing of ours.

    python -m benchmarks.floor                     # a short demo: p50s and throughput
    python -m benchmarks.floor server PATH         # one stock server on a Unix socket
    python -m benchmarks.floor client PATH [PATH]  # one stock client (line protocol on stdin)

Issue 9's unary target compares ``pool.execute`` with "the bare grpclib floor measured in the
same run (the stock floor, without your patches)". The floor is therefore:

- **server**: a process of its own, ``asyncio.run`` on the default event loop (the selector loop,
  no uvloop), ``grpclib.server.Server`` on a Unix socket, serving ``WorkerService.ExecuteTool``
  through the generated betterproto2 base class (``trio_bridge._wire.generated.trio_bridge.v1``,
  the messages the pool's worker speaks for a unary call). The handler does what a worker's
  minimal path does: decodes the arguments (``json.loads`` of ``Payload.json``), calls the tool
  (``noop``: a sync function, through ``loop.run_in_executor`` on asyncio's default thread pool,
  as a worker runs a sync tool; ``anoop``: an ``async def``, awaited directly, as a worker runs an
  async tool) and encodes the result (``json.dumps`` into a ``Payload``). No session, deadline,
  cancellation or error mapping: less work than a worker, so a floor at least as fast.
- **client**: another process, ``asyncio.Runner`` on the default loop, ``grpclib.client.Channel
  (path=...)`` and the generated ``WorkerServiceStub``. One call, as timed, is what
  ``pool.execute`` does for its caller: encode the arguments, the RPC, decode the result.

Neither process imports ``trio_bridge._wire.transport`` (which patches h2's frame ``repr`` and
subclasses grpclib's channel and server to coalesce writes), ``trio_bridge.worker``,
``trio_bridge._aio``, the codec, uvloop, Trio or trio-asyncio: only the generated message
classes, which import ``trio_bridge`` (lazy: ``_errors`` only), grpclib and betterproto2. Each
process checks this about itself at start-up and reports it in its first line (``stock()``);
``StockFloor`` refuses to run when either is not stock.

Why separate processes: the benchmark process hosts the pool, so it imports the transport, and
its h2 patch is process-wide; a floor client in that process (as the harness had until now) got
our speed-ups, and a floor server started as ``python -m trio_bridge.worker`` was our worker,
uvloop and write coalescing included. The client is a process of its own, not a thread of the
harness, so that it neither shares the harness's GIL nor its patched h2.

The client's line protocol (one command per line, one JSON line back):

- ``measure TOOL N``: N sequential calls on the first server, ``{"samples": [seconds, ...]}``;
- ``throughput TOOL IN_FLIGHT SECONDS``: IN_FLIGHT tasks each calling in a loop until SECONDS
  have passed, task i on server i mod the number of servers; ``{"calls", "seconds",
  "calls_per_s"}``;
- end of input: the client exits. A server exits at the end of its standard input.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# trio_bridge modules a stock floor process may import: the package (lazy), its errors and version, and the
# generated messages. Anything else of ours (transport, worker, _aio, codec, host) is refused.
ALLOWED_OURS = ("trio_bridge", "trio_bridge._errors", "trio_bridge._version", "trio_bridge._wire", "trio_bridge._wire.generated")


def noop(x: int = 0) -> int:
    return x


async def anoop(x: int = 0) -> int:
    return x


TOOLS: dict[str, Any] = {"noop": noop, "anoop": anoop}


def stock() -> dict[str, Any]:
    """What this process runs on: the floor is stock only if ``problems`` is empty."""
    import h2.connection

    loop = asyncio.get_running_loop()
    ours = sorted(m for m in sys.modules if m == "trio_bridge" or m.startswith("trio_bridge."))
    problems = [f"imports {m}" for m in ours if not (m in ALLOWED_OURS or m.startswith("trio_bridge._wire.generated."))]
    problems += [f"imports {m}" for m in ("uvloop", "trio", "trio_asyncio") if m in sys.modules]
    if "repr" in vars(h2.connection):
        problems.append("h2.connection.repr is patched")
    if type(loop).__module__ != "asyncio.unix_events" or type(loop).__name__ != "_UnixSelectorEventLoop":
        problems.append(f"loop is {type(loop).__module__}.{type(loop).__qualname__}")
    return {
        "pid": os.getpid(),
        "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
        "h2": h2.__version__,
        "trio_bridge_modules": ours,
        "problems": problems,
    }


def _reply(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---- the server ----
async def serve(path: str) -> None:
    import grpclib.const
    import grpclib.exceptions
    import grpclib.server

    from trio_bridge._wire.generated.trio_bridge import v1 as pb

    loop = asyncio.get_running_loop()

    class StockWorker(pb.WorkerServiceBase):
        async def execute_tool(self, message: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
            function = TOOLS.get(message.tool_name)
            if function is None:
                raise grpclib.exceptions.GRPCError(grpclib.const.Status.NOT_FOUND, message.tool_name)
            arguments = json.loads(message.arguments.json) if message.arguments is not None else {}
            if inspect.iscoroutinefunction(function):
                result = await function(**arguments)
            else:
                result = await loop.run_in_executor(None, functools.partial(function, **arguments))
            return pb.ExecuteToolResponse(result=pb.Payload(json=json.dumps(result).encode()))

    server = grpclib.server.Server([StockWorker()])
    await server.start(path=path)
    stop = asyncio.Event()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, daemon=True).start()
    _reply({"server": path, **stock()})
    await stop.wait()
    server.close()
    await server.wait_closed()


# ---- the client ----
class _Client:
    def __init__(self, paths: list[str]) -> None:
        from grpclib.client import Channel

        from trio_bridge._wire.generated.trio_bridge import v1 as pb

        self.pb = pb
        self.paths = paths
        self.channels = [Channel(path=path) for path in paths]
        self.stubs = [pb.WorkerServiceStub(channel) for channel in self.channels]

    async def call(self, stub: Any, tool: str, x: int) -> Any:
        """One call as ``pool.execute`` makes it for its caller: arguments in, result out."""
        pb = self.pb
        request = pb.ExecuteToolRequest(
            tool_name=tool, arguments=pb.Payload(json=json.dumps({"x": x}).encode()), call_id=str(x)
        )
        response = await stub.execute_tool(request)
        return json.loads(response.result.json)

    async def measure(self, tool: str, n: int) -> dict[str, Any]:
        samples = []
        stub = self.stubs[0]
        for i in range(n):
            t0 = time.perf_counter()
            await self.call(stub, tool, i)
            samples.append(time.perf_counter() - t0)
        return {"samples": samples}

    async def throughput(self, tool: str, in_flight: int, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        done = 0

        async def caller(stub: Any) -> None:
            nonlocal done
            while loop.time() < deadline:
                await self.call(stub, tool, 1)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller(self.stubs[i % len(self.stubs)]) for i in range(in_flight)))
        elapsed = time.perf_counter() - t0
        return {"calls": done, "seconds": elapsed, "calls_per_s": done / elapsed}

    async def hello(self) -> dict[str, Any]:
        for stub in self.stubs:  # connect now: the first timed call must not pay for it
            await self.call(stub, "noop", 0)
        return {"client": self.paths, **stock()}

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def client(paths: list[str]) -> None:
    with asyncio.Runner() as runner:  # the default loop, kept between commands
        c = runner.run(_make_client(paths))
        _reply(runner.run(c.hello()))
        for line in sys.stdin:
            command, *args = line.split()
            if command == "measure":
                _reply(runner.run(c.measure(args[0], int(args[1]))))
            elif command == "throughput":
                _reply(runner.run(c.throughput(args[0], int(args[1]), float(args[2]))))
            else:
                _reply({"error": f"unknown command {command!r}"})
        c.close()


async def _make_client(paths: list[str]) -> _Client:
    return _Client(paths)


# ---- the harness's side: blocking, no asyncio here (the harness runs Trio) ----
class StockFloor:
    """``servers`` stock server processes and one stock client process connected to all of them.

    Blocking methods: call them from a thread (``trio.to_thread.run_sync``) while the pool is idle.
    """

    def __init__(self, servers: int = 1) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.paths = [os.path.join(self._tmp.name, f"floor{i}.sock") for i in range(servers)]
        self._processes: list[subprocess.Popen[str]] = []
        try:
            self.servers = [self._start("server", path) for path in self.paths]
            self.client = self._start("client", *self.paths)
        except BaseException:
            self.close()
            raise
        self.info = {"servers": [s[1] for s in self.servers], "client": self.client[1]}

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
        return json.loads(line)

    def _ask(self, command: str) -> dict[str, Any]:
        process = self.client[0]
        assert process.stdin is not None
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return self._read(process)

    def measure(self, tool: str, n: int) -> list[float]:
        """Seconds per call of ``n`` sequential calls on the first server."""
        return self._ask(f"measure {tool} {n}")["samples"]

    def throughput(self, tool: str, in_flight: int, seconds: float) -> dict[str, Any]:
        """``in_flight`` concurrent callers for ``seconds``, spread evenly over the servers."""
        return self._ask(f"throughput {tool} {in_flight} {seconds}")

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


def demo() -> None:
    floor = StockFloor(servers=2)
    try:
        print(json.dumps(floor.info, indent=2))
        for tool in ("noop", "anoop"):
            floor.measure(tool, 200)
            samples = sorted(floor.measure(tool, 1000))
            print(f"{tool}: p50 {samples[len(samples) // 2] * 1e6:.0f} µs")
        floor.throughput("anoop", 64, 0.3)
        t = floor.throughput("anoop", 64, 2.0)
        print(f"anoop, 64 in flight on 2 servers: {t['calls_per_s']:,.0f} calls/s")
    finally:
        floor.close()


def main() -> None:
    if len(sys.argv) == 1:
        demo()
    elif sys.argv[1] == "server" and len(sys.argv) == 3:
        asyncio.run(serve(sys.argv[2]))
    elif sys.argv[1] == "client" and len(sys.argv) >= 3:
        client(sys.argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
