"""A host process of tests/test_idempotency.py's Redis race:
``python -m tests.idempotency_host REDIS_URL PREFIX PATH CALLS KEYS``.

It opens a pool of ``tests.idempotency_adapters:Once`` on Redis (keys under PREFIX), says it is
ready (creates ``PATH.ready-PID``), waits for the go (``PATH.go`` exists: both hosts start
together), and makes CALLS calls at once, call ``i`` with idempotency key ``key-{i % KEYS}`` and the same arguments
for one key; then prints one JSON line: ``{"results": {key: token}, "errors": [...], "statistics": {...}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import trio

import trio_bridge
from trio_bridge import RedisBackend


async def main(url: str, prefix: str, path: str, calls: int, keys: int) -> None:
    results: dict[str, set[str]] = {}
    errors: list[str] = []
    async with trio_bridge.open_pool("tests.idempotency_adapters:Once", size=2, state=RedisBackend(url, prefix=prefix)) as pool:

        async def one(i: int) -> None:
            key = f"key-{i % keys}"
            try:
                result = await pool.execute("run", {"path": path, "value": key, "seconds": 0.2}, idempotency_key=key)
            except trio_bridge.TrioBridgeError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                results.setdefault(key, set()).add(result["token"])

        open(f"{path}.ready-{os.getpid()}", "w").close()
        while not os.path.exists(f"{path}.go"):
            await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            for i in range(calls):
                nursery.start_soon(one, i)
        statistics = dataclasses.asdict(pool.statistics())
    tokens = {key: sorted(found) for key, found in results.items()}
    print(json.dumps({"results": tokens, "errors": errors, "statistics": statistics}), flush=True)


if __name__ == "__main__":
    url, prefix, path, calls, keys = sys.argv[1:6]
    trio.run(main, url, prefix, path, int(calls), int(keys))
