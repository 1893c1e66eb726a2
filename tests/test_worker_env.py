"""Per-worker resources: ``worker_env(slot)`` and ``gpus_per_worker``. Each slot's workers, its
replacements too, get the slot's environment; bad options are refused before anything starts."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import wait_for
from trio_bridge import InvalidArgumentError, LocalWorkers, open_pool
from trio_bridge._host._gpus import slot_environments


@pytest.mark.real_process
async def test_each_slot_gets_its_gpus_and_keeps_them_across_a_restart():
    async with open_pool(
        "tests.adapters:Echo", size=3, local=LocalWorkers(gpus_per_worker=2, gpus=["0", "1", "GPU-a", "3"], slot_env=lambda slot: {"REPLICA": f"r{slot}"}),
    ) as pool:
        seen = {
            w.slot: (await _ask(pool, w.pid, "CUDA_VISIBLE_DEVICES"), await _ask(pool, w.pid, "REPLICA"))
            for w in pool.workers()
        }
        assert seen == {0: ("0,1", "r0"), 1: ("GPU-a,3", "r1"), 2: ("0,1", "r2")}  # 3 slots share 4 GPUs
        victim = next(w for w in pool.workers() if w.slot == 1)
        os.kill(victim.pid, signal.SIGKILL)
        await wait_for(lambda: any(w.slot == 1 and w.pid != victim.pid and w.state == "ready" for w in pool.workers()))
        replacement = next(w for w in pool.workers() if w.slot == 1)
        assert await _ask(pool, replacement.pid, "CUDA_VISIBLE_DEVICES") == "GPU-a,3"


async def _ask(pool, pid: int, name: str) -> str | None:
    """``os.environ[name]`` in the worker whose pid is ``pid`` (calls until that worker answers)."""
    for _ in range(200):
        async with pool.session() as session:
            if await session.execute("pid") == pid:
                return await session.execute("environment", {"name": name})
    raise AssertionError(f"worker {pid} never took a call")


def test_gpus_are_shared_round_robin_and_worker_env_comes_after():
    envs = slot_environments(
        4, worker_env=lambda slot: {"CUDA_VISIBLE_DEVICES": "9"} if slot == 3 else {}, gpus_per_worker=1, gpus=[0, 1],
    )
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "9"]


@pytest.mark.real_process
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpus_per_worker": 0, "gpus": ["0"]}, "gpus_per_worker must be"),
        ({"gpus_per_worker": 2, "gpus": ["0"]}, r"only 1 \(0\) GPUs"),
        ({"gpus_per_worker": 1, "gpus": []}, "none GPUs are visible"),
        ({"gpus": ["0"]}, "without LocalWorkers.gpus_per_worker"),
        ({"slot_env": {"A": "1"}}, "callable"),
        ({"slot_env": lambda slot: {"A": 1}}, r"slot_env\(0\) must return a mapping of str to str"),
        ({"slot_env": lambda slot: 1 / 0}, r"slot_env\(0\) raised ZeroDivisionError"),
    ],
)
async def test_bad_per_worker_options_are_refused_before_anything_starts(options, message):
    with pytest.raises(InvalidArgumentError, match=message):
        async with open_pool("tests.adapters:Echo", size=1, local=LocalWorkers(**options)):
            pytest.fail("the pool opened")
