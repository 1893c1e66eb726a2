"""The pool against real worker processes: calls, errors, streams, cancellation, crashes."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
import trio

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import (
    Lifecycle,
    PoolClosedError,
    WorkerCrashedError,
    WorkerStartError,
)

pytestmark = pytest.mark.real_process

ECHO = "tests.adapters:Echo"


async def test_bad_adapter_path_fails_open_pool_with_the_import_error():
    with pytest.raises(WorkerStartError) as info:
        async with trio_bridge.open_pool("no_such_package.adapters:Model", size=2):
            pass
    assert str(info.value).startswith(f"worker {info.value.worker_id}: ")
    assert str(info.value).removeprefix(f"worker {info.value.worker_id}: ").startswith(
        "cannot import module 'no_such_package.adapters' for adapter 'no_such_package.adapters:Model': "
        "No module named 'no_such_package'. The adapter must be importable from the current directory or PYTHONPATH"
    )
    assert "Traceback" not in info.value.stderr_tail  # one line says it all
    assert info.value.exit_code == 3


async def test_failing_setup_fails_open_pool_with_its_traceback():
    with pytest.raises(WorkerStartError, match="the model file is missing"):
        async with trio_bridge.open_pool("tests.adapters:BrokenSetup", size=1):
            pass


async def test_worker_without_ready_line_in_time_fails_open_pool_and_is_killed():
    with pytest.raises(WorkerStartError, match=r"no ready line within 0\.5 s") as info:
        async with trio_bridge.open_pool("tests.adapters:SlowSetup", size=1, lifecycle=Lifecycle(startup_timeout=0.5)):
            pass
    assert info.value.signal in ("SIGKILL", "SIGTERM")
    assert not _running(info.value.pid)


async def test_killed_worker_fails_only_its_call_and_the_pool_refills():
    async with trio_bridge.open_pool(ECHO, size=2, lifecycle=Lifecycle(restart_backoff=(0.05, 0.5))) as pool:
        results = {}

        async def doomed_call() -> None:
            with pytest.raises(WorkerCrashedError) as info:
                await pool.execute("sleep", {"seconds": 30})
            results["error"] = info.value

        async def other_call() -> None:
            results["other"] = await pool.execute("sleep", {"seconds": 1.0})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(doomed_call)
            await wait_for(lambda: pool.statistics().in_flight == 1)
            (victim,) = [w for w in pool.workers() if w.in_flight == 1]
            nursery.start_soon(other_call)
            await wait_for(lambda: pool.statistics().in_flight == 2)
            os.kill(victim.pid, signal.SIGKILL)
        error = results["error"]
        assert error.signal == "SIGKILL" and error.exit_code == -signal.SIGKILL
        assert error.worker_id == victim.id and error.pid == victim.pid
        assert "killed by SIGKILL" in str(error)
        assert results["other"] == 1.0  # the call on the other worker was untouched
        await wait_for(lambda: pool.statistics().workers_ready == 2)
        assert pool.statistics().restarts == 1
        assert victim.id not in {w.id for w in pool.workers()}
        assert [await pool.execute("add", {"a": i}) for i in range(4)] == [2, 3, 4, 5]


async def test_worker_exit_code_and_stderr_tail_are_reported():
    async with trio_bridge.open_pool(ECHO, size=1, lifecycle=Lifecycle(restart_backoff=(0.05, 0.5))) as pool:
        with pytest.raises(WorkerCrashedError) as info:
            await pool.execute("exit_now", {"code": 7})
        assert info.value.exit_code == 7 and info.value.signal is None
        assert "exit code 7" in str(info.value)
        assert await pool.execute("add", {"a": 1}) == 3


async def test_a_tool_raising_system_exit_ends_its_worker_as_it_ends_any_program_and_others_do_not():
    async with trio_bridge.open_pool(ECHO, size=1, lifecycle=Lifecycle(restart_backoff=(0.05, 0.5))) as pool:
        pid = await pool.execute("pid")
        with trio.fail_after(20), pytest.raises(trio_bridge.ToolError, match="raised StopIteration"):
            await pool.execute("raise_sync", {"name": "StopIteration"})  # (it hung: see test_calls.py)
        assert await pool.execute("pid") == pid
        # as a bare one ends it, in an exception group too (asyncio kept a group on the task: the call hung)
        for tool, code, grouped in (("sys_exit", 3, False), ("async_sys_exit", 4, False), ("sys_exit", 5, True),
                                    ("async_sys_exit", 6, True)):
            with trio.fail_after(20), pytest.raises(WorkerCrashedError) as info:
                await pool.execute(tool, {"code": code, "grouped": grouped})
            assert info.value.exit_code == code
        assert await pool.execute("add", {"a": 1}) == 3


async def test_setup_raising_stop_iteration_fails_open_pool_at_once():
    # it crossed asyncio.wrap_future as a TypeError, and the worker waited for its startup timeout
    with trio.fail_after(20), pytest.raises(WorkerStartError, match="StopIteration"):
        async with trio_bridge.open_pool("tests.adapters:StopInSetup", size=1, lifecycle=Lifecycle(startup_timeout=60)):
            pass


async def test_worker_failing_its_health_check_is_recycled():
    async with trio_bridge.open_pool(ECHO, size=1, lifecycle=Lifecycle(health_check_interval=0.3, restart_backoff=(0.05, 0.5))) as pool:
        pid = await pool.execute("pid")
        with pytest.raises(WorkerCrashedError, match="failed its health check"):
            await pool.execute("block_loop", {"seconds": 30})
        assert await pool.execute("pid") != pid
        assert not _running(pid)


def _trio_bridge_entries(*roots: str) -> set[str]:
    """This process's pools' entries (their names carry its pid; other programs may run pools too)."""
    mine = f"trio-bridge-{os.getpid()}-"
    return {os.path.join(r, n) for r in roots for n in os.listdir(r) if n.startswith(mine)}


async def test_closing_leaves_no_process_and_no_file():
    before = _trio_bridge_entries("/tmp", "/dev/shm")
    async with trio_bridge.open_pool(ECHO, size=2) as pool:
        pids = [w.pid for w in pool.workers()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        # Linux abstract-namespace sockets: nothing on disk to leave behind.
        assert all(w.address.startswith("unix:@trio-bridge-") for w in pool.workers())
        janitors = [p for p in psutil.Process().children() if "trio_bridge._host._janitor" in " ".join(p.cmdline())]
        assert len(janitors) == 1
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert not janitors[0].is_running() or janitors[0].status() == psutil.STATUS_ZOMBIE
    assert _trio_bridge_entries("/tmp", "/dev/shm") <= before
    with pytest.raises(PoolClosedError):
        await pool.execute("add", {"a": 1})


async def test_closing_a_pool_whose_worker_hangs_is_bounded():
    started = trio.current_time()
    async with trio_bridge.open_pool(ECHO, size=1, lifecycle=Lifecycle(shutdown_timeout=0.5, health_check_interval=0)) as pool:
        pid = await pool.execute("pid")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, "block_loop", {"seconds": 60})  # its event loop stops answering
            await wait_for(lambda: pool.statistics().in_flight == 1)
            nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 20
    assert not _running(pid)


async def test_cancelling_the_pool_block_shuts_everything_down():
    with trio.CancelScope() as scope:
        async with trio_bridge.open_pool(ECHO, size=2) as pool:
            pids = [w.pid for w in pool.workers()]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pool.execute, "sleep", {"seconds": 30})
                await wait_for(lambda: pool.statistics().in_flight == 1)
                scope.cancel()  # mid-call, as a Ctrl-C or an outer timeout would
    assert scope.cancelled_caught
    assert not any(psutil.pid_exists(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_large_arrays_go_through_shared_memory_reuse_their_segments_and_leave_no_file():
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        directory = pool._plane.directory
        result = await pool.execute("echo", {"value": {"big": big, "small": np.arange(3)}})
        assert result["big"].dtype == np.float32 and np.array_equal(result["big"], big)
        del result
        for _ in range(10):
            assert np.array_equal(await pool.execute("echo", {"value": big}), big)
        # Reused: at most two segments each way (the worker may let go of the last call's
        # arguments only after its reply arrived, so the next call may need a second one).
        assert len(os.listdir(directory)) <= 4
        async with pool.stream("echo_chunks", {"value": big, "times": 3}) as chunks:
            assert [np.array_equal(chunk, big) async for chunk in chunks] == [True] * 3
        async with pool.session() as session:
            await session.register_variable("weights", "tensor", big, constraints={"dtype": "float32"})
            assert await session.execute("echo", {"value": 1}) == 1
        worker = pool.workers()[0]
        os.kill(worker.pid, signal.SIGKILL)
        await wait_for(lambda: not any(name.startswith(f"{worker.pid}-") for name in os.listdir(directory)))
    assert not os.path.exists(directory)  # and the directory goes with the pool


