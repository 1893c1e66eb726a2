"""Host memory for many open sessions: run in a fresh process so earlier work does not count.

    python -m benchmarks.session_rss [--sessions 10000] [--variables 10]

Opens a pool of one worker, then ``--sessions`` sessions (all kept open), each with
``--variables`` float variables registered and then set once, and prints one JSON line: the
process's RSS in MiB before and after, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AsyncExitStack
from typing import Any

import psutil
import trio

import trio_bridge

ADAPTER = "benchmarks.adapters:Bench"


async def measure(sessions: int, variables: int) -> dict[str, Any]:
    process = psutil.Process()
    names = [f"v{i}" for i in range(variables)]
    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=trio_bridge.Lifecycle(health_check_interval=0)) as pool, AsyncExitStack() as stack:
        rss_before = process.memory_info().rss
        t0 = time.perf_counter()
        for _ in range(sessions):
            session = await stack.enter_async_context(pool.session())
            for i, name in enumerate(names):
                await session.register_variable(name, "float", float(i))
            # set once more, as a user would: each variable then has a version 1 and a history entry
            await session.set_variables({name: i + 0.5 for i, name in enumerate(names)})
        seconds = time.perf_counter() - t0
        rss_after = process.memory_info().rss
    return {
        "sessions": sessions,
        "variables_per_session": variables,
        "rss_before_mib": rss_before / 2**20,
        "rss_mib": rss_after / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--variables", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(trio.run(measure, args.sessions, args.variables)))


if __name__ == "__main__":
    main()
