"""The pool against real worker processes: calls, errors, streams, cancellation, crashes."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import psutil
import pytest
import trio

import trio_bridge
from trio_bridge import (
    EncodeError,
    InvalidArgumentError,
    PoolClosedError,
    ToolError,
    ToolNotFoundError,
    WorkerCrashedError,
    WorkerStartError,
)

pytestmark = pytest.mark.real_process

ECHO = "tests.adapters:Echo"


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


def marks(marker_dir, name: str) -> list[str]:
    return [p.read_text() for p in marker_dir.glob(f"{name}.*") if p.suffix != ".tmp"]


async def test_execute_round_trips_values_including_arrays():
    value = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "nested": [b"\x00raw", {"n": 2**70}], "f": float("-inf")}
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        assert await pool.execute("add", {"a": 40}) == 42
        result = await pool.execute("echo", {"value": value})
    assert result["x"].dtype == np.float32 and result["x"].shape == (3, 4)
    assert np.array_equal(result["x"], value["x"])
    assert result["nested"] == [b"\x00raw", {"n": 2**70}] and result["f"] == float("-inf")


async def test_each_kind_of_bad_call_has_its_own_clear_error():
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        with pytest.raises(ToolNotFoundError) as not_found:
            await pool.execute("nope")
        assert "add" in not_found.value.available and "echo" in str(not_found.value)
        with pytest.raises(InvalidArgumentError, match="missing required argument"):
            await pool.execute("add", {})
        with pytest.raises(InvalidArgumentError, match="unknown argument"):
            await pool.execute("add", {"a": 1, "bogus": 2})
        with pytest.raises(ToolError) as raised:
            await pool.execute("fail", {"message": "boom"})
        assert raised.value.remote_type == "ValueError" and raised.value.remote_message == "boom"
        assert "in fail" in raised.value.remote_traceback and "raise ValueError(message)" in raised.value.remote_traceback
        with pytest.raises(EncodeError, match=r'result\["items"\]\[3\]: object of type Unencodable'):
            await pool.execute("unencodable")
        with pytest.raises(EncodeError, match=r'arguments\["value"\]: object of type object'):
            await pool.execute("echo", {"value": object()})
        with pytest.raises(InvalidArgumentError, match="is a streaming tool"):
            await pool.execute("count", {"n": 1})
        # none of that hurt the worker
        assert pool.statistics().restarts == 0
        assert await pool.execute("add", {"a": 1}) == 3


async def test_bad_adapter_path_fails_open_pool_with_the_import_error():
    with pytest.raises(WorkerStartError) as info:
        async with trio_bridge.open_pool("no_such_package.adapters:Model", size=2):
            pass
    assert "ModuleNotFoundError: No module named 'no_such_package'" in info.value.stderr_tail
    assert info.value.exit_code == 3


async def test_failing_setup_fails_open_pool_with_its_traceback():
    with pytest.raises(WorkerStartError, match="the model file is missing"):
        async with trio_bridge.open_pool("tests.adapters:BrokenSetup", size=1):
            pass


async def test_worker_without_ready_line_in_time_fails_open_pool_and_is_killed():
    with pytest.raises(WorkerStartError, match=r"no ready line within 0\.5 s") as info:
        async with trio_bridge.open_pool("tests.adapters:SlowSetup", size=1, startup_timeout=0.5):
            pass
    assert info.value.signal in ("SIGKILL", "SIGTERM")
    assert not _running(info.value.pid)


async def test_stream_yields_chunks_in_order_then_ends():
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        async with pool.stream("count", {"n": 1000}) as chunks:
            assert [c async for c in chunks] == list(range(1000))
        async with pool.stream("async_count", {"n": 3}) as chunks:
            assert [c async for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_stream_error_arrives_after_the_chunks_before_it():
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        got = []
        with pytest.raises(ToolError, match="broke after 5"):
            async with pool.stream("fail_midway", {"n": 5}) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert got == [0, 1, 2, 3, 4]


async def test_leaving_a_stream_early_stops_the_generator(marker_dir):
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        async with pool.stream("count", {"n": 10_000_000, "delay": 0.001}) as chunks:
            async for chunk in chunks:
                if chunk == 20:
                    break
        await wait_for(lambda: marks(marker_dir, "count"))
        stopped_at = int(marks(marker_dir, "count")[0])
        assert 20 < stopped_at < 5000  # its finally ran: it was closed at a yield, not run to the end
        assert await pool.execute("add", {"a": 1}) == 3


async def test_cancel_scope_around_a_stream_stops_the_generator(marker_dir):
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        pid = await pool.execute("pid")
        received = 0
        with trio.move_on_after(0.5) as scope:
            async with pool.stream("count", {"n": 10_000_000, "delay": 0.001}) as chunks:
                async for _ in chunks:
                    received += 1
        assert scope.cancelled_caught and received > 0
        await wait_for(lambda: marks(marker_dir, "count"))
        stopped_at = int(marks(marker_dir, "count")[0])
        await trio.sleep(0.2)
        assert int(marks(marker_dir, "count")[0]) == stopped_at < 5000  # no more side effects
        assert await pool.execute("pid") == pid  # and the same worker serves the next call


async def test_slow_consumer_pauses_the_generator():
    # concurrency 2: the stream holds one slot, produced_so_far uses the other on the same worker
    async with trio_bridge.open_pool(ECHO, size=1, concurrency=2) as pool:
        async with pool.stream("count", {"n": 1_000_000}) as chunks:
            consumed = 0
            async for _ in chunks:
                consumed += 1
                if consumed % 100 == 0:
                    await trio.sleep(0.01)
                if consumed == 2000:
                    break
            await trio.sleep(0.3)  # time for a generator without backpressure to run far ahead
            produced = await pool.execute("produced_so_far")
        assert produced - consumed < 50_000, (produced, consumed)


async def test_cancelling_a_sync_tool_sets_ctx_cancelled_and_frees_the_worker(marker_dir):
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        pid = await pool.execute("pid")
        with trio.move_on_after(0.3) as scope:
            await pool.execute("cooperative_sleep", {"seconds": 60})
        assert scope.cancelled_caught
        await wait_for(lambda: marks(marker_dir, "cooperative_sleep"))
        assert marks(marker_dir, "cooperative_sleep") == ["cancelled"]
        assert await pool.execute("pid") == pid  # same worker, serving again
        assert pool.statistics().calls_cancelled == 1


async def test_cancelling_an_async_tool_cancels_it_in_the_worker(marker_dir):
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        with trio.move_on_after(0.3):
            await pool.execute("async_sleep", {"seconds": 60})
        await wait_for(lambda: marks(marker_dir, "async_sleep"))
        assert marks(marker_dir, "async_sleep") == ["cancelled"]
        assert await pool.execute("add", {"a": 1}) == 3


async def test_deadline_of_the_callers_cancel_scope_reaches_the_worker():
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        with trio.fail_after(5):
            remaining = await pool.execute("echo", {"value": trio.current_effective_deadline() - trio.current_time()})
        assert 4 < remaining <= 5


async def test_killed_worker_fails_only_its_call_and_the_pool_refills():
    async with trio_bridge.open_pool(ECHO, size=2, restart_backoff=(0.05, 0.5)) as pool:
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
    async with trio_bridge.open_pool(ECHO, size=1, restart_backoff=(0.05, 0.5)) as pool:
        with pytest.raises(WorkerCrashedError) as info:
            await pool.execute("exit_now", {"code": 7})
        assert info.value.exit_code == 7 and info.value.signal is None
        assert "exit code 7" in str(info.value)
        assert await pool.execute("add", {"a": 1}) == 3


async def test_worker_failing_its_health_check_is_recycled():
    async with trio_bridge.open_pool(ECHO, size=1, health_check_interval=0.3, restart_backoff=(0.05, 0.5)) as pool:
        pid = await pool.execute("pid")
        with pytest.raises(WorkerCrashedError, match="failed its health check"):
            await pool.execute("block_loop", {"seconds": 30})
        assert await pool.execute("pid") != pid
        assert not _running(pid)


def _trio_bridge_entries(*roots: str) -> set[str]:
    return {os.path.join(r, n) for r in roots for n in os.listdir(r) if n.startswith("trio-bridge-")}


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
    async with trio_bridge.open_pool(ECHO, size=1, shutdown_timeout=0.5, health_check_interval=0) as pool:
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


async def test_tcp_transport_and_statistics():
    async with trio_bridge.open_pool(ECHO, size=2, transport="tcp") as pool:
        assert all(w.address.startswith("tcp:127.0.0.1:") for w in pool.workers())
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(pool.execute, "add", {"a": i})
        stats = pool.statistics()
        assert stats.calls_completed == 20 and stats.in_flight == 0 and stats.queued == 0
        assert 0 < stats.latency_p50 <= stats.latency_p90 <= stats.latency_p99
        assert sum(w.calls_served for w in pool.workers()) == 20
        assert all(w.calls_served > 0 for w in pool.workers())  # the burst was spread over both


HOST_SCRIPT = """
import sys, trio, trio_bridge
async def main():
    async with trio_bridge.open_pool("tests.adapters:Echo", size=2) as pool:
        print(" ".join(str(w.pid) for w in pool.workers()), flush=True)
        await trio.sleep(60)
trio.run(main)
"""


async def test_workers_die_with_a_sigkilled_host(tmp_path):
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    host = await trio.lowlevel.open_process([sys.executable, str(script)], stdout=-1)
    try:
        with trio.fail_after(30):
            line = b""
            while not line.endswith(b"\n"):
                line += await host.stdout.receive_some(100)
        pids = [int(p) for p in line.split()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        host.kill()
        await host.wait()
        await wait_for(lambda: not any(_running(pid) for pid in pids), timeout=5)
    finally:
        await _reap(host)


async def _reap(process: trio.Process) -> None:
    process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


def _workers_of(host: psutil.Process) -> list[int]:
    return [p.pid for p in host.children() if "trio_bridge.worker" in " ".join(p.cmdline())]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_ctrl_c_in_the_cli_exits_130_and_leaves_no_process():
    cli = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_bridge", "run", ECHO, "sleep", "--arg", "seconds=60"], stderr=-1, stdout=-1
    )
    try:
        parent = psutil.Process(cli.pid)
        await wait_for(lambda: len(_workers_of(parent)) == 1, timeout=30)
        await trio.sleep(0.5)  # let it get into the call
        worker = _workers_of(parent)[0]
        cli.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            code = await cli.wait()
        assert code == 130
        assert not _running(worker)
    finally:
        await _reap(cli)


async def test_large_arrays_go_through_shared_memory_and_leave_no_file():
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    async with trio_bridge.open_pool(ECHO, size=1) as pool:
        directory = pool._plane.directory
        result = await pool.execute("echo", {"value": {"big": big, "small": np.arange(3)}})
        assert result["big"].dtype == np.float32 and np.array_equal(result["big"], big)
        async with pool.stream("echo_chunks", {"value": big, "times": 3}) as chunks:
            assert [np.array_equal(chunk, big) async for chunk in chunks] == [True] * 3
        async with pool.session() as session:
            await session.register_variable("weights", "tensor", big, constraints={"dtype": "float32"})
            assert await session.execute("echo", {"value": 1}) == 1
        assert os.listdir(directory) == []  # every file was read and removed
    assert not os.path.exists(directory)  # and the directory goes with the pool


async def test_tcp_pools_send_large_arrays_in_band():
    big = np.ones(300_000)
    async with trio_bridge.open_pool(ECHO, size=1, transport="tcp") as pool:
        assert pool._plane is None
        assert np.array_equal(await pool.execute("echo", {"value": big}), big)
