"""Nothing outlives its owner: workers, their tools' processes and the pool's files, whatever
way the host or a worker dies. Real processes throughout."""

from __future__ import annotations

import logging
import os
import signal
import sys

import psutil
import pytest
import trio

import trio_bridge
from trio_bridge import WorkerCrashedError

pytestmark = pytest.mark.real_process

ECHO = "tests.adapters:Echo"

HOST = """
import os, sys, trio, trio_bridge
async def main():
    async with trio_bridge.open_pool("tests.adapters:Echo", size=2) as pool:
        sleeper = await pool.execute("spawn_sleeper")
        shm = pool._plane.directory if pool._plane else ""
        print(" ".join(str(w.pid) for w in pool.workers()), sleeper, shm, flush=True)
        await pool.execute(sys.argv[1], {"seconds": 60})
trio.run(main)
"""


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
async def test_host_sigkill_leaves_no_worker_no_tool_process_and_no_file(tmp_path, tool):
    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = await trio.lowlevel.open_process([sys.executable, str(script), tool], stdout=-1)
    try:
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await host.stdout.receive_some(200)
        *worker_pids, sleeper, shm = line.decode().split()
        pids = [int(p) for p in worker_pids]
        assert all(_alive(p) for p in pids) and _alive(int(sleeper)) and os.path.isdir(shm)
        await trio.sleep(0.3)  # the tool is running (holding the GIL, for hold_gil)
        host.kill()
        await host.wait()
        gone = await _wait_until(lambda: not any(_alive(p) for p in [*pids, int(sleeper)]) and not os.path.exists(shm), 5)
        assert gone, {p: _alive(p) for p in [*pids, int(sleeper)]} | {shm: os.path.exists(shm)}
    finally:
        host.kill()
        with trio.CancelScope(shield=True):
            await host.wait()
            await host.stdout.aclose()


async def test_a_tools_processes_go_with_its_worker_on_crash_recycle_and_close(caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with trio_bridge.open_pool(ECHO, size=1, restart_backoff=(0.01, 0.01)) as pool:
        crashed = await pool.execute("spawn_sleeper")
        with pytest.raises(WorkerCrashedError):
            await pool.execute("exit_now", {"code": 7})  # the worker crashes
        assert await _wait_until(lambda: not _alive(crashed), 5)

        recycled = await pool.execute("spawn_sleeper")
        worker = pool.workers()[0]
        os.kill(worker.pid, signal.SIGKILL)  # as the pool's own recycle does, to the process only
        assert await _wait_until(lambda: not _alive(recycled), 5)
        assert await _wait_until(lambda: pool.statistics().workers_ready == 1, 10)

        closed = await pool.execute("spawn_sleeper")
    assert await _wait_until(lambda: not _alive(closed), 5)
    restarts = [r for r in caplog.records if "restarting the slot" in r.getMessage()]
    assert len(restarts) == 2, [r.getMessage() for r in restarts]  # each restart logged once, with why
    assert "exit code 7" in restarts[0].getMessage()
