"""A worker's id agrees with its slot: the first worker of slot N is ``wN`` whatever order the
slots started in, ``pool.workers()`` lists them by slot, and a replacement takes a new id."""

from __future__ import annotations

import os
import signal

import pytest
import trio

import trio_bridge
from tests.helpers import wait_for
from trio_bridge.testing import open_fake_pool


def add(a: int, b: int = 2) -> int:
    return a + b


async def test_fake_workers_ids_follow_their_slots_and_a_replacement_gets_a_new_id(autojump_clock):
    async with open_fake_pool({"add": add}, size=8, lifecycle=trio_bridge.Lifecycle(restart_backoff=(0.5, 1.0))) as (pool, workers):
        assert [(w.id, w.slot) for w in pool.workers()] == [(f"w{slot}", slot) for slot in range(8)]
        victim = workers.kill(3)
        await wait_for(lambda: pool.statistics().workers_ready == 8)
        listed = [(w.id, w.slot) for w in pool.workers()]
        assert listed == [*((f"w{slot}", slot) for slot in range(3)), ("w8", 3), *((f"w{slot}", slot) for slot in range(4, 8))]
        assert victim.id == "w3"


@pytest.mark.real_process
async def test_real_workers_ids_follow_their_slots_and_a_replacement_gets_a_new_id():
    async with trio_bridge.open_pool("tests.adapters:Echo", size=3, lifecycle=trio_bridge.Lifecycle(restart_backoff=(0.05, 0.5))) as pool:
        assert [(w.id, w.slot) for w in pool.workers()] == [("w0", 0), ("w1", 1), ("w2", 2)]
        os.kill(pool.workers()[1].pid, signal.SIGKILL)
        await wait_for(lambda: [(w.id, w.slot, w.state) for w in pool.workers()] == [
            ("w0", 0, "ready"), ("w3", 1, "ready"), ("w2", 2, "ready")])
        with trio.fail_after(10):
            assert await pool.execute("add", {"a": 1}) == 3
