"""The benchmark harness: trio-bridge against its peers, in one run.

    python -m benchmarks.bench [--quick] [--json PATH]

Measures: unary round trip p50/p99 through ``pool.execute`` from Trio; the same call on a bare
grpclib stub (asyncio -> asyncio, Unix socket; the floor); ``trio_parallel.run_sync`` and
``ProcessPoolExecutor`` as peers; throughput with 1, 8 and 64 calls in flight on 2 workers;
stream chunks/s into a Trio consumer; host memory while 1,000,000 chunks stream to a slow
consumer; time to ready for 1 and 8 workers; variables; tool calls; bulk arrays with and
without shared memory. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

import trio_bridge

ADAPTER = "benchmarks.adapters:Bench"
console = Console(width=110)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "n": len(ordered),
    }


# ---- the floor: bare grpclib, asyncio -> asyncio, same worker code and request ----
class Floor:
    """A bare worker process and a grpclib client on a plain asyncio loop in its own thread.

    Measured in rounds interleaved with the pool's, while Trio waits idle, so that the machine's
    drift (often ±25% between runs here) does not masquerade as overhead.
    """

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.path = os.path.join(self._tmp.name, "w.sock")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "trio_bridge.worker", "--adapter", ADAPTER, "--listen", f"unix:{self.path}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert self.worker.stdout is not None
        self.worker.stdout.readline()
        self.loop = asyncio.SelectorEventLoop()  # not asyncio.new_event_loop(): trio-asyncio patches that
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def measure(self, tool: str, n: int) -> list[float]:
        from grpclib.client import Channel

        from trio_bridge._wire.codec import encode
        from trio_bridge._wire.generated.trio_bridge import v1 as pb

        async def run() -> list[float]:
            channel = Channel(path=self.path)
            stub = pb.WorkerServiceStub(channel)
            samples = []
            for i in range(n):
                request = pb.ExecuteToolRequest(tool_name=tool, arguments=encode({"x": i}), call_id=str(i))
                t0 = time.perf_counter()
                await stub.execute_tool(request)
                samples.append(time.perf_counter() - t0)
            channel.close()
            return samples

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return await trio.to_thread.run_sync(future.result)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.worker.kill()
        self.worker.wait()
        self._tmp.cleanup()


async def unary_latency(tool: str, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    floor = Floor()
    try:
        async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool:
            pool_samples: list[float] = []
            floor_samples: list[float] = []
            crossing_samples: list[float] = []
            # The stack's own cost, for reference: the same request on the pool's worker through
            # one raw trio-asyncio crossing, without the pool (internals: harness only).
            import trio_asyncio

            from trio_bridge._wire.auth import SECRET_METADATA
            from trio_bridge._wire.codec import encode
            from trio_bridge._wire.generated.trio_bridge import v1 as pb
            from trio_bridge._wire.transport import open_channel

            # The same request over a channel of our own, crossing the trio-asyncio boundary once.
            channel = open_channel(pool.workers()[0].address)
            stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: pool._spec.secret})
            raw = pb.ExecuteToolRequest(tool_name=tool, arguments=encode({"x": 1}), call_id="raw")
            await floor.measure(tool, per_round // 2)  # warm-up
            for i in range(per_round // 2):
                await pool.execute(tool, {"x": i})
            for _ in range(rounds):
                for i in range(per_round):
                    t0 = time.perf_counter()
                    await pool.execute(tool, {"x": i})
                    pool_samples.append(time.perf_counter() - t0)
                floor_samples += await floor.measure(tool, per_round)
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    await trio_asyncio.aio_as_trio(stub.execute_tool(raw))
                    crossing_samples.append(time.perf_counter() - t0)
            channel.close()
    finally:
        floor.close()
    return {
        "pool": percentiles(pool_samples),
        "floor": percentiles(floor_samples),
        "crossing": percentiles(crossing_samples),
    }


def process_pool_executor(n: int) -> dict[str, float]:
    from benchmarks.adapters import noop

    with concurrent.futures.ProcessPoolExecutor(1) as executor:
        samples = []
        for i in range(n + n // 10):
            t0 = time.perf_counter()
            executor.submit(noop, i).result()
            samples.append(time.perf_counter() - t0)
    return percentiles(samples[n // 10:])


async def trio_parallel_run_sync(n: int) -> dict[str, float]:
    import trio_parallel

    from benchmarks.adapters import noop

    samples = []
    async with trio_parallel.open_worker_context() as ctx:
        for i in range(n + n // 10):
            t0 = time.perf_counter()
            await ctx.run_sync(noop, i)
            samples.append(time.perf_counter() - t0)
    return percentiles(samples[n // 10:])


async def pool_throughput(in_flight: int, seconds: float, concurrency: int, tool: str) -> float:
    async with trio_bridge.open_pool(
        ADAPTER, size=2, concurrency=concurrency, max_queue=256, health_check_interval=0
    ) as pool:
        done = 0
        deadline = trio.current_time() + seconds

        async def caller() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                await pool.execute(tool, {"x": 1})
                done += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(in_flight):
                nursery.start_soon(caller)
        return done / (time.perf_counter() - t0)


async def stream_rate(tool: str, n: int) -> float:
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool:
        t0 = time.perf_counter()
        count = 0
        async with pool.stream(tool, {"n": n}) as chunks:
            async for _ in chunks:
                count += 1
        assert count == n
        return n / (time.perf_counter() - t0)


async def stream_memory(n: int) -> dict[str, float]:
    """Host RSS while ``n`` chunks stream to a consumer slower than the generator."""
    process = psutil.Process()
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool:
        samples = []
        t0 = time.perf_counter()
        async with pool.stream("count", {"n": n}) as chunks:
            count = 0
            async for _ in chunks:
                count += 1
                if count % 1000 == 0:
                    await trio.sleep(0.002)  # slow consumer: the generator must wait for it
                if count % 50_000 == 0:
                    samples.append(process.memory_info().rss)
        elapsed = time.perf_counter() - t0
    return {
        "chunks": count,
        "seconds": elapsed,
        "rss_first_mib": samples[0] / 2**20,
        "rss_max_mib": max(samples) / 2**20,
        "rss_last_mib": samples[-1] / 2**20,
    }


async def state(n: int, watchers: int, rounds: int) -> dict[str, Any]:
    """Variables: reads in a worker tool (cached, fresh), writes from the host, watch fan-out."""
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.5)
        cached = await session.execute("time_reads", {"name": "temperature", "n": n, "fresh": False})
        fresh = await session.execute("time_reads", {"name": "temperature", "n": n, "fresh": True})
        writes = []
        for i in range(n):
            t0 = time.perf_counter()
            await session.set_variable("temperature", (i % 100) / 100 + 0.001)
            writes.append(time.perf_counter() - t0)

        fan_out = []
        received = trio.Semaphore(0)

        async def watcher(ready: trio.Event) -> None:
            async with session.watch_variables(["temperature"], include_initial=False) as updates:
                ready.set()
                async for _ in updates:
                    received.release()

        async with trio.open_nursery() as nursery:
            for _ in range(watchers):
                ready = trio.Event()
                nursery.start_soon(watcher, ready)
                await ready.wait()
            for i in range(rounds):
                t0 = time.perf_counter()
                await session.set_variable("temperature", 2.0 + i / 1000)
                for _ in range(watchers):
                    await received.acquire()
                fan_out.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
    return {
        "get_variable_cached_in_worker": percentiles(cached),
        "get_variable_fresh_in_worker": percentiles(fresh),
        "set_variable_from_host": percentiles(writes),
        f"watch_fan_out_to_{watchers}_watchers": percentiles(fan_out),
    }


async def state_backends(n: int) -> dict[str, Any]:
    """``set_variable`` and write-to-watcher latency on each backend: in memory, and Redis (a
    valkey-server on loopback, started here: tests.redis_server)."""
    import pathlib

    from trio_bridge.testing import RedisServer

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(pathlib.Path(directory)).start()
        try:
            backends: dict[str, Any] = {
                "memory": trio_bridge.MemoryBackend(), "redis": trio_bridge.RedisBackend(server.url, prefix="bench"),
            }
            for name, backend in backends.items():
                async with trio.open_nursery() as nursery:
                    await nursery.start(backend.run)
                    sid = (await backend.create_session(None, ttl=None, metadata=None)).id
                    await backend.register_variable(sid, "t", "float", 0.0, constraints=None, metadata=None, source="host")
                    write = partial(backend.set_variable, sid, "t", expected_version=None, source="host", optimizer_id=None, metadata=None)
                    writes, seen = [], []
                    for i in range(n):
                        t0 = time.perf_counter()
                        await write(float(i + 1))
                        writes.append(time.perf_counter() - t0)
                    async with backend.watch(sid, ["t"], include_initial=False) as watcher:
                        for i in range(n // 4):
                            t0 = time.perf_counter()
                            await write(float(n + i + 1))
                            await watcher.next_batch()
                            seen.append(time.perf_counter() - t0)
                    await backend.cleanup_session(sid)
                    nursery.cancel_scope.cancel()
                out[f"set_variable_{name}"] = percentiles(writes)
                out[f"write_to_watcher_{name}"] = percentiles(seen)
        finally:
            server.stop()
    return out


async def remote_unary(n: int) -> dict[str, Any]:
    """``pool.execute`` of a sync no-op: a local worker over a Unix socket, and a remote one
    (``trio-bridge worker`` on 127.0.0.2) over TCP with mutual TLS, and over plain TCP."""
    import pathlib
    import secrets

    from trio_bridge.testing import Certificates, RemoteWorkerProcess, free_port

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        d = pathlib.Path(directory)
        certs = Certificates.create(d)
        token = secrets.token_hex(16)
        (d / "token").write_text(token)
        for kind in ("unix_local", "tcp_tls_remote", "tcp_plain_remote"):
            worker = None
            options: dict[str, Any] = {"size": 1, "health_check_interval": 0}
            if kind != "unix_local":
                tls = kind == "tcp_tls_remote"
                worker = RemoteWorkerProcess(
                    ADAPTER, f"tcp://127.0.0.2:{free_port('127.0.0.2')}", d / "token", certificates=certs if tls else None,
                ).start()
                options = {"size": 0, "remote_workers": [worker.address], "token": token, "listen": "tcp://127.0.0.1:0"}
                if tls:
                    options["tls"] = certs.tls("host")
            try:
                async with trio_bridge.open_pool(ADAPTER, **options) as pool:
                    for i in range(n // 5):
                        await pool.execute("noop", {"x": i})
                    samples = []
                    for i in range(n):
                        t0 = time.perf_counter()
                        await pool.execute("noop", {"x": i})
                        samples.append(time.perf_counter() - t0)
                out[kind] = percentiles(samples)
            finally:
                if worker is not None:
                    worker.kill()
    return out


async def tools(n: int) -> dict[str, Any]:
    """Calls from a worker tool: to a host tool, and to another worker's tool."""
    async with trio_bridge.open_pool(ADAPTER, size=2, health_check_interval=0) as pool:

        @pool.host_tool
        async def echo(x: int) -> int:
            return x

        to_host = await pool.execute("time_host_tool_calls", {"n": n})
        to_worker = await pool.execute("time_worker_calls", {"n": n})
    return {"worker_to_host_tool": percentiles(to_host), "worker_to_worker_tool": percentiles(to_worker)}


async def bulk(mib: int, repeats: int, threshold: int | None) -> float:
    """MiB/s moved by echoing a ``mib`` MiB float64 array (both directions counted)."""
    import numpy as np

    array = np.ones(mib * 2**20 // 8)
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0, shared_memory_threshold=threshold) as pool:
        await pool.execute("echo", {"value": array[:10]})
        t0 = time.perf_counter()
        for _ in range(repeats):
            await pool.execute("echo", {"value": array})
        return 2 * mib * repeats / (time.perf_counter() - t0)


async def time_to_ready(size: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        async with trio_bridge.open_pool(ADAPTER, size=size, health_check_interval=0):
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples, 100,000 chunks for the memory run")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results.json"))
    args = parser.parse_args()
    n = 500 if args.quick else 2000
    seconds = 1.0 if args.quick else 3.0
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    console.print("[bold]trio-bridge benchmarks[/] (this takes a minute or two)")
    rounds, per_round = (3, 200) if args.quick else (10, 300)
    for kind, tool in (("sync_tool", "noop"), ("async_tool", "anoop")):
        measured = trio.run(unary_latency, tool, rounds, per_round)
        results[f"bare_grpclib_floor_{kind}"] = measured["floor"]
        results[f"pool_execute_{kind}"] = measured["pool"]
        results[f"raw_trio_asyncio_crossing_{kind}"] = measured["crossing"]
    results["trio_parallel_run_sync"] = trio.run(trio_parallel_run_sync, n)
    results["process_pool_executor"] = process_pool_executor(n)
    results["throughput_calls_per_s"] = {
        f"{k} in flight, concurrency 1, sync tool": trio.run(pool_throughput, k, seconds, 1, "noop") for k in (1, 8, 64)
    }
    results["throughput_calls_per_s"].update({
        f"{k} in flight, concurrency 16, async tool": trio.run(pool_throughput, k, seconds, 16, "anoop")
        for k in (8, 64)
    })
    results["stream_chunks_per_s"] = {
        "sync_generator": trio.run(stream_rate, "count", 100_000 if args.quick else 300_000),
        "async_generator": trio.run(stream_rate, "acount", 100_000 if args.quick else 300_000),
    }
    results["stream_memory"] = trio.run(stream_memory, 100_000 if args.quick else 1_000_000)
    results["time_to_ready_s"] = {str(k): trio.run(time_to_ready, k, 3) for k in (1, 8)}
    results["state"] = trio.run(state, 500 if args.quick else 2000, 100, 20 if args.quick else 100)
    results["state_backends"] = trio.run(state_backends, 400 if args.quick else 2000)
    results["remote_unary"] = trio.run(remote_unary, 300 if args.quick else 1000)
    results["tools"] = trio.run(tools, 300 if args.quick else 1000)
    results["bulk_mib_per_s"] = {
        "50 MiB array echo, shared memory": trio.run(bulk, 50, 3 if args.quick else 5, 1 << 20),
        "50 MiB array echo, in the gRPC stream": trio.run(bulk, 50, 2 if args.quick else 3, None),
    }
    ready1, ready8 = results["time_to_ready_s"]["1"], results["time_to_ready_s"]["8"]
    results["targets"] = {
        "pool_unary_p50_over_floor_sync_tool": results["pool_execute_sync_tool"]["p50_us"]
        / results["bare_grpclib_floor_sync_tool"]["p50_us"],
        "pool_unary_p50_over_floor_async_tool": results["pool_execute_async_tool"]["p50_us"]
        / results["bare_grpclib_floor_async_tool"]["p50_us"],
        "pool_unary_p50_over_floor_target": 1.3,
        "stream_chunks_per_s_target": 30_000,
        "ready_8_over_ready_1": ready8 / ready1,
        "ready_8_over_ready_1_target": 1.2 * 8 / (os.cpu_count() or 1),
    }
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    show(results)
    console.print(f"written to {args.json}")


def show(r: dict[str, Any]) -> None:
    table = Table(title=f"trio-bridge benchmarks ({r['machine']['cpus']} cores, Python {r['machine']['python']})")
    table.add_column("measure")
    table.add_column("value", justify="right", no_wrap=True)
    for key in (
        "bare_grpclib_floor_sync_tool", "raw_trio_asyncio_crossing_sync_tool", "pool_execute_sync_tool",
        "bare_grpclib_floor_async_tool", "raw_trio_asyncio_crossing_async_tool", "pool_execute_async_tool",
        "trio_parallel_run_sync", "process_pool_executor",
    ):
        table.add_row(f"unary round trip: {key}", f"p50 {r[key]['p50_us']:.0f} µs   p99 {r[key]['p99_us']:.0f} µs")
    for k, v in r["throughput_calls_per_s"].items():
        table.add_row(f"throughput, 2 workers, {k}", f"{v:,.0f} calls/s")
    for k, v in r["stream_chunks_per_s"].items():
        table.add_row(f"stream into Trio, {k}", f"{v:,.0f} chunks/s")
    m = r["stream_memory"]
    table.add_row(
        f"host RSS, {m['chunks']:,} chunks to a slow consumer",
        f"{m['rss_first_mib']:.1f} → max {m['rss_max_mib']:.1f} → {m['rss_last_mib']:.1f} MiB",
    )
    for k, v in r["state"].items():
        table.add_row(f"variables: {k.replace('_', ' ')}", f"p50 {v['p50_us']:.1f} µs   p99 {v['p99_us']:.1f} µs")
    for k, v in r.get("state_backends", {}).items():
        table.add_row(f"state: {k.replace('_', ' ')}", f"p50 {v['p50_us']:.0f} µs   p99 {v['p99_us']:.0f} µs")
    for k, v in r.get("remote_unary", {}).items():
        table.add_row(f"unary call, {k.replace('_', ' ')} worker", f"p50 {v['p50_us']:.0f} µs   p99 {v['p99_us']:.0f} µs")
    for k, v in r["tools"].items():
        table.add_row(f"tools: {k.replace('_', ' ')} call", f"p50 {v['p50_us']:.0f} µs   p99 {v['p99_us']:.0f} µs")
    for k, v in r["bulk_mib_per_s"].items():
        table.add_row(f"bulk: {k}", f"{v:,.0f} MiB/s")
    for k, v in r["time_to_ready_s"].items():
        table.add_row(f"time to ready, {k} worker(s)", f"{v:.2f} s")
    t = r["targets"]
    table.add_row("pool p50 / floor, sync tool (target ≤ 1.3)", f"{t['pool_unary_p50_over_floor_sync_tool']:.2f}")
    table.add_row("pool p50 / floor, async tool (target ≤ 1.3)", f"{t['pool_unary_p50_over_floor_async_tool']:.2f}")
    table.add_row(f"ready(8) / ready(1) (target ≤ {t['ready_8_over_ready_1_target']:.1f})", f"{t['ready_8_over_ready_1']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
