"""One call at a time: the host's call stream spoken from Trio (``_host/_call_stream.py``, the
default) against the same stream through the asyncio loop's thread (``_aio.CallStream``, what
``TRIO_BRIDGE_STOCK_WIRE=calls`` selects), in one process, interleaved rounds, beside
``trio_parallel.run_sync``; then the CPU each side spends per call (host threads, worker).

    python -m benchmarks.boundary.call_stream [ROUNDS]

Each pool has one local worker (``benchmarks.adapters:Bench``); p50 in µs and its ratio to
trio_parallel's of the same run. The CPU split runs each path alone for 2,000 calls of ``anoop``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Awaitable, Callable

import trio
import trio_parallel

import trio_bridge
from benchmarks.floor import noop
from benchmarks.timing import cpu_split, timed, timed_calls
from trio_bridge._wire import overrides

ADAPTER = "benchmarks.adapters:Bench"
TOOLS = ("anoop", "noop", "inline_noop")
PER_ROUND = 300


async def _cpu_split(pool: trio_bridge.Pool, n: int) -> dict[str, float]:
    """CPU µs per call of ``anoop``: each host thread's and the worker's."""
    pid = pool.workers()[0].pid
    assert pid is not None
    return await cpu_split(lambda n: timed_calls(pool, "anoop", n), pid, n)


async def main(rounds: int) -> None:
    lifecycle = trio_bridge.Lifecycle(health_check_interval=0)
    overrides.CALLS = True
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=lifecycle) as trio_side:
        overrides.CALLS = False  # this pool's worker is reached through the loop's thread
        async with (
            trio_bridge.open_pool(ADAPTER, size=1, lifecycle=lifecycle) as loop_side,
            trio_parallel.open_worker_context() as context,
        ):
            overrides.CALLS = True
            paths: dict[str, Callable[[int], Awaitable[list[float]]]] = {}
            for tool in TOOLS:
                paths[f"trio   {tool}"] = lambda n, tool=tool: timed_calls(trio_side, tool, n)
                paths[f"loop   {tool}"] = lambda n, tool=tool: timed_calls(loop_side, tool, n)
            paths["trio_parallel"] = lambda n: timed(lambda i: context.run_sync(noop, i), n)
            for measure in paths.values():
                await measure(100)
            samples: dict[str, list[float]] = {}
            for _ in range(rounds):
                for name, measure in paths.items():
                    samples.setdefault(name, []).extend(await measure(PER_ROUND))
            floor = statistics.median(samples["trio_parallel"])
            print(f"one call at a time, p50 ({rounds} rounds of {PER_ROUND}); 'trio': spoken from Trio, 'loop': via the loop's thread")
            for name, s in samples.items():
                p50 = statistics.median(s)
                print(f"  {name:22} {p50 * 1e6:7.0f} µs   / trio_parallel {p50 / floor:5.2f}")
            for label, pool in (("trio", trio_side), ("loop", loop_side)):
                split = await _cpu_split(pool, 2000)
                print(f"  CPU per call, {label}: " + ", ".join(f"{k} {v:.0f} µs" for k, v in split.items()))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5)
