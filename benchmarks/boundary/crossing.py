"""Candidates for the host's asyncio boundary, like for like (docs/boundary.md).

For each candidate, on this machine, in one process: the p50 of

* ``trio->aio``: one round trip Trio -> asyncio (a no-op coroutine) -> Trio;
* ``aio->trio``: one round trip asyncio -> Trio (a no-op async function) -> asyncio;
* ``unary``: one grpclib unary call (grpc.health.v1 Check) from Trio to a plain asyncio grpclib
  server in another process over a Unix socket, crossing once each way.

Candidates: ``trio-asyncio`` (the loop in Trio's thread; needs trio-asyncio, which does not
import on 3.14: run it with an interpreter that has it), ``thread-asyncio`` and
``thread-uvloop`` (``trio_bridge._aio``: a loop in a thread of its own; ``thread-asyncio`` swaps
its loop for asyncio's selector loop).

    python benchmarks/boundary/crossing.py thread-uvloop thread-asyncio [--n 5000]
    python benchmarks/boundary/crossing.py trio-asyncio   # an interpreter with trio-asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

SERVER = """
import asyncio, sys
from grpclib.server import Server
from grpclib.health.service import Health
async def main():
    server = Server([Health()])
    await server.start(path=sys.argv[1])
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def timed(n: int, once: Callable[[], Awaitable[Any]]) -> float:
    for _ in range(min(200, n)):  # warm-up
        await once()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await once()
        samples.append(time.perf_counter() - start)
    return p50_us(samples)


async def noop_trio() -> None:
    pass


async def noop_aio() -> None:
    pass


def health_stub(path: str) -> Any:
    from grpclib.client import Channel
    from grpclib.health.v1.health_grpc import HealthStub

    channel = Channel(path=path)
    return channel, HealthStub(channel)


async def bench_trio_asyncio(n: int, path: str) -> dict[str, float]:
    import trio_asyncio
    from grpclib.health.v1.health_pb2 import HealthCheckRequest

    async with trio_asyncio.open_loop() as loop:
        out = {"trio->aio": await timed(n, lambda: trio_asyncio.aio_as_trio(noop_aio)())}

        async def aio_side() -> float:
            samples = []
            call = trio_asyncio.trio_as_aio(noop_trio, loop=loop)
            for i in range(n + 200):
                start = time.perf_counter()
                await call()
                if i >= 200:
                    samples.append(time.perf_counter() - start)
            return p50_us(samples)

        out["aio->trio"] = await trio_asyncio.aio_as_trio(aio_side)()
        channel, stub = health_stub(path)
        out["unary"] = await timed(n, lambda: trio_asyncio.aio_as_trio(stub.Check)(HealthCheckRequest()))
        channel.close()
    return out


async def bench_thread(n: int, path: str) -> dict[str, float]:
    from grpclib.health.v1.health_pb2 import HealthCheckRequest

    from trio_bridge._aio import open_boundary

    async with open_boundary() as boundary:
        out = {"trio->aio": await timed(n, lambda: boundary.run(noop_aio()))}

        async def aio_side() -> float:
            samples = []
            for i in range(n + 200):
                start = time.perf_counter()
                await boundary.call_trio(noop_trio)
                if i >= 200:
                    samples.append(time.perf_counter() - start)
            return p50_us(samples)

        out["aio->trio"] = await boundary.run(aio_side())
        channel, stub = await boundary.run_sync(health_stub, path)
        out["unary"] = await timed(n, lambda: boundary.run(stub.Check(HealthCheckRequest())))
        boundary.close_channel(channel)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidates", nargs="+", choices=["trio-asyncio", "thread-asyncio", "thread-uvloop"])
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "health.sock")
        server = subprocess.Popen([sys.executable, "-c", SERVER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            print(f"python {sys.version.split()[0]}, n={args.n}, p50 in microseconds")
            for name in args.candidates:
                if name == "trio-asyncio":
                    result = trio.run(bench_trio_asyncio, args.n, path)
                else:
                    import trio_bridge._aio as aio

                    if name == "thread-asyncio":
                        aio._new_loop = asyncio.SelectorEventLoop  # type: ignore[assignment]  # the benchmark's choice
                    result = trio.run(bench_thread, args.n, path)
                print(f"{name:15s} " + "  ".join(f"{k} {v:7.1f}" for k, v in result.items()), flush=True)
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(10)


if __name__ == "__main__":
    main()
