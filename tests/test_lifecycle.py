"""Nothing outlives its owner: workers, their tools' processes and the pool's files, whatever
way the host or a worker dies. Real processes throughout."""

from __future__ import annotations

import logging
import os
import signal

import psutil
import pytest
import trio

import trio_bridge
from benchmarks.sigkill_storm import one_run
from trio_bridge import Lifecycle, LocalWorkers, WorkerCrashedError

pytestmark = pytest.mark.real_process

ECHO = "tests.adapters:Echo"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _wait_until(predicate, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return True
    return False


@pytest.mark.parametrize("tool", ["sleep", "hold_gil"])
def test_host_sigkill_leaves_no_worker_no_tool_process_and_no_file(tool):
    # One run of benchmarks/sigkill_storm.py (which runs it many times): a pool of 2 whose tool
    # started a child, a call in flight (holding the GIL, for hold_gil), the host SIGKILLed.
    left = one_run(tool, ROOT, delay=0.3)
    assert left["started"], left
    assert (left["workers_left"], left["children_left"], left["shm_left"]) == (0, 0, 0), left


async def test_a_tools_processes_go_with_its_worker_on_crash_recycle_and_close(caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with trio_bridge.open_pool(ECHO, size=1, lifecycle=Lifecycle(restart_backoff=(0.01, 0.01))) as pool:
        crashed = await pool.execute("spawn_sleeper")
        with pytest.raises(WorkerCrashedError):
            await pool.execute("exit_now", {"code": 7})  # the worker crashes
        assert await _wait_until(lambda: not _alive(crashed), 5)

        recycled = await pool.execute("spawn_sleeper")
        worker = pool.workers()[0]
        os.kill(worker.pid, signal.SIGKILL)  # as the pool's own recycle does, to the process only
        assert await _wait_until(lambda: not _alive(recycled), 5)
        # its replacement is ready (not the killed one, which may still count as ready a moment)
        assert await _wait_until(lambda: [w.id for w in pool.workers() if w.state == "ready"] not in ([], [worker.id]), 10)

        closed = await pool.execute("spawn_sleeper")
    assert await _wait_until(lambda: not _alive(closed), 5)
    restarts = [r for r in caplog.records if "restarting the slot" in r.getMessage()]
    assert len(restarts) == 2, [r.getMessage() for r in restarts]  # each restart logged once, with why
    assert "exit code 7" in restarts[0].getMessage()


async def test_a_worker_killed_while_a_big_request_is_sent_fails_that_call_without_a_log_flood(caplog):
    """The host stops sending a big in-band message once the worker's connection is gone,
    instead of writing its remaining frames into the closed socket (asyncio logs a warning for
    each write past the fifth)."""
    import numpy as np

    caplog.set_level(logging.WARNING, logger="asyncio")
    big = np.ones(48 * 2**20 // 4, dtype=np.float32)
    async with trio_bridge.open_pool(ECHO, size=1, local=LocalWorkers(shared_memory_threshold=None), lifecycle=Lifecycle(restart_backoff=(0.01, 0.1))) as pool:
        for _ in range(3):
            await pool.wait_for_workers(1)
            assert (await pool.execute("echo", {"value": big})).shape == big.shape  # the windows widen for good
            (worker,) = pool.workers()
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)  # and the host sends the next call at once
            with pytest.raises(WorkerCrashedError):
                await pool.execute("echo", {"value": big})
        await pool.wait_for_workers(1)
        assert (await pool.execute("echo", {"value": big[:10]})).shape == (10,)
    flood = [r.getMessage() for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert flood == []
