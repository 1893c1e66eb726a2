"""The benchmark harness: trio-bridge against stock parts and peers doing the same work, in one run.

    python -m benchmarks.bench [--quick] [--json PATH] [--only unary|arrays|ready]

It measures through the public API only (``open_pool``, ``pool.execute``, ``pool.stream``,
sessions, ``pool.workers()``, ``pool.start_method``); the stock floors are processes of their
own (``benchmarks/floor.py``). It prints tables and writes JSON (default
``benchmarks/results.json``) whose top-level keys are plain numbers:

**Per call, one at a time** (µs, p50 over rounds in which every path takes its turn, so that
the machine's drift falls on all of them alike; each warmed up first). The pool has one worker
(``size=1``); a call is ``pool.execute(tool, {"x": i})`` from Trio, tools of
``benchmarks.adapters:Bench``: ``noop`` (sync: the worker's thread pool), ``anoop``
(``async def``), ``inline_noop`` (sync, ``@tool(inline=True)``: on the worker's loop).

- ``unary_pool_p50_us``: the pool, ``noop``; ``unary_pool_async_p50_us``: ``anoop``;
  ``unary_pool_inline_p50_us``: ``inline_noop``.
- ``grpclib_stream_p50_us``: **the floor**: the same call messages (the pool's ``CallMessage`` /
  ``CallResult``, JSON arguments and result) over ONE long-lived bidirectional stream of stock
  grpclib, sequential calls, between a client process and a server process that both run the
  event loop the pool's worker runs (asked of the worker; ``stock_floor.loop``: uvloop where
  installed); the sync tool through ``run_in_executor``.
- ``grpclib_unary_p50_us``: the same call as a unary grpclib RPC (``ExecuteTool``) per call,
  same processes and loop (the harness's only floor before issue 20, then on asyncio's default
  loop).
- ``trio_parallel_p50_us``: ``run_sync(noop, i)`` on a ``trio_parallel`` worker context, from Trio.
- ``process_pool_executor_p50_us``: ``ProcessPoolExecutor(1)`` (spawn), ``submit(noop, i).result()``.
- ``raw_socket_p50_us``: the physical floor: the bytes of one encoded ``CallMessage`` sent over a
  Unix stream socket to an echo process and read back, blocking, between two processes.
- ``unary_pool_over_grpclib_stream`` (sync tools; ``_async`` and ``_inline``: the pool's
  ``anoop`` / ``inline_noop`` over the floor's), ``unary_pool_over_grpclib_unary``,
  ``unary_pool_over_trio_parallel``, ``unary_pool_over_process_pool_executor``,
  ``unary_pool_over_raw_socket``: the pool's p50 over that one's, measured in the same rounds
  (above 1: the pool is slower).

**Throughput.** ``throughput_64_in_flight_calls_per_s``: calls/s of 64 Trio tasks calling
``anoop`` in a loop on a pool of 2 workers, concurrency 16 (an issue 9 target), in windows
alternating with the floors': ``throughput_64_over_grpclib_stream`` (one client process, 64
tasks, one stream to each of 2 server processes, calls told apart by ``call_id``) and
``throughput_64_over_grpclib_unary`` (the same, a unary RPC per call): the pool's calls/s over
the floor's (above 1: the pool is faster).

**Arrays** (float32). Every call sends new contents (a pattern plus the call's number); the
worker's ``plus_one`` checks what arrived (the float64 sum of every 4093rd element against the
sum the host computed before sending) and returns a NEW array ``a + 1``; the host checks, outside
the timing, that the result equals ``a + 1`` computed itself. Medians after warm-up calls.

- ``array_100mb_plus_one_ms``: ``pool.execute("plus_one", ...)`` of 1e8 bytes, through shared
  memory (pool default: arrays of 1 MiB and more), argument and result;
- ``array_100mb_plus_one_in_process_ms``: the same function (the sample check and ``a + 1``) in
  the host process, on the same arrays; ``array_100mb_plus_one_over_in_process``: the ratio;
- ``array_100mb_plus_one_buffers_ms``: the same computation with the zero-copy buffers: the
  argument (same contents) in a ``pool.empty`` array, filled before the timing (as the in-process
  argument is made before its timing), and ``plus_one_into``, which writes ``a + 1`` into a
  ``ctx.empty`` array that travels back without a copy; timed from the call until the result
  array is in hand; ``array_100mb_plus_one_buffers_over_in_process``: its ratio to the in-process
  figure (issue 24, target 2). ``array_100mb_plus_one_ms`` stays the plain ``return a + 1`` of an
  ordinary array (one copy each way);
- ``array_100mb_echo_ms`` (extra row, not a transfer figure): ``echo`` of the same array: the
  host copies the argument into its shared-memory segment, the worker returns it unread, and the
  result is that same segment of the host's handed back (the worker reads, computes and copies
  no array byte; only shape and dtype, and then the host's own bytes, can be checked);
- ``array_inband_50mib_plus_one_ms`` / ``array_inband_50mib_plus_one_in_process_ms``: the same
  for 50 MiB in the gRPC stream (``shared_memory_threshold=None``);
  ``array_inband_mib_per_s``: 50 MiB over that median round trip (an issue 9 target).

**Start-up** (median seconds from ``open_pool`` until its block runs; sizes and adapters take
turns). ``ready_1_s`` / ``ready_8_s`` / ``ready_8_over_1`` (an issue 9 target): the trivial
adapter ``benchmarks.adapters:Bench`` (its module imports nothing beyond trio_bridge; empty
``setup()``). ``ready_numpy_1_s`` / ``ready_numpy_8_s`` / ``ready_8_over_1_numpy``:
``benchmarks.adapters_numpy:BenchNumpy``, whose module imports numpy and whose ``setup()`` runs a
256x256 matmul (BLAS), pool defaults: the pool spawns these workers when numpy's BLAS threads make
its fork server unsafe (``time_to_ready.<adapter>.start_method``: ``pool.start_method``).
``ready_8_over_1_numpy_openblas_1``: the numpy adapter with ``env={"OPENBLAS_NUM_THREADS": "1"}``.

**Other** (issue 9 targets): ``stream_chunks_per_s`` (chunks/s into a Trio consumer, the better
of a sync and an async generator); ``restart_seconds`` (SIGKILL of one worker of a ready pool of
2 until 2 are ready again, median); ``worker_import_seconds`` (a fresh ``python -m
trio_bridge.worker --help``: what a worker imports before its adapter, minus ``python -c pass``,
median) and ``worker_import_stack_floor_seconds`` (the same for ``import asyncio, grpclib.server,
grpclib.client, uvloop``); ``host_rss_mib_10k_sessions`` (RSS of a fresh host process with
10,000 sessions of 10 variables, ``benchmarks/session_rss.py``); ``watch_fanout_1000_p50_ms``
(one ``set_variable`` until all of 1,000 watchers have seen it).

``--only unary|arrays|ready`` runs that part alone (the same code and keys) and prints its
figures; it writes JSON only to a ``--json`` given. ``targets`` holds each issue 9 target's
value and whether it was met; the samples behind the figures stay in nested sections
(``round_trips``, ``stock_floor``, ``throughput_64_vs_floors``, ``throughput_calls_per_s``,
``arrays``, ``time_to_ready``, ``stream_chunks_per_s_by_generator``, ``restart_s``,
``worker_import``, ``session_rss``, ``watch_fan_out``). The full run (about 5 minutes on 2
cores) adds detail sections: variables, state backends, remote workers, tools, host memory while
1,000,000 chunks stream to a slow consumer, the writer's side of a 1,000-watcher fan-out
(``benchmarks/watch_fanout.py``). ``--quick`` (about 1 minute) takes fewer samples and skips
those.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import logging
import multiprocessing
import operator
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

import trio_bridge
from benchmarks.adapters import plus_one, sample_sum
from benchmarks.floor import StockFloor, noop

ADAPTER = "benchmarks.adapters:Bench"
NUMPY_ADAPTER = "benchmarks.adapters_numpy:BenchNumpy"
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


# ---- one call at a time: the pool, the stock floors and the peers, in interleaved rounds ----
UNARY_TOOLS = ("noop", "anoop", "inline_noop")  # sync (thread pool), async def, inline sync (on the loop)


async def worker_event_loop() -> str:
    """The class of the event loop a pool's worker runs, as the worker itself reports it."""
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool:
        return await pool.execute("event_loop")


def floor_loop(worker_loop: str) -> str:
    """The floor's ``--loop`` for a worker running ``worker_loop``: like with like."""
    return "uvloop" if worker_loop.startswith("uvloop.") else "asyncio"


def _executor_calls(executor: concurrent.futures.Executor, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        executor.submit(noop, i).result()
        samples.append(time.perf_counter() - t0)
    return samples


async def round_trips(floor: StockFloor, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Seconds per call, one call at a time, of every path: ``pool_<tool>``,
    ``grpclib_stream_<tool>`` and ``grpclib_unary_<tool>`` for each of ``UNARY_TOOLS``, and
    ``trio_parallel``, ``process_pool_executor``, ``raw_socket``; ``per_round`` calls of each
    path per round, the paths in turn (the floor's while Trio waits idle in a thread)."""
    import trio_parallel

    samples: dict[str, list[float]] = {}
    spawn = multiprocessing.get_context("spawn")
    async with (
        trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool,
        trio_parallel.open_worker_context() as context,
    ):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as executor:

            async def pool_calls(tool: str, n: int) -> list[float]:
                out = []
                for i in range(n):
                    t0 = time.perf_counter()
                    await pool.execute(tool, {"x": i})
                    out.append(time.perf_counter() - t0)
                return out

            async def trio_parallel_calls(n: int) -> list[float]:
                out = []
                for i in range(n):
                    t0 = time.perf_counter()
                    await context.run_sync(noop, i)
                    out.append(time.perf_counter() - t0)
                return out

            async def floor_calls(kind: str, tool: str, n: int) -> list[float]:
                return await trio.to_thread.run_sync(floor.measure, kind, tool, n)

            async def executor_calls(n: int) -> list[float]:
                return await trio.to_thread.run_sync(_executor_calls, executor, n)

            paths: dict[str, Callable[[int], Awaitable[list[float]]]] = {}
            for tool in UNARY_TOOLS:
                paths[f"pool_{tool}"] = partial(pool_calls, tool)
                paths[f"grpclib_stream_{tool}"] = partial(floor_calls, "stream", tool)
                paths[f"grpclib_unary_{tool}"] = partial(floor_calls, "unary", tool)
            paths["trio_parallel"] = trio_parallel_calls
            paths["process_pool_executor"] = executor_calls
            paths["raw_socket"] = partial(floor_calls, "socket", "")
            for measure in paths.values():  # warm-up: connections, threads, caches
                await measure(max(per_round // 2, 10))
            for _ in range(rounds):
                for name, measure in paths.items():
                    samples.setdefault(name, []).extend(await measure(per_round))
    return {name: percentiles(s) for name, s in samples.items()}


def unary_figures(trips: dict[str, dict[str, float]]) -> dict[str, float]:
    """The top-level per-call keys (see the module's docstring) from ``round_trips``'s result."""
    p50 = {name: v["p50_us"] for name, v in trips.items()}
    pool = p50["pool_noop"]
    return {
        "unary_pool_p50_us": pool,
        "unary_pool_async_p50_us": p50["pool_anoop"],
        "unary_pool_inline_p50_us": p50["pool_inline_noop"],
        "grpclib_stream_p50_us": p50["grpclib_stream_noop"],
        "grpclib_unary_p50_us": p50["grpclib_unary_noop"],
        "trio_parallel_p50_us": p50["trio_parallel"],
        "process_pool_executor_p50_us": p50["process_pool_executor"],
        "raw_socket_p50_us": p50["raw_socket"],
        "unary_pool_over_grpclib_stream": pool / p50["grpclib_stream_noop"],
        "unary_pool_over_grpclib_stream_async": p50["pool_anoop"] / p50["grpclib_stream_anoop"],
        "unary_pool_over_grpclib_stream_inline": p50["pool_inline_noop"] / p50["grpclib_stream_inline_noop"],
        "unary_pool_over_grpclib_unary": pool / p50["grpclib_unary_noop"],
        "unary_pool_over_trio_parallel": pool / p50["trio_parallel"],
        "unary_pool_over_process_pool_executor": pool / p50["process_pool_executor"],
        "unary_pool_over_raw_socket": pool / p50["raw_socket"],
    }


def unary_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    """Per-call latency and the 64-in-flight throughput against the floors, into ``r``."""
    worker_loop = step("the worker's event loop", worker_event_loop)
    rounds, per_round = (3, 200) if quick else (8, 250)
    floor = StockFloor(servers=2, loop=floor_loop(worker_loop))  # the latency rounds use its first server only
    try:
        r["stock_floor"] = {
            "what": "benchmarks/floor.py: stock grpclib client and server processes on the worker's kind of event "
                    "loop, Unix sockets, the pool's messages in stock betterproto2, none of trio_bridge's transport, "
                    "worker or patches; and a raw Unix-socket echo process",
            "worker_event_loop": worker_loop,
            **floor.info,
        }
        r["round_trips"] = step("one call at a time: pool, floors, peers", round_trips, floor, rounds, per_round)
        r.update(unary_figures(r["round_trips"]))
        t = r["throughput_64_vs_floors"] = step(
            "throughput 64/16/anoop: pool and floors", throughput_vs_floors, floor, 64, 16, "anoop",
            2 if quick else 3, 1.0 if quick else 3.0,
        )
    finally:
        floor.close()
    r["throughput_64_in_flight_calls_per_s"] = t["pool_calls_per_s"]
    r["throughput_64_over_grpclib_stream"] = t["pool_calls_per_s"] / t["floor_stream_calls_per_s"]
    r["throughput_64_over_grpclib_unary"] = t["pool_calls_per_s"] / t["floor_unary_calls_per_s"]


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
        ADAPTER, size=2, concurrency=concurrency, max_queue=256, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)
    ) as pool:
        done, elapsed = await _pool_window(pool, in_flight, seconds, tool)
        return done / elapsed




async def throughput_vs_floors(
    floor: StockFloor, in_flight: int, concurrency: int, tool: str, rounds: int, seconds: float
) -> dict[str, Any]:
    """Calls/s with ``in_flight`` calls in flight: the pool (2 workers) and the stock floor (one
    client process with ``in_flight`` tasks, spread over its 2 server processes) on its streams
    and with unary RPCs, in alternating windows of ``seconds`` after a short warm-up of each;
    each side's calls over its seconds."""
    async with trio_bridge.open_pool(
        ADAPTER, size=2, concurrency=concurrency, max_queue=256, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)
    ) as pool:
        await _pool_window(pool, in_flight, 0.3, tool)
        for kind in ("stream", "unary"):
            await trio.to_thread.run_sync(floor.throughput, kind, tool, in_flight, 0.3)
        windows: dict[str, list[tuple[int, float]]] = {"pool": [], "floor_stream": [], "floor_unary": []}
        for _ in range(rounds):
            windows["pool"].append(await _pool_window(pool, in_flight, seconds, tool))
            for kind in ("stream", "unary"):
                f = await trio.to_thread.run_sync(floor.throughput, kind, tool, in_flight, seconds)
                windows[f"floor_{kind}"].append((f["calls"], f["seconds"]))

    def rate(w: list[tuple[int, float]]) -> float:
        return sum(c for c, _ in w) / sum(s for _, s in w)

    return {
        "in_flight": in_flight, "tool": tool, "pool_workers": 2, "pool_concurrency": concurrency,
        "floor_server_processes": len(floor.paths), "floor_client_tasks": in_flight,
        **{f"{side}_calls_per_s": rate(w) for side, w in windows.items()},
        **{f"{side}_windows_calls_per_s": [c / t for c, t in w] for side, w in windows.items()},
    }


async def stream_rate(tool: str, n: int) -> float:
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool:
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
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool:
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
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool, pool.session() as session:
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

    from trio_bridge.testing import Certificates, RemoteWorkerProcess, free_port, write_token_file

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        d = pathlib.Path(directory)
        certs = Certificates.create(d)
        token = secrets.token_hex(16)
        write_token_file(d / "token", token)
        for kind in ("unix_local", "tcp_tls_remote", "tcp_plain_remote"):
            worker = None
            options: dict[str, Any] = {"size": 1, "lifecycle": trio_bridge.Lifecycle(health_check_interval=0)}
            if kind != "unix_local":
                tls = kind == "tcp_tls_remote"
                worker = RemoteWorkerProcess(
                    ADAPTER, f"tcp://127.0.0.2:{free_port('127.0.0.2')}", d / "token", certificates=certs if tls else None,
                ).start()
                options = {"size": 0, "remote": trio_bridge.RemoteWorkers(
                    addresses=[worker.address], token=token, listen="tcp://127.0.0.1:0", tls=certs.tls("host") if tls else None,
                )}
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
    async with trio_bridge.open_pool(ADAPTER, size=2, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool:

        @pool.host_tool
        async def echo(x: int) -> int:
            return x

        to_host = await pool.execute("time_host_tool_calls", {"n": n})
        to_worker = await pool.execute("time_worker_calls", {"n": n})
    return {"worker_to_host_tool": percentiles(to_host), "worker_to_worker_tool": percentiles(to_worker)}


# ---- arrays: a new array computed from the argument, checked on both sides, next to numpy in-process ----
async def array_plus_one(n_bytes: int, repeats: int, warm_ups: int, threshold: int | None, echo: bool) -> dict[str, Any]:
    """Seconds per ``pool.execute("plus_one", ...)`` of an ``n_bytes`` float32 array (and per
    in-process ``plus_one`` of the same array; with ``echo``, per ``echo`` of it too, and per
    ``plus_one_into`` of the same contents in a ``pool.empty`` buffer).

    Each call's array is new (a pattern plus the call's number, exact in float32), so a stale or
    echoed result cannot pass the host's check. ``warm_ups`` full-size calls come first: fresh
    shared-memory pages fault on first touch, and each side's region is reused afterwards. The
    result is dropped before the next call, so that its segment can be reused.
    """
    import numpy as np

    pattern = (np.arange(n_bytes // 4, dtype=np.int64) % 1021).astype(np.float32)
    pool_s: list[float] = []
    local_s: list[float] = []
    echo_s: list[float] = []
    buffers_s: list[float] = []
    warm: list[float] = []
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0), local=trio_bridge.LocalWorkers(shared_memory_threshold=threshold)) as pool:
        await pool.execute("plus_one", {"a": pattern[:10], "sample_sum": sample_sum(pattern[:10])})
        for i in range(warm_ups + repeats):
            a = pattern + np.float32(i)
            expected = sample_sum(a)
            t0 = time.perf_counter()
            result = await pool.execute("plus_one", {"a": a, "sample_sum": expected})
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            local = plus_one(a, expected)
            local_elapsed = time.perf_counter() - t0
            if result.shape != a.shape or result.dtype != a.dtype or not np.array_equal(result, local):
                raise RuntimeError(f"plus_one returned {result.dtype}{result.shape}, not the {a.dtype}{a.shape} a + 1")
            del result
            if i < warm_ups:
                warm.append(elapsed)
                if echo:
                    await _plus_one_buffers(pool, pattern, i, expected, local)
                continue
            pool_s.append(elapsed)
            local_s.append(local_elapsed)
            if echo:
                buffers_s.append(await _plus_one_buffers(pool, pattern, i, expected, local))
            del local
            if echo:
                t0 = time.perf_counter()
                result = await pool.execute("echo", {"value": a})
                echo_s.append(time.perf_counter() - t0)
                if not np.array_equal(result, a):
                    raise RuntimeError("echo returned other contents than it was sent")
                del result
    out: dict[str, Any] = {
        "bytes": n_bytes, "shared_memory_threshold": threshold, "warm_up_s": warm,
        "plus_one_s": pool_s, "in_process_s": local_s,
        "median_s": statistics.median(pool_s), "in_process_median_s": statistics.median(local_s),
    }
    if echo:
        out |= {"echo_s": echo_s, "echo_median_s": statistics.median(echo_s),
                "buffers_s": buffers_s, "buffers_median_s": statistics.median(buffers_s)}
    return out


async def _plus_one_buffers(pool: Any, pattern: Any, i: int, expected: float, local: Any) -> float:
    """Seconds per ``pool.execute("plus_one_into", ...)``: the argument (the same contents as
    ``plus_one``'s) filled into a ``pool.empty`` buffer beforehand, as a program builds its
    array; the worker writes ``a + 1`` into a ``ctx.empty`` array. The result is checked
    against ``local`` outside the timing."""
    import numpy as np

    buffer = pool.empty(pattern.shape, pattern.dtype)
    np.add(pattern, np.float32(i), out=buffer)
    t0 = time.perf_counter()
    result = await pool.execute("plus_one_into", {"a": buffer, "sample_sum": expected})
    elapsed = time.perf_counter() - t0
    if result.shape != local.shape or result.dtype != local.dtype or not np.array_equal(result, local):
        raise RuntimeError(f"plus_one_into returned {result.dtype}{result.shape}, not the {local.dtype}{local.shape} a + 1")
    if buffer.flags.writeable:
        raise RuntimeError("a pool.empty buffer stayed writable after it was sent")
    return elapsed


def arrays_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    shared = step("array 100 MB, shared memory: plus_one, in-process, echo",
                  array_plus_one, 100_000_000, 3 if quick else 7, 2, 1 << 20, True)
    inband = step("array 50 MiB, in-band: plus_one, in-process",
                  array_plus_one, 50 * 2**20, 2 if quick else 4, 1, None, False)
    r["arrays"] = {"100 MB float32, shared memory": shared, "50 MiB float32, in-band": inband}
    r.update({
        "array_100mb_plus_one_ms": shared["median_s"] * 1e3,
        "array_100mb_plus_one_in_process_ms": shared["in_process_median_s"] * 1e3,
        "array_100mb_plus_one_over_in_process": shared["median_s"] / shared["in_process_median_s"],
        "array_100mb_echo_ms": shared["echo_median_s"] * 1e3,
        "array_100mb_plus_one_buffers_ms": shared["buffers_median_s"] * 1e3,
        "array_100mb_plus_one_buffers_over_in_process": shared["buffers_median_s"] / shared["in_process_median_s"],
        "array_inband_50mib_plus_one_ms": inband["median_s"] * 1e3,
        "array_inband_50mib_plus_one_in_process_ms": inband["in_process_median_s"] * 1e3,
        "array_inband_mib_per_s": 50 / inband["median_s"],
    })


# ---- start-up ----
#: label: (adapter, extra environment of its workers)
READY_ADAPTERS: dict[str, tuple[str, dict[str, str] | None]] = {
    "trivial": (ADAPTER, None),
    "numpy": (NUMPY_ADAPTER, None),
    "numpy_openblas_1": (NUMPY_ADAPTER, {"OPENBLAS_NUM_THREADS": "1"}),
}


async def time_to_ready(sizes: tuple[int, ...], repeats: int) -> dict[str, dict[str, Any]]:
    """Seconds from ``open_pool`` until its block runs, for each of ``READY_ADAPTERS`` and
    ``sizes``, all taking turns in each repeat (drift); and ``pool.start_method`` as it was."""
    out: dict[str, dict[str, Any]] = {
        label: {"adapter": adapter, "env": env, "start_method": [], "seconds": {str(s): [] for s in sizes}}
        for label, (adapter, env) in READY_ADAPTERS.items()
    }
    quiet = logging.getLogger("trio_bridge")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "workers start by spawn" (INFO), expected for numpy
    try:
        for _ in range(repeats):
            for label, (adapter, env) in READY_ADAPTERS.items():
                for size in sizes:
                    t0 = time.perf_counter()
                    async with trio_bridge.open_pool(adapter, size=size, local=trio_bridge.LocalWorkers(env=env), lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool:
                        out[label]["seconds"][str(size)].append(time.perf_counter() - t0)
                        if pool.start_method not in out[label]["start_method"]:
                            out[label]["start_method"].append(pool.start_method)
    finally:
        quiet.setLevel(level)
    for v in out.values():
        v["median_s"] = {size: statistics.median(s) for size, s in v["seconds"].items()}
    return out


def ready_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    ready = r["time_to_ready"] = step("time to ready, 1 and 8 workers, 3 adapters", time_to_ready, (1, 8), 2 if quick else 4)
    r.update({
        "ready_1_s": ready["trivial"]["median_s"]["1"],
        "ready_8_s": ready["trivial"]["median_s"]["8"],
        "ready_8_over_1": ready["trivial"]["median_s"]["8"] / ready["trivial"]["median_s"]["1"],
        "ready_numpy_1_s": ready["numpy"]["median_s"]["1"],
        "ready_numpy_8_s": ready["numpy"]["median_s"]["8"],
        "ready_8_over_1_numpy": ready["numpy"]["median_s"]["8"] / ready["numpy"]["median_s"]["1"],
        "ready_8_over_1_numpy_openblas_1":
            ready["numpy_openblas_1"]["median_s"]["8"] / ready["numpy_openblas_1"]["median_s"]["1"],
    })


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
    """Wall seconds of a fresh ``python -m trio_bridge.worker --help`` (what a worker imports
    before it loads its adapter, and its argument parser), minus a bare ``python -c pass``,
    interleaved; and the same for the stack alone (``STACK_IMPORTS``)."""

    def wall(*args: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    worker = ("-m", "trio_bridge.worker", "--help")
    wall(*worker)  # the first run reads the files from disk: not what a worker start pays
    wall("-c", STACK_IMPORTS)
    imports, stack, bare = [], [], []
    for _ in range(repeats):
        imports.append(wall(*worker))
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
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool, pool.session() as session:
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


# ---- the targets of issue 9 that still measure what they say: (key, what, unit, comparison, target) ----
LE, GE = operator.le, operator.ge
TARGETS: list[tuple[str, str, str, Callable[[float, float], bool], float]] = [
    ("throughput_64_in_flight_calls_per_s",
     f"throughput, 64 in flight, 2 workers, async tool, concurrency 16 (1.5 x {THROUGHPUT_64_MEASURED_AT_7070995:,.0f} "
     "measured at 7070995)", "calls/s", GE, 1.5 * THROUGHPUT_64_MEASURED_AT_7070995),
    ("array_inband_mib_per_s", "50 MiB float32 plus_one in-band (50 MiB / round trip)", "MiB/s", GE, 300.0),
    ("stream_chunks_per_s", "stream into Trio (better of sync / async generator)", "chunks/s", GE, 60_000.0),
    ("ready_8_over_1", "time to ready, 8 workers / 1, trivial adapter", "x", LE, 1.3),
    ("ready_8_over_1_numpy", "time to ready, 8 workers / 1, adapter importing numpy, BLAS in setup()", "x", LE, 1.3),
    ("restart_seconds", "SIGKILL of 1 of 2 workers until 2 ready", "s", LE, 0.1),
    ("worker_import_seconds", "python -m trio_bridge.worker --help, minus bare python", "s", LE, 0.1),
    ("host_rss_mib_10k_sessions", "host RSS, 10,000 sessions x 10 variables", "MiB", LE, 200.0),
    ("watch_fanout_1000_p50_ms", "write until all 1,000 watchers saw it, p50", "ms", LE, 10.0),
]

#: the one-call-at-a-time table: (round_trips key, what, the pool's path it is compared with)
ROUND_TRIP_ROWS = [
    ("pool_noop", "pool.execute, sync tool noop (worker's thread pool)", None),
    ("grpclib_stream_noop", "stock grpclib, one bidi stream, noop via run_in_executor  [THE FLOOR]", "pool_noop"),
    ("grpclib_unary_noop", "stock grpclib, a unary RPC per call, noop via run_in_executor", "pool_noop"),
    ("trio_parallel", "trio_parallel run_sync(noop)", "pool_noop"),
    ("process_pool_executor", "ProcessPoolExecutor(1) submit(noop).result()", "pool_noop"),
    ("raw_socket", "raw Unix-socket ping-pong, 2 processes (physical floor)", "pool_noop"),
    ("pool_anoop", "pool.execute, async tool anoop", None),
    ("grpclib_stream_anoop", "stock grpclib, one bidi stream, anoop awaited", "pool_anoop"),
    ("grpclib_unary_anoop", "stock grpclib, a unary RPC per call, anoop awaited", "pool_anoop"),
    ("pool_inline_noop", "pool.execute, inline sync tool inline_noop", None),
    ("grpclib_stream_inline_noop", "stock grpclib, one bidi stream, inline_noop on the loop", "pool_inline_noop"),
    ("grpclib_unary_inline_noop", "stock grpclib, a unary RPC per call, inline_noop on the loop", "pool_inline_noop"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer samples, no detail sections (about 1 minute)")
    parser.add_argument("--json", help="where to write the results (default: benchmarks/results.json; with --only, nowhere)")
    parser.add_argument("--only", choices=list(PARTS), help="run this part alone and print its figures")
    args = parser.parse_args()
    quick = args.quick
    started = time.perf_counter()
    r: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": quick,
    }
    if args.only:
        r["only"] = args.only
        PARTS[args.only](r, quick, _step)
        _finish(r, started, args.json)
        return
    console.print(f"[bold]trio-bridge benchmarks[/]{' (quick)' if quick else ''}: about {1 if quick else 5} minutes")
    for part in PARTS.values():
        part(r, quick, _step)
    seconds = 1.0 if quick else 3.0
    configs = [(64, 1, "noop"), (64, 16, "noop")]
    if not quick:
        configs = [(1, 1, "noop"), (8, 1, "noop"), (8, 16, "anoop"), *configs]
    r["throughput_calls_per_s"] = {
        f"{k} in flight, concurrency {c}, {'async' if tool == 'anoop' else 'sync'} tool":
            _step(f"throughput {k}/{c}/{tool}", pool_throughput, k, seconds, c, tool)
        for k, c, tool in configs
    }
    r["throughput_calls_per_s"]["64 in flight, concurrency 16, async tool"] = r["throughput_64_vs_floors"]["pool_calls_per_s"]
    chunks = 50_000 if quick else 200_000
    r["stream_chunks_per_s_by_generator"] = {
        "sync_generator": _step("stream, sync generator", stream_rate, "count", chunks),
        "async_generator": _step("stream, async generator", stream_rate, "acount", chunks),
    }
    r["restart_s"] = _step("restart", restart, 2 if quick else 4)
    r["worker_import"] = _step("worker import", worker_import, 3 if quick else 7)
    r["session_rss"] = _step("host RSS, sessions", session_rss, 10_000, 10)
    r["watch_fan_out"] = _step("watch fan-out", watch_fan_out, 1000, 30 if quick else 200)
    if not quick:
        from benchmarks.watch_fanout import through_session

        r["watch_fan_out_writer"] = _step("watch fan-out, writer", through_session, 1000, 5000, 100)
        r["stream_memory"] = _step("stream memory", stream_memory, 1_000_000)
        r["state"] = _step("state", state, 2000, 100, 100)
        r["state_backends"] = _step("state backends", state_backends, 2000)
        r["remote_unary"] = _step("remote unary", remote_unary, 1000)
        r["tools"] = _step("tools", tools, 1000)
    r.update({
        "stream_chunks_per_s": max(r["stream_chunks_per_s_by_generator"].values()),
        "restart_seconds": statistics.median(r["restart_s"]),
        "worker_import_seconds": r["worker_import"]["median_difference_s"],
        "worker_import_stack_floor_seconds": r["worker_import"]["stack_median_difference_s"],
        "host_rss_mib_10k_sessions": r["session_rss"]["rss_mib"],
        "watch_fanout_1000_p50_ms": r["watch_fan_out"]["p50_us"] / 1000,
    })
    _finish(r, started, args.json or os.path.join(os.path.dirname(__file__), "results.json"))


#: the parts ``--only`` runs alone; the full run runs them first, in this order
PARTS: dict[str, Callable[[dict[str, Any], bool, Callable[..., Any]], None]] = {
    "unary": unary_part, "arrays": arrays_part, "ready": ready_part,
}


def _step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    t0 = time.perf_counter()
    result = trio.run(fn, *args) if inspect.iscoroutinefunction(fn) else fn(*args)
    console.print(f"  {name}: {time.perf_counter() - t0:.1f} s", style="dim")
    return result


def _finish(r: dict[str, Any], started: float, json_path: str | None) -> None:
    r["targets"] = {
        key: {"comparison": "<=" if cmp is LE else ">=", "target": target, "met": cmp(r[key], target)}
        for key, _, _, cmp, target in TARGETS if key in r
    }
    r["elapsed_s"] = time.perf_counter() - started
    show(r)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=2)
        console.print(f"written to {json_path} ({r['elapsed_s']:.0f} s)")


def show(r: dict[str, Any]) -> None:
    cores = f"{r['machine']['cpus']} cores, Python {r['machine']['python']}{', quick' if r['quick'] else ''}"
    if "round_trips" in r:
        trips, f = r["round_trips"], r["stock_floor"]
        table = Table(title=f"one call at a time, p50 ({cores}; floors on {f['loop']}, as the worker: "
                            f"{f['worker_event_loop']})")
        table.add_column("path", no_wrap=True)
        table.add_column("what")
        for column in ("p50", "p99", "pool / this"):
            table.add_column(column, justify="right", no_wrap=True)
        for key, what, versus in ROUND_TRIP_ROWS:
            v = trips[key]
            ratio = f"{trips[versus]['p50_us'] / v['p50_us']:.2f} x" if versus else ""
            table.add_row(key, what, f"{v['p50_us']:,.0f} µs", f"{v['p99_us']:,.0f} µs", ratio)
        console.print(table)
        t = r["throughput_64_vs_floors"]
        table = Table(title="64 calls in flight (anoop), calls/s, alternating windows")
        table.add_column("side")
        table.add_column("calls/s", justify="right")
        table.add_column("pool / this", justify="right")
        table.add_row("pool: 2 workers, concurrency 16, 64 Trio tasks", f"{t['pool_calls_per_s']:,.0f}", "")
        for kind, what in (("stream", "one bidi stream per server"), ("unary", "a unary RPC per call")):
            rate = t[f"floor_{kind}_calls_per_s"]
            table.add_row(f"stock grpclib: 1 client, 64 tasks, 2 servers, {what}", f"{rate:,.0f}",
                          f"{t['pool_calls_per_s'] / rate:.2f} x")
        console.print(table)
    if "arrays" in r:
        table = Table(title="arrays, float32: worker returns a NEW array a + 1, checked on both sides (median)")
        table.add_column("what")
        table.add_column("per call", justify="right")
        table.add_column("/ in-process", justify="right")
        for label, v in r["arrays"].items():
            ratio = v["median_s"] / v["in_process_median_s"]
            table.add_row(f"pool.execute plus_one, {label}", f"{v['median_s'] * 1e3:,.1f} ms", f"{ratio:.2f} x")
            table.add_row(f"numpy in-process plus_one, {label}", f"{v['in_process_median_s'] * 1e3:,.1f} ms", "")
            if "buffers_median_s" in v:
                table.add_row(f"pool.execute plus_one_into, {label}: pool.empty argument, ctx.empty result",
                              f"{v['buffers_median_s'] * 1e3:,.1f} ms", f"{v['buffers_median_s'] / v['in_process_median_s']:.2f} x")
            if "echo_median_s" in v:
                table.add_row(
                    f"[dim]extra: echo, {label}: the host copies the argument in, the worker returns it "
                    "unread, the result is the host's own segment[/]", f"{v['echo_median_s'] * 1e3:,.1f} ms", "",
                )
        console.print(table)
    if "time_to_ready" in r:
        table = Table(title="time to ready (median)")
        for column in ("adapter", "env", "start method", "1 worker", "8 workers", "8 / 1"):
            table.add_column(column, justify="left" if column in ("adapter", "env", "start method") else "right")
        for v in r["time_to_ready"].values():
            m = v["median_s"]
            env = " ".join(f"{k}={x}" for k, x in (v["env"] or {}).items())
            table.add_row(v["adapter"], env, ", ".join(v["start_method"]), f"{m['1']:.2f} s", f"{m['8']:.2f} s",
                          f"{m['8'] / m['1']:.2f} x")
        console.print(table)
    if r["targets"]:
        targets = Table(title="issue 9 targets")
        for column in ("key", "measure", "value", "target", ""):
            targets.add_column(column, justify="right" if column in ("value", "target") else "left", no_wrap=column != "measure")
        for key, what, unit, cmp, target in TARGETS:
            if key in r:
                targets.add_row(
                    key, what, f"{_number(r[key])} {unit}", f"{'≤' if cmp is LE else '≥'} {_number(target)} {unit}",
                    "[green]met[/]" if r["targets"][key]["met"] else "[red]missed[/]",
                )
        console.print(targets)
    if "session_rss" in r:
        show_detail(r)


def show_detail(r: dict[str, Any]) -> None:
    detail = Table(title="detail")
    detail.add_column("measure")
    detail.add_column("value", justify="right", no_wrap=True)

    def latency(label: str, v: dict[str, float], digits: int = 0) -> None:
        detail.add_row(label, f"p50 {v['p50_us']:.{digits}f} µs   p99 {v['p99_us']:.{digits}f} µs")

    for k, v in r["throughput_calls_per_s"].items():
        detail.add_row(f"throughput, 2 workers, {k}", f"{v:,.0f} calls/s")
    for k, v in r["stream_chunks_per_s_by_generator"].items():
        detail.add_row(f"stream into Trio, {k}", f"{v:,.0f} chunks/s")
    detail.add_row("restart after SIGKILL, each sample", ", ".join(f"{s:.2f}" for s in r["restart_s"]) + " s")
    imp = r["worker_import"]
    detail.add_row(
        "python -m trio_bridge.worker --help / the stack's imports (asyncio, grpclib, uvloop) / bare python",
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
