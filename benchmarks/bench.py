"""The benchmark harness: trio-bridge against stock parts and peers doing the same work, in one run.

    python -m benchmarks.bench [--quick] [--json PATH] [--only unary|arrays|ready|remote|regression] [--baseline REV]

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
  the host process, on the same arrays: ``a + 1`` allocates a NEW array each time, whose fresh
  pages fault (and the kernel zeroes them) as numpy writes them;
  ``array_100mb_plus_one_over_in_process``: the ratio;
- ``array_100mb_plus_one_in_process_out_ms``: the same sample check and ``numpy.add(a, 1,
  out=reused)`` in the host process, into one array allocated and written (pre-faulted) before
  the timing and reused by every round: what the buffers path's worker does into its reused
  ``ctx.empty`` segment, without the page faults of a new array;
- ``array_100mb_plus_one_buffers_ms``: the same computation with the zero-copy buffers: the
  argument (same contents) in a ``pool.empty`` array, filled before the timing (as the in-process
  argument is made before its timing), and ``plus_one_into``, which writes ``a + 1`` into a
  ``ctx.empty`` array that travels back without a copy; timed from the call until the result
  array is in hand; ``array_100mb_plus_one_buffers_over_in_process``: its ratio to the in-process
  ``a + 1`` figure (issue 24, target 2: a new array in-process against a reused segment in the
  worker), and ``array_100mb_plus_one_buffers_over_in_process_out``: its ratio to the in-process
  ``out=reused`` figure (like for like: both write into memory already faulted in; the rest is
  the call's own cost). ``array_100mb_plus_one_ms`` stays the plain ``return a + 1`` of an
  ordinary array (one copy each way);
- ``array_100mb_echo_ms`` (extra row, not a transfer figure): ``echo`` of the same array: the
  host copies the argument into its shared-memory segment, the worker returns it unread, and the
  result is that same segment of the host's handed back (the worker reads, computes and copies
  no array byte; only shape and dtype, and then the host's own bytes, can be checked);
- ``array_inband_50mib_plus_one_ms`` / ``array_inband_50mib_plus_one_in_process_ms``: the same
  for 50 MiB in the gRPC stream (``shared_memory_threshold=None``);
  ``array_inband_mib_per_s``: 50 MiB over that median round trip (an issue 9 target).

**Remote workers, in-band** (full run and ``--only remote``; not ``--quick``): a 100 MB float32
array to a ``trio-bridge worker`` on 127.0.0.2 and back (``echo``; ``plus_one`` beside it), the
host listening on 127.0.0.1, over plain TCP and over TCP with mutual TLS; contents checked
outside the timing. ``remote_inband_100mb_tcp_gb_per_s`` / ``remote_inband_100mb_tls_gb_per_s``:
1e8 bytes over the median ``echo`` round trip (an issue 24 target: >= 1 and >= 0.5);
``..._plus_one_gb_per_s`` the same for ``plus_one``; ``..._echo_ms``; ``..._floor_gb_per_s``: a raw
socket echo of the same bytes between two processes (blocking sockets, Python's ``ssl`` for TLS,
``benchmarks/bulk_floor.py``), run in the same rounds, and ``..._over_floor``: the median of each
round's echo over its floor (above 1: the pool is slower).

**Start-up** (median seconds from ``open_pool`` until its block runs; sizes and adapters take
turns). ``ready_1_s`` / ``ready_8_s`` / ``ready_8_over_1`` (an issue 9 target): the trivial
adapter ``benchmarks.adapters:Bench`` (its module imports nothing beyond trio_bridge; empty
``setup()``). ``ready_numpy_1_s`` / ``ready_numpy_8_s`` / ``ready_8_over_1_numpy``:
``benchmarks.adapters_numpy:BenchNumpy``, whose module imports numpy and whose ``setup()`` runs a
256x256 matmul (BLAS), pool defaults (each worker's BLAS gets ``max(1, CPUs // size)`` threads,
``LocalWorkers.library_threads``: on 2 CPUs, 2 for one worker, 1 each for eight; the fork server
holds OpenBLAS at one thread while it imports, and each forked worker then sets it to what a
spawned one starts with; the pool spawns these workers if
its fork server is unsafe all the same: ``time_to_ready.<adapter>.start_method``:
``pool.start_method``). ``ready_8_over_1_numpy_openblas_1``: the numpy adapter with
``env={"OPENBLAS_NUM_THREADS": "1"}`` (one BLAS thread for one worker too). ``ready_digits_1_s`` / ``ready_digits_8_s`` /
``ready_8_over_1_digits``: ``trio_bridge.examples.digits:Digits``, the adapter ``trio-bridge run``
starts (numpy and scikit-learn; ``setup()`` loads the data set), pool defaults. The same part
measures the worker's import: ``worker_import_seconds`` (a fresh ``python -m trio_bridge.worker
--help``: what a spawned worker imports before its adapter, minus ``python -c pass``, median) and
``worker_import_stack_floor_seconds`` (the same for ``import asyncio, grpclib.server,
grpclib.client, uvloop``). The processes this part starts keep their compiled bytecode in a
temporary cache of their own (``bytecode_cache``), as an installed package has it, and each
adapter starts one untimed pool first.

**Other** (issue 9 targets): ``stream_chunks_per_s`` (chunks/s into a Trio consumer, the better
of a sync and an async generator); ``restart_seconds`` (SIGKILL of one worker of a ready pool of
2 until 2 are ready again, median); ``host_rss_mib_10k_sessions`` (RSS of a fresh host process with
10,000 sessions of 10 variables, ``benchmarks/session_rss.py``); ``watch_fanout_1000_p50_ms``
(one ``set_variable`` until all of 1,000 watchers have seen it).

**No regression** (``benchmarks/regression.py``): stream chunks/s, 64-in-flight calls/s, the
10,000-session host RSS and the 1,000-watcher fan-out of this tree and of the baseline commit
(``--baseline``, default the commit before issue 24), each measured in fresh processes in
alternating rounds of the same run: ``<figure>_over_baseline`` is this tree's median over the
baseline's (``regression`` holds the samples; without git it says it was skipped).

``--only unary|arrays|ready|remote|regression`` runs that part alone (the same code and keys) and
prints its figures; it writes JSON only to a ``--json`` given. ``performance_targets`` holds each
issue 24 target (every one a ratio to its floor or peer in the same run, but the remote transfer
rates and the spawned import, which are absolute) with its value, target and whether it was met;
``targets`` holds each issue 9 target's value and whether it was met; the samples behind the figures stay in nested sections
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
import contextlib
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
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import psutil
import trio
from rich.console import Console
from rich.table import Table

import trio_bridge
from benchmarks.adapters import plus_one, sample_sum
from benchmarks.bulk_floor import BulkEcho
from benchmarks.floor import StockFloor, noop
from benchmarks.regression import (
    BASELINE_REV,
    percentiles,
    pool_throughput,
    pool_window,
    session_rss,
    stream_rate,
    watch_fan_out,
)
from benchmarks.timing import timed, timed_calls

ADAPTER = "benchmarks.adapters:Bench"
NUMPY_ADAPTER = "benchmarks.adapters_numpy:BenchNumpy"
DIGITS_ADAPTER = "trio_bridge.examples.digits:Digits"  # what `trio-bridge run` starts
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
console = Console(width=140)

# The baseline of the throughput target: calls/s with 64 in flight (async tool, concurrency 16,
# 2 workers), as benchmarks/results.json recorded it at commit 7070995.
THROUGHPUT_64_MEASURED_AT_7070995 = 1280.0


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
                return await timed_calls(pool, tool, n)

            async def trio_parallel_calls(n: int) -> list[float]:
                return await timed(partial(context.run_sync, noop), n)

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
        "unary_pool_async_over_trio_parallel": p50["pool_anoop"] / p50["trio_parallel"],
        "unary_pool_async_over_raw_socket": p50["pool_anoop"] / p50["raw_socket"],
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
        await pool_window(pool, in_flight, 0.3, tool)
        for kind in ("stream", "unary"):
            await trio.to_thread.run_sync(floor.throughput, kind, tool, in_flight, 0.3)
        windows: dict[str, list[tuple[int, float]]] = {"pool": [], "floor_stream": [], "floor_unary": []}
        for _ in range(rounds):
            windows["pool"].append(await pool_window(pool, in_flight, seconds, tool))
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


async def remote_inband(n_bytes: int, repeats: int, warm_ups: int) -> dict[str, Any]:
    """Seconds per in-band round trip of an ``n_bytes`` float32 array to a remote worker
    (``trio-bridge worker`` on 127.0.0.2, the host listening on 127.0.0.1), over plain TCP and
    over TCP with mutual TLS: ``pool.execute("echo", {"value": a})``, median of ``repeats``
    after ``warm_ups``.

    ``echo`` is the headline because it measures the transport alone: the array crosses the
    wire both ways (host → worker, worker → host: 2 x ``n_bytes``), the worker decodes and
    encodes it but computes nothing. ``plus_one`` (its worker also checks a sample and
    computes ``a + 1``, a new array) is timed on the same connection for comparison: the
    difference is the worker's numpy work. Each call's array is new (a pattern plus the call's
    number); outside the timing, the host checks that the echo equals what it sent and that
    plus_one's result equals ``a + 1``. Remote pools move arrays in-band (no shared memory).
    ``*_gb_per_s`` is ``n_bytes`` / 1e9 over the median round trip (one direction's bytes per
    round trip, as the issue states it). The floor, in the same rounds (each round: echo,
    plus_one, the floor's round trip, so that the machine's drift falls on all alike): the same
    ``n_bytes`` sent to an echo process on 127.0.0.2 that receives them all and sends them back,
    blocking sockets (the host's Trio thread blocks meanwhile: nothing else runs), over plain TCP
    and over Python's ``ssl`` with the same certificates (``benchmarks/bulk_floor.py``);
    ``echo_over_floor_median``: the median of each round's echo over its floor.
    """
    import pathlib
    import secrets

    import numpy as np

    from trio_bridge.testing import Certificates, RemoteWorkerProcess, free_port, write_token_file

    pattern = (np.arange(n_bytes // 4, dtype=np.int64) % 1021).astype(np.float32)
    out: dict[str, Any] = {"bytes": n_bytes}
    with tempfile.TemporaryDirectory() as directory:
        d = pathlib.Path(directory)
        certs = Certificates.create(d)
        token = secrets.token_hex(16)
        write_token_file(d / "token", token)
        worker_tls, host_tls = certs.tls("worker"), certs.tls("host")
        for kind in ("tcp", "tls"):
            tls = kind == "tls"
            worker = RemoteWorkerProcess(
                ADAPTER, f"tcp://127.0.0.2:{free_port('127.0.0.2')}", d / "token", certificates=certs if tls else None,
            ).start()
            remote = trio_bridge.RemoteWorkers(
                addresses=[worker.address], token=token, listen="tcp://127.0.0.1:0", tls=host_tls if tls else None,
            )
            floor = BulkEcho(
                "127.0.0.2", n_bytes, server_tls=(worker_tls.cert, worker_tls.key, certs.ca) if tls else None,
                client_tls=(host_tls.cert, host_tls.key, certs.ca) if tls else None,
            )
            echo_s: list[float] = []
            plus_one_s: list[float] = []
            floor_s: list[float] = []
            try:
                with floor:
                    async with trio_bridge.open_pool(
                        ADAPTER, size=0, remote=remote, lifecycle=trio_bridge.Lifecycle(health_check_interval=0),
                    ) as pool:
                        for i in range(warm_ups + repeats):  # each round: the pool's calls, then the floor's
                            a = pattern + np.float32(i)
                            t0 = time.perf_counter()
                            result = await pool.execute("echo", {"value": a})
                            elapsed = time.perf_counter() - t0
                            if result.shape != a.shape or result.dtype != a.dtype or not np.array_equal(result, a):
                                raise RuntimeError(f"echo over {kind} returned other contents than it was sent")
                            del result
                            expected = sample_sum(a)
                            t0 = time.perf_counter()
                            result = await pool.execute("plus_one", {"a": a, "sample_sum": expected})
                            plus_elapsed = time.perf_counter() - t0
                            if result.shape != a.shape or not np.array_equal(result, a + np.float32(1)):
                                raise RuntimeError(f"plus_one over {kind} returned other contents than a + 1")
                            del result
                            floor_elapsed = floor.round_trip()
                            if i >= warm_ups:
                                echo_s.append(elapsed)
                                plus_one_s.append(plus_elapsed)
                                floor_s.append(floor_elapsed)
            finally:
                worker.kill()
            out[kind] = {
                "echo_s": echo_s, "plus_one_s": plus_one_s, "floor_s": floor_s,
                "echo_median_s": statistics.median(echo_s), "plus_one_median_s": statistics.median(plus_one_s),
                "floor_median_s": statistics.median(floor_s),
                "echo_over_floor_median": statistics.median(e / f for e, f in zip(echo_s, floor_s, strict=True)),
            }
    return out


def remote_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    inband = step("remote worker, in-band 100 MB: echo and plus_one over TCP and TLS",
                  remote_inband, 100_000_000, 3 if quick else 5, 1)
    r["remote_inband"] = inband
    for kind in ("tcp", "tls"):
        v = inband[kind]
        r[f"remote_inband_100mb_{kind}_gb_per_s"] = inband["bytes"] / 1e9 / v["echo_median_s"]
        r[f"remote_inband_100mb_{kind}_plus_one_gb_per_s"] = inband["bytes"] / 1e9 / v["plus_one_median_s"]
        r[f"remote_inband_100mb_{kind}_echo_ms"] = v["echo_median_s"] * 1e3
        r[f"remote_inband_100mb_{kind}_floor_gb_per_s"] = inband["bytes"] / 1e9 / v["floor_median_s"]
        r[f"remote_inband_100mb_{kind}_over_floor"] = v["echo_over_floor_median"]


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
    in-process ``plus_one`` of the same array; with ``echo``, per ``echo`` of it too, per
    ``plus_one_into`` of the same contents in a ``pool.empty`` buffer, and per in-process
    ``plus_one`` into a reused, pre-faulted array, ``out=``).

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
    local_out_s: list[float] = []
    reused = np.zeros_like(pattern) if echo else None  # written now: its pages are faulted in before any timing
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
                t0 = time.perf_counter()
                plus_one(a, expected, out=reused)
                local_out_s.append(time.perf_counter() - t0)
                if not np.array_equal(reused, local):
                    raise RuntimeError("plus_one into a reused array differs from a + 1")
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
                "buffers_s": buffers_s, "buffers_median_s": statistics.median(buffers_s),
                "in_process_out_s": local_out_s, "in_process_out_median_s": statistics.median(local_out_s)}
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
        "array_100mb_plus_one_in_process_out_ms": shared["in_process_out_median_s"] * 1e3,
        "array_100mb_plus_one_buffers_over_in_process_out": shared["buffers_median_s"] / shared["in_process_out_median_s"],
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
    "digits": (DIGITS_ADAPTER, None),
}


async def time_to_ready(sizes: tuple[int, ...], repeats: int) -> dict[str, dict[str, Any]]:
    """Seconds from ``open_pool`` until its block runs, for each of ``READY_ADAPTERS`` and
    ``sizes``, all taking turns in each repeat (drift), after one untimed pool of each adapter
    (its files read, its bytecode written); and ``pool.start_method`` as it was."""
    out: dict[str, dict[str, Any]] = {
        label: {"adapter": adapter, "env": env, "start_method": [], "seconds": {str(s): [] for s in sizes}}
        for label, (adapter, env) in READY_ADAPTERS.items()
    }
    quiet = logging.getLogger("trio_bridge")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "workers start by spawn" (INFO), should a fork server refuse
    try:
        for adapter, env in READY_ADAPTERS.values():
            async with trio_bridge.open_pool(adapter, size=1, local=trio_bridge.LocalWorkers(env=env)):
                pass
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


@contextlib.contextmanager
def bytecode_cache() -> Iterator[None]:
    """For the block, the processes this one starts read and write compiled bytecode in a cache of
    their own (``PYTHONPYCACHEPREFIX``, a temporary folder removed afterwards), as an installed
    package has it: this tree may have none (``PYTHONDONTWRITEBYTECODE``, or stale files), and a
    process that compiles trio_bridge's modules first measures the compiler, not the start-up."""
    names = ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-bytecode-") as cache:
        os.environ["PYTHONPYCACHEPREFIX"] = cache
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def ready_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    with bytecode_cache():
        _ready_figures(r, quick, step)


def _ready_figures(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    ready = r["time_to_ready"] = step(
        f"time to ready, 1 and 8 workers, {len(READY_ADAPTERS)} adapters", time_to_ready, (1, 8), 2 if quick else 4
    )
    r.update({
        "ready_1_s": ready["trivial"]["median_s"]["1"],
        "ready_8_s": ready["trivial"]["median_s"]["8"],
        "ready_8_over_1": ready["trivial"]["median_s"]["8"] / ready["trivial"]["median_s"]["1"],
        "ready_numpy_1_s": ready["numpy"]["median_s"]["1"],
        "ready_numpy_8_s": ready["numpy"]["median_s"]["8"],
        "ready_8_over_1_numpy": ready["numpy"]["median_s"]["8"] / ready["numpy"]["median_s"]["1"],
        "ready_8_over_1_numpy_openblas_1":
            ready["numpy_openblas_1"]["median_s"]["8"] / ready["numpy_openblas_1"]["median_s"]["1"],
        "ready_digits_1_s": ready["digits"]["median_s"]["1"],
        "ready_digits_8_s": ready["digits"]["median_s"]["8"],
        "ready_8_over_1_digits": ready["digits"]["median_s"]["8"] / ready["digits"]["median_s"]["1"],
    })
    imports = r["worker_import"] = step("worker import", worker_import, 3 if quick else 7)
    r["worker_import_seconds"] = imports["median_difference_s"]
    r["worker_import_stack_floor_seconds"] = imports["stack_median_difference_s"]
    console.print(
        f"worker import (python -m trio_bridge.worker --help, minus bare python): {r['worker_import_seconds']:.3f} s; "
        f"the stack alone ({STACK_IMPORTS}): {r['worker_import_stack_floor_seconds']:.3f} s"
    )


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
    for warm_up in (worker, ("-c", STACK_IMPORTS), ("-c", "pass")):  # reads the files, writes their bytecode
        wall(*warm_up)
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

# ---- issue 24: each target a ratio to its floor or peer measured in the same run (or, for the
# remote transfer rates, a rate); (key, what, unit, comparison, target) ----
PERFORMANCE_TARGETS: list[tuple[str, str, str, Callable[[float, float], bool], float]] = [
    ("unary_pool_over_trio_parallel", "one call p50, sync tool / trio_parallel.run_sync", "x", LE, 1.0),
    ("unary_pool_async_over_trio_parallel", "one call p50, async tool / trio_parallel.run_sync", "x", LE, 1.0),
    ("unary_pool_over_grpclib_stream", "one call p50, sync tool / stock grpclib, one bidi stream", "x", LE, 0.8),
    ("unary_pool_over_grpclib_stream_async", "one call p50, async tool / stock grpclib, one bidi stream", "x", LE, 0.8),
    ("array_100mb_plus_one_buffers_over_in_process",
     "100 MB float32 round trip, a + 1 in pool.empty / ctx.empty buffers / numpy in-process", "x", LE, 1.3),
    ("ready_8_over_1_numpy", "time to ready, 8 workers / 1, numpy adapter with BLAS in setup(), pool defaults", "x", LE, 1.5),
    ("ready_8_over_1_digits", "time to ready, 8 workers / 1, the main job's adapter (digits), pool defaults", "x", LE, 1.5),
    ("worker_import_seconds", "spawned worker's import (python -m trio_bridge.worker --help, minus bare python)", "s", LE, 0.1),
    ("remote_inband_100mb_tcp_gb_per_s", "100 MB in-band to a remote worker, plain TCP (1e8 B / round trip)", "GB/s", GE, 1.0),
    ("remote_inband_100mb_tls_gb_per_s", "100 MB in-band to a remote worker, mutual TLS (1e8 B / round trip)", "GB/s", GE, 0.5),
    ("stream_chunks_per_s_over_baseline", "no regression: stream chunks/s / the baseline commit's", "x", GE, 0.9),
    ("throughput_64_in_flight_calls_per_s_over_baseline", "no regression: 64-in-flight calls/s / the baseline's", "x", GE, 0.9),
    ("host_rss_mib_10k_sessions_over_baseline", "no regression: host RSS, 10,000 sessions / the baseline's", "x", LE, 1.1),
    ("watch_fanout_1000_p50_ms_over_baseline", "no regression: 1,000-watcher fan-out p50 / the baseline's", "x", LE, 1.1),
]
#: reported beside the targets, without a target of their own
PERFORMANCE_REPORTED = [
    ("unary_pool_over_raw_socket", "one call p50, sync tool / raw Unix-socket ping-pong", "x"),
    ("unary_pool_async_over_raw_socket", "one call p50, async tool / raw Unix-socket ping-pong", "x"),
    ("array_100mb_plus_one_buffers_over_in_process_out",
     "the same buffers round trip / numpy.add(a, 1, out=) into a reused, pre-faulted array in-process", "x"),
    ("array_100mb_plus_one_over_in_process", "100 MB float32 round trip, ordinary arrays, return a + 1 / numpy in-process", "x"),
    ("remote_inband_100mb_tcp_over_floor", "100 MB in-band echo, plain TCP / raw-socket echo of the same bytes", "x"),
    ("remote_inband_100mb_tls_over_floor", "100 MB in-band echo, TLS / blocking ssl-socket echo of the same bytes", "x"),
    ("worker_import_stack_floor_seconds", "the stack's own import (asyncio, grpclib, uvloop), minus bare python", "s"),
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
    parser.add_argument("--baseline", default=BASELINE_REV, help=f"the commit the no-regression figures are compared with (default {BASELINE_REV})")
    args = parser.parse_args()
    quick = args.quick
    started = time.perf_counter()
    r: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": quick, "baseline": args.baseline,
    }
    if args.only:
        r["only"] = args.only
        PARTS[args.only](r, quick, _step)
        _finish(r, started, args.json)
        return
    console.print(f"[bold]trio-bridge benchmarks[/]{' (quick)' if quick else ''}: about {1 if quick else 5} minutes")
    for name, part in PARTS.items():
        if not (quick and name in NOT_QUICK):
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
        "host_rss_mib_10k_sessions": r["session_rss"]["rss_mib"],
        "watch_fanout_1000_p50_ms": r["watch_fan_out"]["p50_us"] / 1000,
    })
    _finish(r, started, args.json or os.path.join(os.path.dirname(__file__), "results.json"))


def regression_part(r: dict[str, Any], quick: bool, step: Callable[..., Any]) -> None:
    """This tree against the baseline commit (``--baseline``), alternating rounds, into ``r``."""
    from benchmarks.regression import FIGURES, compare

    r["regression"] = step(f"no regression: this tree and {r['baseline']}, alternating", compare, r["baseline"], 1 if quick else 3)
    r.update({f"{f}_over_baseline": r["regression"][f"{f}_over_baseline"] for f in FIGURES if "skipped" not in r["regression"]})


#: the parts ``--only`` runs alone; the full run runs them first, in this order
PARTS: dict[str, Callable[[dict[str, Any], bool, Callable[..., Any]], None]] = {
    "unary": unary_part, "arrays": arrays_part, "ready": ready_part, "remote": remote_part, "regression": regression_part,
}
#: parts the full run runs and ``--quick`` skips (``--only`` runs them either way)
NOT_QUICK = ("remote",)


def _step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    t0 = time.perf_counter()
    result = trio.run(fn, *args) if inspect.iscoroutinefunction(fn) else fn(*args)
    console.print(f"  {name}: {time.perf_counter() - t0:.1f} s", style="dim")
    return result


def _finish(r: dict[str, Any], started: float, json_path: str | None) -> None:
    r["targets"] = _targets(r, TARGETS)
    r["performance_targets"] = _targets(r, PERFORMANCE_TARGETS)
    r["elapsed_s"] = time.perf_counter() - started
    show(r)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=2)
        console.print(f"written to {json_path} ({r['elapsed_s']:.0f} s)")


def _targets(r: dict[str, Any], targets: list[tuple[str, str, str, Callable[[float, float], bool], float]]) -> dict[str, Any]:
    return {
        key: {"value": r[key], "comparison": "<=" if cmp is LE else ">=", "target": target, "met": cmp(r[key], target)}
        for key, _, _, cmp, target in targets if key in r
    }


def _targets_table(r: dict[str, Any], title: str, key: str, targets: list[tuple[str, str, str, Callable[[float, float], bool], float]],
                   reported: list[tuple[str, str, str]] = []) -> None:  # noqa: B006 (never mutated)
    table = Table(title=title)
    for column in ("key", "measure", "value", "target", ""):
        table.add_column(column, justify="right" if column in ("value", "target") else "left", no_wrap=column != "measure")
    for name, what, unit, cmp, target in targets:
        if name in r:
            table.add_row(
                name, what, f"{_number(r[name])} {unit}", f"{'≤' if cmp is LE else '≥'} {_number(target)} {unit}",
                "[green]met[/]" if r[key][name]["met"] else "[red]missed[/]",
            )
    for name, what, unit in reported:
        if name in r:
            table.add_row(name, what, f"{_number(r[name])} {unit}", "", "[dim]reported[/]")
    console.print(table)


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
                table.add_row(f"numpy in-process plus_one into a reused, pre-faulted array (out=), {label}",
                              f"{v['in_process_out_median_s'] * 1e3:,.1f} ms",
                              f"plus_one_into / this: {v['buffers_median_s'] / v['in_process_out_median_s']:.2f} x")
            if "echo_median_s" in v:
                table.add_row(
                    f"[dim]extra: echo, {label}: the host copies the argument in, the worker returns it "
                    "unread, the result is the host's own segment[/]", f"{v['echo_median_s'] * 1e3:,.1f} ms", "",
                )
        console.print(table)
    if "remote_inband" in r:
        v = r["remote_inband"]
        table = Table(title=f"remote worker on 127.0.0.2, {v['bytes'] / 1e6:.0f} MB float32 in-band, round trip (median)")
        for column in ("transport", "echo", "echo GB/s", "plus_one", "plus_one GB/s", "raw socket floor", "floor GB/s", "echo / floor"):
            table.add_column(column, justify="left" if column == "transport" else "right")
        for kind, label in (("tcp", "plain TCP"), ("tls", "TCP + mutual TLS")):
            e, p, f = v[kind]["echo_median_s"], v[kind]["plus_one_median_s"], v[kind]["floor_median_s"]
            table.add_row(label, f"{e * 1e3:,.1f} ms", f"{v['bytes'] / 1e9 / e:.2f}", f"{p * 1e3:,.1f} ms", f"{v['bytes'] / 1e9 / p:.2f}",
                          f"{f * 1e3:,.1f} ms", f"{v['bytes'] / 1e9 / f:.2f}", f"{v[kind]['echo_over_floor_median']:.2f} x")
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
        _targets_table(r, "issue 9 targets", "targets", TARGETS)
    if r["performance_targets"]:
        _targets_table(r, "performance targets (issue 24): ratios from this run", "performance_targets",
                       PERFORMANCE_TARGETS, PERFORMANCE_REPORTED)
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
