"""Watch fan-out: what a writer pays for the session's watchers.

    python -m benchmarks.watch_fanout [--watchers 1000] [--writes 20000] [--burst 100] [--json PATH]

One variable, ``--watchers`` watchers (each a task iterating its watch), and one writer doing
``--writes`` ``set_variable`` calls: first on a :class:`MemoryBackend` directly, then through the
host :class:`Session` API of a real pool. The writer yields to the scheduler after every
``--burst`` writes (as a writer doing some I/O now and then would), so the watchers read while it
writes. Reported:

- ``writes_per_s``: writes divided by the time spent inside ``set_variable`` (the write path:
  what a writer pays, which must not grow with the number of watchers);
- ``p50_us`` / ``p99_us``: one write's latency;
- ``wall_writes_per_s``: writes divided by the writer's wall time including its yields, while the
  watchers read (all on one thread, so this counts the watchers' work too);
- ``drain_s``: from the last write until every watcher has seen it;
- ``delivered`` / ``coalesced``: updates the watchers received, and how many they were told they
  skipped (``delivered + coalesced == watchers * writes`` when nothing is lost).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

import trio_bridge
from trio_bridge import Lifecycle, MemoryBackend

ADAPTER = "benchmarks.adapters:Bench"


async def fan_out(
    watch: Callable[[], AbstractAsyncContextManager[Any]],
    write: Callable[[float], Awaitable[Any]],
    *,
    watchers: int,
    writes: int,
    burst: int,
) -> dict[str, Any]:
    delivered = [0]
    coalesced = [0]
    last_version = [0] * watchers
    caught_up = trio.Event()
    behind = [watchers]

    async def watcher(index: int, task_status: trio.TaskStatus[None]) -> None:
        async with watch() as updates:
            task_status.started()
            async for update in updates:
                delivered[0] += 1
                coalesced[0] += update.coalesced
                last_version[index] = update.version
                if update.version == writes:
                    behind[0] -= 1
                    if not behind[0]:
                        caught_up.set()

    latencies = []
    async with trio.open_nursery() as nursery:
        for index in range(watchers):
            await nursery.start(watcher, index)
        start = time.perf_counter()
        for i in range(1, writes + 1):
            t0 = time.perf_counter()
            await write(float(i))
            latencies.append(time.perf_counter() - t0)
            if i % burst == 0:
                await trio.lowlevel.checkpoint()
        written = time.perf_counter()
        with trio.fail_after(600):
            await caught_up.wait()
        drained = time.perf_counter()
        nursery.cancel_scope.cancel()
    assert all(v == writes for v in last_version)
    ordered = sorted(latencies)
    return {
        "watchers": watchers,
        "writes": writes,
        "burst": burst,
        "writes_per_s": round(writes / sum(latencies)),
        "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
        "p99_us": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
        "wall_writes_per_s": round(writes / (written - start)),
        "drain_s": round(drained - written, 3),
        "delivered": delivered[0],
        "coalesced": coalesced[0],
    }


async def through_backend(watchers: int, writes: int, burst: int) -> dict[str, Any]:
    backend = MemoryBackend()
    await backend.create_session("s", ttl=None, metadata=None)
    await backend.register_variable("s", "temperature", "float", 0.0, constraints=None, metadata=None, source="host")
    return await fan_out(
        lambda: backend.watch("s", ["temperature"], include_initial=False),
        lambda value: backend.set_variable(
            "s", "temperature", value, expected_version=None, source="host", optimizer_id=None, metadata=None
        ),
        watchers=watchers, writes=writes, burst=burst,
    )


async def through_session(watchers: int, writes: int, burst: int) -> dict[str, Any]:
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=Lifecycle(health_check_interval=0)) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.0)
        return await fan_out(
            lambda: session.watch_variables(["temperature"], include_initial=False),
            lambda value: session.set_variable("temperature", value),
            watchers=watchers, writes=writes, burst=burst,
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, case in (("memory_backend", through_backend), ("host_session", through_session)):
        results[name] = await case(args.watchers, args.writes, args.burst)
        print(name, json.dumps(results[name]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=100, help="writes between the writer's yields")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = trio.run(run, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
