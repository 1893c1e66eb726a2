"""The benchmark harness: trio-bridge against its peers, in one run (issue 9's targets).

    python -m benchmarks.bench [--quick] [--json PATH] [--only unary|arrays]

Prints a table of the issue's targets (value, target, met or missed) and one of the detail, and
writes JSON whose top-level keys are plain numbers, one per target:

- ``unary_pool_over_floor_sync`` / ``_async``: ``pool.execute`` p50 over the stock floor's
  (``benchmarks/floor.py``: a stock grpclib client process calling a stock grpclib server process,
  default asyncio loops, Unix socket, none of our patches; its sync tool through
  ``run_in_executor``, its async tool awaited), tools ``noop`` / ``anoop`` on both sides,
  measured in interleaved rounds; ``floor_p50_us`` (sync), ``trio_parallel_p50_us`` and
  ``process_pool_executor_p50_us`` as peers; extra (no target): ``unary_pool_over_floor_inline``,
  ``pool.execute`` of the inline tool ``inline_noop`` over the floor's sync ``noop``;
- ``throughput_64_in_flight_calls_per_s``: 64 calls in flight on 2 workers, async tool,
  concurrency 16 (the other configurations in ``throughput_calls_per_s``), measured in windows
  alternating with the stock floor's (one client process with 64 tasks, 2 server processes,
  async tool): extra (no target) ``throughput_64_over_floor``, the pool's calls/s over the
  floor's in the same run (``throughput_64_vs_floor``);
- ``array_100mb_round_trip_gb_per_s``: a 100 MB float32 array echoed through shared memory,
  1e8 bytes over one round trip's seconds (median, after warm-up calls);
  ``array_inband_mib_per_s``: a 50 MiB array echoed in the gRPC stream, counted the same way;
- ``stream_chunks_per_s``: chunks/s into a Trio consumer, the better of a sync and an async generator;
- ``ready_8_over_1``: time until a pool of 8 workers is ready over the same for 1 (interleaved);
- ``restart_seconds``: SIGKILL of one worker of a ready pool of 2 until 2 are ready again (median);
- ``worker_import_seconds``: a fresh ``python`` importing what ``python -m trio_bridge.worker``
  imports before the adapter, minus ``python -c pass`` (median); ``worker_import_stack_floor_seconds``:
  the same for the stack alone (asyncio, grpclib, uvloop: what any worker on it imports);
- ``host_rss_mib_10k_sessions``: RSS of a fresh host process with 10,000 open sessions of 10
  variables each (``benchmarks/session_rss.py``);
- ``watch_fanout_1000_p50_ms``: one ``set_variable`` until all of 1,000 watchers have seen it.

``--only unary`` (the unary targets) or ``--only arrays`` (the two array targets) runs that part
alone and prints its figures, for a quick A/B; it writes JSON only to a ``--json`` given.

``targets`` holds each key's target and whether it was met; the samples behind the figures
stay in nested sections (``stock_floor``, ``pool_execute_*``, ``bare_grpclib_floor_*``, ``throughput_calls_per_s``,
``throughput_64_vs_floor``, ``stream_chunks_per_s_by_generator``, ``arrays``, ``time_to_ready_s``, ``restart_s``,
``worker_import``, ``session_rss``, ``watch_fan_out``). The full run (about 5 minutes on 2
cores) adds the other detail sections: variables, state backends, remote workers, tools, host
memory while 1,000,000 chunks stream to a slow consumer, the writer's side of a 1,000-watcher
fan-out (``benchmarks/watch_fanout.py``). ``--quick`` (about 1 minute) takes fewer samples and
skips those.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import logging
import operator
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

import trio_bridge
from benchmarks.floor import StockFloor

ADAPTER = "benchmarks.adapters:Bench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
console = Console(width=140)

# The baseline of the throughput target: calls/s with 64 in flight (async tool, concurrency 16,
# 2 workers), as benchmarks/results.json recorded it at commit 7070995.
THROUGHPUT_64_MEASURED_AT_7070995 = 1280.0


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "n": len(ordered),
    }


# ---- unary latency against the stock floor (benchmarks/floor.py), in interleaved rounds ----
async def unary_latency(floor: StockFloor, tool: str, floor_tool: str, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """``pool.execute(tool)`` and the stock floor's ``floor_tool``, in alternating rounds.

    Interleaved, the floor measured while Trio waits idle in a thread, so that the machine's drift
    (often ±25% between runs here) does not masquerade as overhead.
    """
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool:
        pool_samples: list[float] = []
        floor_samples: list[float] = []
        crossing_samples: list[float] = []
        # The stack's own cost, for reference: the same request on the pool's worker through
        # one raw trio-asyncio crossing, without the pool (internals: harness only; our
        # transport, so not the floor).
        import trio_asyncio

        from trio_bridge._wire.auth import SECRET_METADATA
        from trio_bridge._wire.codec import encode
        from trio_bridge._wire.generated.trio_bridge import v1 as pb
        from trio_bridge._wire.transport import open_channel

        channel = open_channel(pool.workers()[0].address)
        stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: pool._spec.secret})
        raw = pb.ExecuteToolRequest(tool_name=tool, arguments=encode({"x": 1}), call_id="raw")
        await trio.to_thread.run_sync(floor.measure, floor_tool, per_round // 2)  # warm-up
        for i in range(per_round // 2):
            await pool.execute(tool, {"x": i})
        for _ in range(rounds):
            for i in range(per_round):
                t0 = time.perf_counter()
                await pool.execute(tool, {"x": i})
                pool_samples.append(time.perf_counter() - t0)
            floor_samples += await trio.to_thread.run_sync(floor.measure, floor_tool, per_round)
            for _ in range(per_round):
                t0 = time.perf_counter()
                await trio_asyncio.aio_as_trio(stub.execute_tool(raw))
                crossing_samples.append(time.perf_counter() - t0)
        channel.close()
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


async def _pool_window(pool: Any, in_flight: int, seconds: float, tool: str) -> tuple[int, float]:
    """Calls completed by ``in_flight`` callers in about ``seconds``, and the seconds it took."""
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
    return done, time.perf_counter() - t0


async def pool_throughput(in_flight: int, seconds: float, concurrency: int, tool: str) -> float:
    async with trio_bridge.open_pool(
        ADAPTER, size=2, concurrency=concurrency, max_queue=256, health_check_interval=0
    ) as pool:
        done, elapsed = await _pool_window(pool, in_flight, seconds, tool)
        return done / elapsed


async def throughput_vs_floor(
    floor: StockFloor, in_flight: int, concurrency: int, tool: str, rounds: int, seconds: float
) -> dict[str, Any]:
    """Calls/s with ``in_flight`` calls in flight: the pool (2 workers) and the stock floor (one
    client process with ``in_flight`` tasks, spread over its 2 server processes), in alternating
    windows of ``seconds`` after a short warm-up of each; each side's calls over its seconds."""
    async with trio_bridge.open_pool(
        ADAPTER, size=2, concurrency=concurrency, max_queue=256, health_check_interval=0
    ) as pool:
        await _pool_window(pool, in_flight, 0.3, tool)
        await trio.to_thread.run_sync(floor.throughput, tool, in_flight, 0.3)
        pool_windows, floor_windows = [], []
        for _ in range(rounds):
            pool_windows.append(await _pool_window(pool, in_flight, seconds, tool))
            f = await trio.to_thread.run_sync(floor.throughput, tool, in_flight, seconds)
            floor_windows.append((f["calls"], f["seconds"]))

    def rate(windows: list[tuple[int, float]]) -> float:
        return sum(c for c, _ in windows) / sum(s for _, s in windows)

    return {
        "in_flight": in_flight, "tool": tool, "pool_workers": 2, "pool_concurrency": concurrency,
        "floor_server_processes": len(floor.paths), "floor_client_tasks": in_flight,
        "pool_calls_per_s": rate(pool_windows), "floor_calls_per_s": rate(floor_windows),
        "pool_windows_calls_per_s": [c / t for c, t in pool_windows],
        "floor_windows_calls_per_s": [c / t for c, t in floor_windows],
    }


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


async def array_round_trip(n_bytes: int, repeats: int, warm_ups: int, threshold: int | None) -> dict[str, Any]:
    """Seconds per echo of an ``n_bytes`` float32 array through ``pool.execute``.

    ``warm_ups`` full-size calls come first: fresh shared-memory pages fault on first touch, and
    each side's region is reused afterwards (a second call was still slow when measured). With
    ``warm_ups=0`` only a tiny array warms the connection (in-band: nothing to reuse).
    """
    import numpy as np

    array = np.ones(n_bytes // 4, dtype=np.float32)
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0, shared_memory_threshold=threshold) as pool:
        await pool.execute("echo", {"value": array[:10]})
        warm = []
        for _ in range(warm_ups):
            t0 = time.perf_counter()
            await pool.execute("echo", {"value": array})
            warm.append(time.perf_counter() - t0)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = await pool.execute("echo", {"value": array})
            samples.append(time.perf_counter() - t0)
            if result.shape != array.shape or result.dtype != array.dtype:  # not what we meant to time
                raise RuntimeError(f"echo returned {result.dtype}{result.shape}, not {array.dtype}{array.shape}")
    return {"bytes": n_bytes, "warm_up_s": warm, "round_trip_s": samples, "median_s": statistics.median(samples)}


async def time_to_ready(sizes: tuple[int, ...], repeats: int) -> dict[str, list[float]]:
    """Seconds from ``open_pool`` until its block runs, sizes interleaved per repeat (drift)."""
    times: dict[str, list[float]] = {str(size): [] for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            t0 = time.perf_counter()
            async with trio_bridge.open_pool(ADAPTER, size=size, health_check_interval=0):
                times[str(size)].append(time.perf_counter() - t0)
    return times


async def restart(pools: int) -> list[float]:
    """Seconds from SIGKILL of one worker of a ready pool of 2 until it has 2 ready workers again.

    Pool defaults (restart backoff included). Each slot is killed once per pool: a slot's
    backoff doubles when its worker dies young, which a second kill would measure instead.
    """
    samples = []
    quiet = logging.getLogger("trio_bridge")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the pool logs each death as a warning: expected here
    try:
        for _ in range(pools):
            async with trio_bridge.open_pool(ADAPTER, size=2) as pool:
                for slot in range(pool.size):
                    victim = next(w for w in pool.workers() if w.slot == slot)
                    assert victim.pid is not None
                    with trio.fail_after(60):
                        t0 = time.perf_counter()
                        os.kill(victim.pid, signal.SIGKILL)
                        # poll finely: wait_for_workers polls every 50 ms, and counts the victim
                        # as ready until the pool has seen it die
                        while True:
                            workers = pool.workers()
                            if all(w.state == "ready" for w in workers) and victim.id not in {w.id for w in workers}:
                                break
                            await trio.sleep(0.001)
                        samples.append(time.perf_counter() - t0)
    finally:
        quiet.setLevel(level)
    return samples


def worker_import(repeats: int) -> dict[str, Any]:
    """Wall seconds of a fresh interpreter importing the worker, minus a bare one (interleaved).

    The modules are those ``trio_bridge/worker/__main__.py`` imports before ``main()`` loads the
    adapter (``-m`` imports the ``trio_bridge`` and ``trio_bridge.worker`` packages on the way).
    """
    code = "import trio_bridge.worker._lifeline, trio_bridge.worker._server"

    def wall(*args: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT)
        return time.perf_counter() - t0

    wall("-c", code)  # the first run reads the files from disk: not what a worker start pays
    wall("-c", STACK_IMPORTS)
    imports, stack, bare = [], [], []
    for _ in range(repeats):
        imports.append(wall("-c", code))
        stack.append(wall("-c", STACK_IMPORTS))
        bare.append(wall("-c", "pass"))
    return {
        "import_s": imports, "stack_import_s": stack, "bare_python_s": bare,
        "median_difference_s": statistics.median(i - b for i, b in zip(imports, bare, strict=True)),
        "stack_median_difference_s": statistics.median(i - b for i, b in zip(stack, bare, strict=True)),
    }


#: what any worker on this stack imports, ours or not: the floor under worker_import_seconds
STACK_IMPORTS = "import asyncio, grpclib.server, grpclib.client, uvloop"


def session_rss(sessions: int, variables: int) -> dict[str, Any]:
    """``benchmarks/session_rss.py`` in a fresh process: earlier benchmarks' memory must not count."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.session_rss", "--sessions", str(sessions), "--variables", str(variables)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def watch_fan_out(watchers: int, rounds: int) -> dict[str, Any]:
    """Seconds from one ``set_variable`` until every one of ``watchers`` watchers has seen it,
    through the host Session API; one write at a time (watch_fanout.py times the writer instead)."""
    async with trio_bridge.open_pool(ADAPTER, size=1, health_check_interval=0) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.0)
        target = 0
        seen = 0
        all_seen = trio.Event()

        async def watcher(task_status: trio.TaskStatus[None]) -> None:
            nonlocal seen
            async with session.watch_variables(["temperature"], include_initial=False) as updates:
                task_status.started()
                async for update in updates:
                    if update.version >= target:
                        seen += 1
                        if seen == watchers:
                            all_seen.set()

        samples = []
        async with trio.open_nursery() as nursery:
            for _ in range(watchers):
                await nursery.start(watcher)
            for version in range(1, rounds + 1):
                target, seen, all_seen = version, 0, trio.Event()
                t0 = time.perf_counter()
                await session.set_variable("temperature", float(version))
                with trio.fail_after(60):
                    await all_seen.wait()
                samples.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
    return {"watchers": watchers, **percentiles(samples)}


# ---- the targets of issue 9: (key, what, unit, comparison, target) ----
LE, GE = operator.le, operator.ge
TARGETS: list[tuple[str, str, str, Callable[[float, float], bool], float]] = [
    ("unary_pool_over_floor_sync", "pool.execute p50 / stock floor p50, sync tool noop (floor: run_in_executor)", "x", LE, 0.8),
    ("unary_pool_over_floor_async", "pool.execute p50 / stock floor p50, async tool anoop", "x", LE, 0.8),
    ("throughput_64_in_flight_calls_per_s",
     f"throughput, 64 in flight, 2 workers, async tool, concurrency 16 (1.5 x {THROUGHPUT_64_MEASURED_AT_7070995:,.0f} "
     "measured at 7070995)", "calls/s", GE, 1.5 * THROUGHPUT_64_MEASURED_AT_7070995),
    ("array_100mb_round_trip_gb_per_s", "100 MB float32 echo, shared memory (1e8 B / round trip)", "GB/s", GE, 3.0),
    ("array_inband_mib_per_s", "50 MiB float32 echo in-band (payload / round trip)", "MiB/s", GE, 300.0),
    ("stream_chunks_per_s", "stream into Trio (better of sync / async generator)", "chunks/s", GE, 60_000.0),
    ("ready_8_over_1", "time to ready, 8 workers / 1 worker", "x", LE, 1.3),
    ("restart_seconds", "SIGKILL of 1 of 2 workers until 2 ready", "s", LE, 0.1),
    ("worker_import_seconds", "worker imports, minus bare python", "s", LE, 0.1),
    ("host_rss_mib_10k_sessions", "host RSS, 10,000 sessions x 10 variables", "MiB", LE, 200.0),
    ("watch_fanout_1000_p50_ms", "write until all 1,000 watchers saw it, p50", "ms", LE, 10.0),
]
# Extra ratios, measured in the same run as the floor they divide by; no target of the issue's.
EXTRAS = [
    ("unary_pool_over_floor_inline",
     "pool.execute p50, inline sync tool inline_noop / stock floor p50, sync tool noop (run_in_executor)"),
    ("throughput_64_over_floor",
     "throughput, 64 in flight: pool (2 workers, anoop, concurrency 16) / stock floor (1 client "
     "process, 64 tasks, 2 server processes, anoop), alternating windows"),
]
PEERS = [
    ("floor_p50_us", "stock grpclib floor unary p50 (benchmarks/floor.py), sync tool noop via run_in_executor"),
    ("trio_parallel_p50_us", "trio_parallel.run_sync p50"),
    ("process_pool_executor_p50_us", "ProcessPoolExecutor(1) submit+result p50"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples, no detail sections (under 2 minutes)")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results.json; with --only, nowhere)")
    parser.add_argument("--only", choices=["unary", "arrays"], help="run this part alone and print its figures")
    args = parser.parse_args()
    quick = args.quick
    if args.only:
        only(args.only, quick, args.json)
        return
    args.json = args.json or os.path.join(os.path.dirname(__file__), "results.json")
    started = time.perf_counter()
    r: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
    }
    console.print(f"[bold]trio-bridge benchmarks[/]{' (quick)' if quick else ''}: about {1 if quick else 5} minutes")

    def step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        result = trio.run(fn, *args) if inspect.iscoroutinefunction(fn) else fn(*args)
        console.print(f"  {name}: {time.perf_counter() - t0:.1f} s", style="dim")
        return result

    n = 500 if quick else 2000
    rounds, per_round = (3, 200) if quick else (8, 250)
    seconds = 1.0 if quick else 3.0
    floor = StockFloor(servers=2)  # the latency rounds use its first server only
    try:
        r["stock_floor"] = {
            "what": "benchmarks/floor.py: a stock grpclib client process and stock grpclib server processes "
                    "(asyncio.run, default loop, Unix socket), none of trio_bridge's transport, worker or patches",
            **floor.info,
        }
        # (kind, pool tool, floor tool): the inline tool is compared with the floor's sync path
        for kind, tool, floor_tool in (
            ("sync_tool", "noop", "noop"), ("async_tool", "anoop", "anoop"), ("inline_tool", "inline_noop", "noop"),
        ):
            measured = step(f"unary, {tool} / floor {floor_tool}", unary_latency, floor, tool, floor_tool, rounds, per_round)
            r[f"bare_grpclib_floor_{kind}"] = measured["floor"]
            r[f"pool_execute_{kind}"] = measured["pool"]
            r[f"raw_trio_asyncio_crossing_{kind}"] = measured["crossing"]
        r["throughput_64_vs_floor"] = step(
            "throughput 64/16/anoop, pool and floor", throughput_vs_floor, floor, 64, 16, "anoop", 2 if quick else 3, seconds
        )
    finally:
        floor.close()
    r["trio_parallel_run_sync"] = step("trio_parallel", trio_parallel_run_sync, n)
    r["process_pool_executor"] = step("ProcessPoolExecutor", process_pool_executor, n)

    configs = [(64, 1, "noop"), (64, 16, "noop")]
    if not quick:
        configs = [(1, 1, "noop"), (8, 1, "noop"), (8, 16, "anoop"), *configs]
    r["throughput_calls_per_s"] = {
        f"{k} in flight, concurrency {c}, {'async' if tool == 'anoop' else 'sync'} tool":
            step(f"throughput {k}/{c}/{tool}", pool_throughput, k, seconds, c, tool)
        for k, c, tool in configs
    }
    r["throughput_calls_per_s"]["64 in flight, concurrency 16, async tool"] = r["throughput_64_vs_floor"]["pool_calls_per_s"]
    chunks = 50_000 if quick else 200_000
    r["stream_chunks_per_s_by_generator"] = {
        "sync_generator": step("stream, sync generator", stream_rate, "count", chunks),
        "async_generator": step("stream, async generator", stream_rate, "acount", chunks),
    }
    r["arrays"] = {
        "100 MB float32, shared memory": step(
            "array 100 MB, shared memory", array_round_trip, 100_000_000, 3 if quick else 7, 2, 1 << 20
        ),
        "50 MiB float32, in-band": step("array 50 MiB, in-band", array_round_trip, 50 * 2**20, 2 if quick else 4, 0, None),
    }
    r["time_to_ready_s"] = step("time to ready", time_to_ready, (1, 8), 2 if quick else 4)
    r["restart_s"] = step("restart", restart, 2 if quick else 4)
    r["worker_import"] = step("worker import", worker_import, 3 if quick else 7)
    r["session_rss"] = step("host RSS, sessions", session_rss, 10_000, 10)
    r["watch_fan_out"] = step("watch fan-out", watch_fan_out, 1000, 30 if quick else 200)
    if not quick:
        from benchmarks.watch_fanout import through_session

        r["watch_fan_out_writer"] = step("watch fan-out, writer", through_session, 1000, 5000, 100)
        r["stream_memory"] = step("stream memory", stream_memory, 1_000_000)
        r["state"] = step("state", state, 2000, 100, 100)
        r["state_backends"] = step("state backends", state_backends, 2000)
        r["remote_unary"] = step("remote unary", remote_unary, 1000)
        r["tools"] = step("tools", tools, 1000)

    # ---- the targets' figures: plain numbers at the top level ----
    arrays = r["arrays"]
    ready = {k: statistics.median(v) for k, v in r["time_to_ready_s"].items()}
    r.update({
        "unary_pool_over_floor_sync": r["pool_execute_sync_tool"]["p50_us"] / r["bare_grpclib_floor_sync_tool"]["p50_us"],
        "unary_pool_over_floor_async": r["pool_execute_async_tool"]["p50_us"] / r["bare_grpclib_floor_async_tool"]["p50_us"],
        "throughput_64_in_flight_calls_per_s": r["throughput_64_vs_floor"]["pool_calls_per_s"],
        "array_100mb_round_trip_gb_per_s": 100e6 / arrays["100 MB float32, shared memory"]["median_s"] / 1e9,
        "array_inband_mib_per_s": 50 / arrays["50 MiB float32, in-band"]["median_s"],
        "stream_chunks_per_s": max(r["stream_chunks_per_s_by_generator"].values()),
        "ready_8_over_1": ready["8"] / ready["1"],
        "restart_seconds": statistics.median(r["restart_s"]),
        "worker_import_seconds": r["worker_import"]["median_difference_s"],
        "worker_import_stack_floor_seconds": r["worker_import"]["stack_median_difference_s"],
        "host_rss_mib_10k_sessions": r["session_rss"]["rss_mib"],
        "watch_fanout_1000_p50_ms": r["watch_fan_out"]["p50_us"] / 1000,
        "unary_pool_over_floor_inline": r["pool_execute_inline_tool"]["p50_us"] / r["bare_grpclib_floor_inline_tool"]["p50_us"],
        "throughput_64_over_floor": r["throughput_64_vs_floor"]["pool_calls_per_s"] / r["throughput_64_vs_floor"]["floor_calls_per_s"],
        "floor_p50_us": r["bare_grpclib_floor_sync_tool"]["p50_us"],
        "trio_parallel_p50_us": r["trio_parallel_run_sync"]["p50_us"],
        "process_pool_executor_p50_us": r["process_pool_executor"]["p50_us"],
    })
    r["targets"] = {
        key: {"comparison": "<=" if cmp is LE else ">=", "target": target, "met": cmp(r[key], target)}
        for key, _, _, cmp, target in TARGETS
    }
    r["elapsed_s"] = time.perf_counter() - started
    with open(args.json, "w") as f:
        json.dump(r, f, indent=2)
    show(r)
    console.print(f"written to {args.json} ({r['elapsed_s']:.0f} s)")


def only(part: str, quick: bool, json_path: str | None) -> None:
    """One part of the full run (the same steps and figures), on its own."""
    r: dict[str, Any] = {"only": part, "quick": quick}
    if part == "unary":
        rounds, per_round = (3, 200) if quick else (8, 250)
        floor = StockFloor()
        try:
            for kind, tool in (("sync", "noop"), ("async", "anoop")):
                measured = trio.run(unary_latency, floor, tool, tool, rounds, per_round)
                r[f"pool_execute_{kind}_tool"], r[f"bare_grpclib_floor_{kind}_tool"] = measured["pool"], measured["floor"]
                r[f"unary_pool_over_floor_{kind}"] = measured["pool"]["p50_us"] / measured["floor"]["p50_us"]
        finally:
            floor.close()
        keys = ["unary_pool_over_floor_sync", "unary_pool_over_floor_async"]
    else:
        shared = trio.run(array_round_trip, 100_000_000, 3 if quick else 7, 2, 1 << 20)
        inband = trio.run(array_round_trip, 50 * 2**20, 2 if quick else 4, 0, None)
        r["arrays"] = {"100 MB float32, shared memory": shared, "50 MiB float32, in-band": inband}
        r["array_100mb_round_trip_gb_per_s"] = 100e6 / shared["median_s"] / 1e9
        r["array_inband_mib_per_s"] = 50 / inband["median_s"]
        keys = ["array_100mb_round_trip_gb_per_s", "array_inband_mib_per_s"]
    table = Table(title=f"trio-bridge: {part} only{' (quick)' if quick else ''}")
    for column in ("key", "measure", "value", "target"):
        table.add_column(column)
    for key, what, unit, cmp, target in TARGETS:
        if key in keys:
            met = "[green]met[/]" if cmp(r[key], target) else "[red]missed[/]"
            table.add_row(key, what, f"{_number(r[key])} {unit}", f"{'<=' if cmp is LE else '>='} {target} {met}")
    console.print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=2)


def show(r: dict[str, Any]) -> None:
    title = f"trio-bridge: issue 9 targets ({r['machine']['cpus']} cores, Python {r['machine']['python']}"
    targets = Table(title=title + (", quick)" if r["quick"] else ")"))
    targets.add_column("key", no_wrap=True)
    targets.add_column("measure")
    targets.add_column("value", justify="right", no_wrap=True)
    targets.add_column("target", justify="right", no_wrap=True)
    targets.add_column("", no_wrap=True)
    for key, what, unit, cmp, target in TARGETS:
        met = r["targets"][key]["met"]
        targets.add_row(
            key, what, f"{_number(r[key])} {unit}", f"{'≤' if cmp is LE else '≥'} {_number(target)} {unit}",
            "[green]met[/]" if met else "[red]missed[/]",
        )
    for key, what in EXTRAS:
        targets.add_row(key, what, f"{_number(r[key])} x", "(no target)", "")
    for key, what in PEERS:
        targets.add_row(key, what, f"{r[key]:,.0f} µs", "", "")
    console.print(targets)

    detail = Table(title="detail")
    detail.add_column("measure")
    detail.add_column("value", justify="right", no_wrap=True)

    def latency(label: str, v: dict[str, float], digits: int = 0) -> None:
        detail.add_row(label, f"p50 {v['p50_us']:.{digits}f} µs   p99 {v['p99_us']:.{digits}f} µs")

    f = r["stock_floor"]
    detail.add_row(
        "stock floor (benchmarks/floor.py): processes, loop, h2",
        f"{len(f['servers'])} servers + 1 client, {f['client']['loop'].rsplit('.', 1)[-1]}, h2 {f['client']['h2']} unpatched",
    )
    for label, key in (
        ("stock floor, sync noop (run_in_executor)", "bare_grpclib_floor_sync_tool"),
        ("raw trio-asyncio crossing, our transport, noop", "raw_trio_asyncio_crossing_sync_tool"),
        ("pool.execute, sync noop", "pool_execute_sync_tool"),
        ("stock floor, async anoop", "bare_grpclib_floor_async_tool"),
        ("raw trio-asyncio crossing, our transport, anoop", "raw_trio_asyncio_crossing_async_tool"),
        ("pool.execute, async anoop", "pool_execute_async_tool"),
        ("stock floor, sync noop (rounds with inline_noop)", "bare_grpclib_floor_inline_tool"),
        ("pool.execute, inline inline_noop", "pool_execute_inline_tool"),
        ("trio_parallel.run_sync", "trio_parallel_run_sync"),
        ("ProcessPoolExecutor(1)", "process_pool_executor"),
    ):
        latency(f"unary round trip: {label}", r[key])
    for k, v in r["throughput_calls_per_s"].items():
        detail.add_row(f"throughput, 2 workers, {k}", f"{v:,.0f} calls/s")
    t = r["throughput_64_vs_floor"]
    detail.add_row(
        f"throughput, stock floor, {t['in_flight']} tasks in 1 client, {t['floor_server_processes']} servers, async tool",
        f"{t['floor_calls_per_s']:,.0f} calls/s",
    )
    for k, v in r["stream_chunks_per_s_by_generator"].items():
        detail.add_row(f"stream into Trio, {k}", f"{v:,.0f} chunks/s")
    for k, v in r["arrays"].items():
        warm = ", ".join(f"{s:.2f}" for s in v["warm_up_s"]) + " s" if v["warm_up_s"] else "a tiny array"
        detail.add_row(f"array echo, {k} (warm-up: {warm})", f"median {v['median_s'] * 1e3:,.0f} ms per round trip")
    for k, v in r["time_to_ready_s"].items():
        detail.add_row(f"time to ready, {k} worker(s)", f"median {statistics.median(v):.2f} s")
    detail.add_row("restart after SIGKILL, each sample", ", ".join(f"{s:.2f}" for s in r["restart_s"]) + " s")
    imp = r["worker_import"]
    detail.add_row(
        "worker import / the stack's (asyncio, grpclib, uvloop) / bare python",
        f"{statistics.median(imp['import_s']):.3f} / {statistics.median(imp['stack_import_s']):.3f} / "
        f"{statistics.median(imp['bare_python_s']):.3f} s",
    )
    s = r["session_rss"]
    detail.add_row(
        f"host RSS, {s['sessions']:,} sessions x {s['variables_per_session']} variables",
        f"{s['rss_before_mib']:.0f} → {s['rss_mib']:.0f} MiB in {s['seconds']:.1f} s",
    )
    latency(f"watch: write until all {r['watch_fan_out']['watchers']:,} watchers saw it", r["watch_fan_out"])
    if "watch_fan_out_writer" in r:
        w = r["watch_fan_out_writer"]
        detail.add_row(
            f"watch: writer with {w['watchers']:,} watchers (watch_fanout.py)",
            f"p50 {w['p50_us']:.0f} µs   {w['wall_writes_per_s']:,} writes/s   drain {w['drain_s'] * 1e3:.0f} ms",
        )
    if "stream_memory" in r:
        m = r["stream_memory"]
        detail.add_row(
            f"host RSS, {m['chunks']:,} chunks to a slow consumer",
            f"{m['rss_first_mib']:.1f} → max {m['rss_max_mib']:.1f} → {m['rss_last_mib']:.1f} MiB",
        )
    for k, v in r.get("state", {}).items():
        latency(f"variables: {k.replace('_', ' ')}", v, 1)
    for k, v in r.get("state_backends", {}).items():
        latency(f"state: {k.replace('_', ' ')}", v)
    for k, v in r.get("remote_unary", {}).items():
        latency(f"unary call, {k.replace('_', ' ')} worker", v)
    for k, v in r.get("tools", {}).items():
        latency(f"tools: {k.replace('_', ' ')} call", v)
    console.print(detail)


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


if __name__ == "__main__":
    main()
