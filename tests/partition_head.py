"""The second head of tests/test_partitions.py's Redis test, run in a host of the bed:
``python -m tests.partition_head REDIS_URL SESSION NAME SECONDS``.

A head with no workers (state calls need none) joins session SESSION on Redis and sets its
variable NAME to 1, 2, 3, ... every 50 ms for SECONDS seconds. It prints one JSON line per write:
``{"value": i, "ok": true, "at": T}`` or ``{"value": i, "ok": false, "error": "StateUnavailableError", "at": T}``
(``T``: ``time.monotonic()`` as it returned, the clock every process of the machine shares),
then ``{"final": {...}}``: every variable of the session as it reads them at the end.
"""

from __future__ import annotations

import json
import sys
import time

import trio

import trio_bridge
from trio_bridge import RedisBackend, RemoteWorkers, TrioBridgeError

TOKEN = "a-token-for-the-partition-tests-0123"


async def main(url: str, session_id: str, name: str, seconds: float) -> None:
    state = RedisBackend(url, timeout=1.0, history_limit=1000)
    head = RemoteWorkers(listen="tcp://127.0.0.1:0", token=TOKEN)  # no workers of its own; none join
    async with trio_bridge.open_pool("tests.adapters:Echo", size=0, remote=head, state=state) as pool:
        async with pool.session(session_id) as session:
            value = 0
            end = trio.current_time() + seconds
            while trio.current_time() < end:  # never cancelled mid-write: each write's outcome is known
                value += 1
                try:
                    await session.set_variable(name, value)
                except TrioBridgeError as exc:
                    print(json.dumps({"value": value, "ok": False, "error": type(exc).__name__, "at": time.monotonic()}), flush=True)
                else:
                    print(json.dumps({"value": value, "ok": True, "at": time.monotonic()}), flush=True)
                await trio.sleep(0.05)
            names = await session.list_variables()
            print(json.dumps({"final": await session.get_variables(names)}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
