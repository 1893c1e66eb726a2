"""The benchmark harness: trio-bridge against its peers, in one run.

    python -m benchmarks.bench [--quick] [--json PATH]

Measures: unary round trip p50/p99 through ``pool.execute`` from Trio; the same call on a bare
grpclib stub (asyncio -> asyncio, Unix socket; the floor); ``trio_parallel.run_sync`` and
``ProcessPoolExecutor`` as peers; throughput with 1, 8 and 64 calls in flight on 2 workers;
stream chunks/s into a Trio consumer; host memory while 1,000,000 chunks stream to a slow
consumer; time to ready for 1 and 8 workers. Prints a table and writes JSON.
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
import time
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

import trio_bridge

ADAPTER = "benchmarks.adapters:Bench"
console = Console()


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "n": len(ordered),
    }


# ---- the floor: bare grpclib, asyncio -> asyncio, same worker process and request ----
def bare_grpclib_floor(n: int, tool: str) -> dict[str, float]:
    from grpclib.client import Channel

    from trio_bridge._wire.codec import encode
    from trio_bridge._wire.generated.trio_bridge import v1 as pb

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.sock")
        worker = subprocess.Popen(
            [sys.executable, "-m", "trio_bridge.worker", "--adapter", ADAPTER, "--listen", f"unix:{path}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        try:
            assert worker.stdout is not None
            worker.stdout.readline()

            async def run() -> list[float]:
                channel = Channel(path=path)
                stub = pb.WorkerServiceStub(channel)
                samples = []
                for i in range(n + n // 10):
                    request = pb.ExecuteToolRequest(tool_name=tool, arguments=encode({"x": i}), call_id=str(i))
                    t0 = time.perf_counter()
                    await stub.execute_tool(request)
                    samples.append(time.perf_counter() - t0)
                channel.close()
                return samples[n // 10:]

            return percentiles(asyncio.run(run()))
        finally:
            worker.kill()
            worker.wait()


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


async def pool_unary(n: int, tool: str) -> dict[str, float]:
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool:
        samples = []
        for i in range(n + n // 10):
            t0 = time.perf_counter()
            await pool.execute(tool, {"x": i})
            samples.append(time.perf_counter() - t0)
    return percentiles(samples[n // 10:])


async def pool_throughput(in_flight: int, seconds: float) -> float:
    async with trio_bridge.open_pool(ADAPTER, size=2, max_queue=256, health_check_interval=0) as pool:
        done = 0
        deadline = trio.current_time() + seconds

        async def caller() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                await pool.execute("noop", {"x": 1})
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
    n = 500 if args.quick else 3000
    seconds = 1.0 if args.quick else 3.0
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    console.print("[bold]trio-bridge benchmarks[/] (this takes a minute or two)")
    results["bare_grpclib_floor_sync_tool"] = bare_grpclib_floor(n, "noop")
    results["bare_grpclib_floor_async_tool"] = bare_grpclib_floor(n, "anoop")
    results["pool_execute_sync_tool"] = trio.run(pool_unary, n, "noop")
    results["pool_execute_async_tool"] = trio.run(pool_unary, n, "anoop")
    results["trio_parallel_run_sync"] = trio.run(trio_parallel_run_sync, n)
    results["process_pool_executor"] = process_pool_executor(n)
    results["throughput_calls_per_s"] = {str(k): trio.run(pool_throughput, k, seconds) for k in (1, 8, 64)}
    results["stream_chunks_per_s"] = {
        "sync_generator": trio.run(stream_rate, "count", 100_000 if args.quick else 300_000),
        "async_generator": trio.run(stream_rate, "acount", 100_000 if args.quick else 300_000),
    }
    results["stream_memory"] = trio.run(stream_memory, 100_000 if args.quick else 1_000_000)
    results["time_to_ready_s"] = {str(k): trio.run(time_to_ready, k, 3) for k in (1, 8)}
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
    table.add_column("value", justify="right")
    for key in (
        "bare_grpclib_floor_sync_tool", "pool_execute_sync_tool", "bare_grpclib_floor_async_tool",
        "pool_execute_async_tool", "trio_parallel_run_sync", "process_pool_executor",
    ):
        table.add_row(f"unary round trip: {key}", f"p50 {r[key]['p50_us']:.0f} µs   p99 {r[key]['p99_us']:.0f} µs")
    for k, v in r["throughput_calls_per_s"].items():
        table.add_row(f"throughput, {k} in flight, 2 workers", f"{v:,.0f} calls/s")
    for k, v in r["stream_chunks_per_s"].items():
        table.add_row(f"stream into Trio, {k}", f"{v:,.0f} chunks/s")
    m = r["stream_memory"]
    table.add_row(
        f"host RSS, {m['chunks']:,} chunks to a slow consumer",
        f"{m['rss_first_mib']:.1f} → max {m['rss_max_mib']:.1f} → {m['rss_last_mib']:.1f} MiB",
    )
    for k, v in r["time_to_ready_s"].items():
        table.add_row(f"time to ready, {k} worker(s)", f"{v:.2f} s")
    t = r["targets"]
    table.add_row("pool p50 / floor, sync tool (target ≤ 1.3)", f"{t['pool_unary_p50_over_floor_sync_tool']:.2f}")
    table.add_row("pool p50 / floor, async tool (target ≤ 1.3)", f"{t['pool_unary_p50_over_floor_async_tool']:.2f}")
    table.add_row(f"ready(8) / ready(1) (target ≤ {t['ready_8_over_ready_1_target']:.1f})", f"{t['ready_8_over_ready_1']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
