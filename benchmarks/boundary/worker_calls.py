"""One call at a time: the worker's side of the call stream taken straight from h2's events
(``_wire/direct_stream.py``, the default) against grpclib's stream machinery
(``TRIO_BRIDGE_STOCK_WIRE=worker_calls`` in that worker's environment), in one process,
interleaved rounds, with the CPU each worker spends per call.

    python -m benchmarks.boundary.worker_calls [ROUNDS]

Each pool has one spawned local worker (``benchmarks.adapters:Bench``: a fork server's workers
would share the fork server's choice, made at its import); the host's side is the same for both.
"""

from __future__ import annotations

import statistics
import sys

import psutil
import trio

import trio_bridge
from benchmarks.timing import timed_calls
from trio_bridge._wire import overrides

ADAPTER = "benchmarks.adapters:Bench"
TOOLS = ("anoop", "noop")
PER_ROUND = 300


async def main(rounds: int) -> None:
    lifecycle = trio_bridge.Lifecycle(health_check_interval=0)

    def local(env: dict[str, str]) -> trio_bridge.LocalWorkers:
        return trio_bridge.LocalWorkers(start_method="spawn", env=env)

    async with (
        trio_bridge.open_pool(ADAPTER, size=1, lifecycle=lifecycle, local=local({})) as direct,
        trio_bridge.open_pool(
            ADAPTER, size=1, lifecycle=lifecycle, local=local({overrides.STOCK_WIRE_ENV: "worker_calls"}),
        ) as stock,
    ):
        pools = {"direct": direct, "stock": stock}
        workers = {name: psutil.Process(pool.workers()[0].pid) for name, pool in pools.items()}
        for tool in TOOLS:
            for pool in pools.values():
                await timed_calls(pool, tool, 200)
        samples: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], float] = {}
        for _ in range(rounds):
            for tool in TOOLS:
                for name, pool in pools.items():
                    before = workers[name].cpu_times()
                    samples.setdefault((name, tool), []).extend(await timed_calls(pool, tool, PER_ROUND))
                    after = workers[name].cpu_times()
                    used = (after.user + after.system) - (before.user + before.system)
                    cpu[name, tool] = cpu.get((name, tool), 0.0) + used / (PER_ROUND * rounds)
        print(f"one call at a time, p50 ({rounds} rounds of {PER_ROUND}); the worker's CPU per call")
        for tool in TOOLS:
            fast, slow = (statistics.median(samples[name, tool]) for name in pools)
            print(
                f"  {tool:6} direct {fast * 1e6:5.0f} µs, grpclib's {slow * 1e6:5.0f} µs ({fast / slow:.2f}x); "
                f"CPU {cpu['direct', tool] * 1e6:4.0f} / {cpu['stock', tool] * 1e6:4.0f} µs"
            )


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 8)
