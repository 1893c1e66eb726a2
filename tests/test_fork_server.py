"""Workers forked by a preloaded fork server (``open_pool(start_method=...)``): they start and
serve like spawned ones, keep every lifecycle guarantee, and the pool spawns where forking is
unsafe. Real processes throughout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import trio

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import InvalidArgumentError, Lifecycle, LocalWorkers, WorkerCrashedError, WorkerStartError
from trio_bridge._host._cpus import usable_cpus

FORKED = "tests.fork_adapters:Forked"
THREADED = "tests.threaded_adapter:Threaded"
NUMPY_FORKED = "tests.numpy_fork_adapter:NumpyForked"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_MODULE = "trio_bridge.worker._forkserver"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _fork_servers() -> list[psutil.Process]:
    """This process's fork servers (its children running the fork server module)."""
    found = []
    for child in psutil.Process().children():
        try:
            if SERVER_MODULE in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def _fd_targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


async def _replaced(pool: trio_bridge.Pool, old_id: str) -> trio_bridge.WorkerInfo:
    await wait_for(lambda: pool.workers()[0].id != old_id and pool.workers()[0].state == "ready", timeout=15)
    return pool.workers()[0]


@pytest.mark.real_process
async def test_workers_are_forked_by_the_fork_server_and_answer_calls():
    async with trio_bridge.open_pool(FORKED, size=2, local=LocalWorkers(env={"TB_POOL_VAR": "pool"})) as pool:
        assert pool.start_method == "forkserver"
        (server,) = _fork_servers()
        for worker in pool.workers():
            process = psutil.Process(worker.pid)
            assert process.ppid() == server.pid
            # Each leads its own session and process group: the host signals its whole tree.
            assert os.getpgid(worker.pid) == os.getsid(worker.pid) == worker.pid
        assert sorted([await pool.execute("add", {"a": i}) for i in range(4)]) == [2, 3, 4, 5]
        identity = await pool.execute("identity")
        assert identity["ppid"] == server.pid and identity["pgid"] == identity["sid"] == identity["pid"]
        assert await pool.execute("env", {"name": "TB_POOL_VAR"}) == "pool"
        # Nothing of the fork server's (control socket, SIGCHLD pipe, other workers' status
        # sockets) is open in a worker.
        server_fds = {t for t in _fd_targets(server.pid) if t.startswith(("socket:", "pipe:"))}
        for worker in pool.workers():
            assert not server_fds & _fd_targets(worker.pid), worker
        # The pool's secret reaches each worker, never the fork server.
        assert "TRIO_BRIDGE_SECRET" not in server.environ()
        pids = [w.pid for w in pool.workers()]
        family = [p.pid for p in server.children()]  # the workers, and a spare kept in reserve
        assert set(pids) < set(family)
    assert not any(_alive(p) for p in [*family, server.pid])


@pytest.mark.real_process
async def test_per_worker_environment_applies_in_each_fork():
    async with trio_bridge.open_pool(FORKED, size=1, lifecycle=Lifecycle(restart_backoff=(0.0, 0.0))) as pool:
        first = pool.workers()[0]
        assert await pool.execute("env", {"name": "TRIO_BRIDGE_WORKER_ID"}) == first.id
        os.kill(first.pid, signal.SIGKILL)
        second = await _replaced(pool, first.id)
        assert await pool.execute("env", {"name": "TRIO_BRIDGE_WORKER_ID"}) == second.id != first.id


@pytest.mark.real_process
async def test_forked_workers_do_not_share_numpys_legacy_random_state():
    async with trio_bridge.open_pool(NUMPY_FORKED, size=2, concurrency=1) as pool:
        assert pool.start_method == "forkserver"
        draws: list[list] = []

        async def draw() -> None:
            draws.append(await pool.execute("legacy_random"))

        async with trio.open_nursery() as nursery:  # both at once: one on each worker
            nursery.start_soon(draw)
            nursery.start_soon(draw)
        (pid_a, value_a), (pid_b, value_b) = draws
        assert pid_a != pid_b and value_a != value_b


@pytest.mark.real_process
@pytest.mark.parametrize(("env", "host_env"), [
    (None, None), ({"OMP_NUM_THREADS": "1"}, None), ({"OPENBLAS_NUM_THREADS": "2"}, None), (None, "2"),
], ids=["default", "omp_num_threads_1", "openblas_num_threads_2", "host_openblas_num_threads_2"])
async def test_an_adapter_importing_numpy_forks_and_its_workers_get_the_blas_threads_of_spawned_ones(
    env, host_env, monkeypatch,
):
    """numpy's OpenBLAS starts threads as it loads: the fork server holds it at one thread while it
    imports (even where the pool's env or the host's environment sets OPENBLAS_NUM_THREADS), and
    each forked worker then has the BLAS threads a spawned worker has (its env's, the host's, or
    the pool's default: its share of the CPUs, LocalWorkers.library_threads)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "TRIO_BRIDGE_LIBRARY_THREADS"):
        monkeypatch.delenv(name, raising=False)
    if host_env is not None:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", host_env)
    cpus = len(os.sched_getaffinity(0))  # OpenBLAS's own cap
    users = (env or {}).get("OPENBLAS_NUM_THREADS") or host_env
    omp = (env or {}).get("OMP_NUM_THREADS")
    variable = users or omp or str(max(1, usable_cpus() // 2))  # the user's, else what it reads in its place, else the pool's
    wanted = variable
    answers = {}
    for method in ("forkserver", "spawn"):
        local = LocalWorkers(env=env, start_method=method)  # type: ignore[arg-type]
        async with trio_bridge.open_pool(NUMPY_FORKED, size=2, local=local) as pool:
            assert pool.start_method == method
            answers[method] = [await pool.execute("blas_threads") for _ in range(2)]
            # (the fork server held it at "1": a worker has its own)
            assert await pool.execute("env", {"name": "OPENBLAS_NUM_THREADS"}) == variable
    assert answers["forkserver"] == answers["spawn"] == [[min(int(wanted), cpus)]] * 2


@pytest.mark.real_process
async def test_the_digits_example_forks_with_scikit_learn_preloaded():
    """`trio-bridge run`'s adapter imports numpy and scikit-learn (two OpenBLAS, OpenMP) at module
    level: its fork server stays single-threaded, so its workers fork."""
    pytest.importorskip("sklearn")
    async with trio_bridge.open_pool("trio_bridge.examples.digits:Digits", size=1) as pool:
        assert pool.start_method == "forkserver"
        held_out = await pool.execute("held_out")
        assert held_out["images"].shape[1:] == (8, 8) and len(held_out["images"]) == len(held_out["labels"])


def test_openblas_threads_wanted_follow_its_own_rules():
    from trio_bridge.worker._threads import hold_at_one, wanted_threads

    assert wanted_threads({}, 8) == 8
    assert wanted_threads({"OMP_NUM_THREADS": "4,2"}, 8) == 4
    assert wanted_threads({"OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "2"}, 8) == 3
    assert wanted_threads({"OPENBLAS_NUM_THREADS": "0", "GOTO_NUM_THREADS": "2"}, 8) == 2  # 0: unset
    assert wanted_threads({"OMP_NUM_THREADS": "16"}, 8) == 8  # never more than the CPUs
    assert wanted_threads({"OPENBLAS_NUM_THREADS": "many"}, 8) == 8
    for environ in ({"OPENBLAS_NUM_THREADS": "2"}, {}):  # the user's too: a worker sets its own after the fork
        hold_at_one(environ)
        assert environ == {"OPENBLAS_NUM_THREADS": "1"}


@pytest.mark.parametrize("failure", ["missing", "raises"])
def test_without_a_working_threadpoolctl_only_a_loaded_openblas_stops_forking(monkeypatch, failure):
    from trio_bridge.worker import _threads

    if failure == "missing":
        monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails
    else:
        import threadpoolctl

        def broken(self):
            raise OSError("cannot inspect this process")

        monkeypatch.setattr(threadpoolctl.ThreadpoolController, "__init__", broken)
    monkeypatch.setattr(_threads, "_mapped", lambda name: False)  # an adapter without OpenBLAS: it forks
    pools = _threads.ThreadPools()
    pools.set_for({"OPENBLAS_NUM_THREADS": "2"})  # nothing to set
    monkeypatch.setattr(_threads, "_mapped", lambda name: name == "openblas")
    with pytest.raises(RuntimeError, match="OpenBLAS is loaded"):
        _threads.ThreadPools()


@pytest.mark.real_process
async def test_a_killed_worker_is_replaced_by_a_fork_quickly(caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge")
    async with trio_bridge.open_pool(FORKED, size=1, lifecycle=Lifecycle(restart_backoff=(0.0, 0.0))) as pool:
        (server,) = _fork_servers()
        old = pool.workers()[0]
        sleeper = await pool.execute("spawn_sleeper")
        killed = trio.current_time()
        os.kill(old.pid, signal.SIGKILL)  # the worker only: its tool's child is left in its group
        new = await _replaced(pool, old.id)
        took = trio.current_time() - killed
        assert psutil.Process(new.pid).ppid() == server.pid  # forked again, by the same server
        assert took < 2.0, took  # ~50 ms when the machine is idle (spawn: ~0.4 s)
        assert await wait_for_dead(sleeper)  # what was left of its group was killed
        assert await pool.execute("add", {"a": 1}) == 3
    gone = [r.getMessage() for r in caplog.records if "restarting the slot" in r.getMessage()]
    assert gone and "exit code -9" in gone[0]


async def wait_for_dead(pid: int, timeout: float = 5.0) -> bool:
    with trio.move_on_after(timeout):
        while _alive(pid):
            await trio.sleep(0.02)
        return True
    return False


@pytest.mark.real_process
async def test_a_crashed_forked_worker_reports_its_exit_code_signal_and_stderr_tail():
    async with trio_bridge.open_pool(FORKED, size=1, lifecycle=Lifecycle(restart_backoff=(0.01, 0.05))) as pool:
        assert pool.start_method == "forkserver"
        with pytest.raises(WorkerCrashedError) as info:
            await pool.execute("crash", {"message": "out of cheese", "code": 7})
        assert info.value.exit_code == 7 and info.value.signal is None
        assert "out of cheese" in info.value.stderr_tail
        with pytest.raises(WorkerCrashedError) as info:
            await pool.execute("die_by", {"message": "about to be signalled", "signum": int(signal.SIGUSR1)})
        assert info.value.exit_code == -signal.SIGUSR1 and info.value.signal == "SIGUSR1"
        assert "about to be signalled" in info.value.stderr_tail
        assert await pool.execute("add", {"a": 1}) == 3


@pytest.mark.real_process
async def test_a_forked_worker_that_fails_to_start_reports_why():
    with pytest.raises(WorkerStartError) as info:
        async with trio_bridge.open_pool("tests.adapters:BrokenSetup", size=2, local=LocalWorkers(start_method="forkserver")):
            pass
    assert "the model file is missing" in info.value.stderr_tail
    assert info.value.exit_code == 4  # EXIT_ADAPTER_SETUP
    assert not _fork_servers()


HOST = """
import sys, trio, trio_bridge
async def main():
    async with trio_bridge.open_pool("tests.fork_adapters:Forked", size=2) as pool:
        assert pool.start_method == "forkserver", pool.start_method
        sleeper = await pool.execute("spawn_sleeper")
        shm = pool._plane.directory if pool._plane else "-"
        print(" ".join(str(w.pid) for w in pool.workers()), sleeper, shm, flush=True)
        await pool.execute("sleep", {"seconds": 60})
trio.run(main)
"""


@pytest.mark.real_process
def test_host_sigkill_leaves_no_fork_server_no_worker_no_tool_process_and_no_file():
    host = subprocess.Popen(
        [sys.executable, "-c", HOST], cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}
    )
    try:
        assert host.stdout is not None
        *workers, sleeper, shm = host.stdout.readline().split()
        server = psutil.Process(int(workers[0])).ppid()
        assert SERVER_MODULE in psutil.Process(server).cmdline()
        spares = [p.pid for p in psutil.Process(server).children() if str(p.pid) not in workers]
        assert spares  # one kept in reserve
        pids = [server, *(int(p) for p in workers), *spares, int(sleeper)]
        assert all(_alive(p) for p in pids) and os.path.isdir(shm)
        time.sleep(0.2)  # a call in flight
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (any(_alive(p) for p in pids) or os.path.exists(shm)):
        time.sleep(0.02)
    left = [p for p in pids if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left and not os.path.exists(shm)


@pytest.mark.real_process
async def test_a_dead_fork_server_takes_its_workers_with_it_and_the_pool_carries_on(caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    async with trio_bridge.open_pool(FORKED, size=2, lifecycle=Lifecycle(restart_backoff=(0.01, 0.05))) as pool:
        (server,) = _fork_servers()
        sleeper = await pool.execute("spawn_sleeper")
        old = [w.pid for w in pool.workers()]
        server.kill()
        # Its workers die (their death signal), and what their tools started (their groups).
        for pid in [server.pid, *old, sleeper]:
            assert await wait_for_dead(pid), pid
        await wait_for(lambda: pool.statistics().workers_ready == 2 and not {w.pid for w in pool.workers()} & set(old), 15)
        assert await pool.execute("add", {"a": 1}) == 3
        # Another fork server takes over; replacements fork from it again.
        await wait_for(lambda: pool.start_method == "forkserver" and len(_fork_servers()) == 1, 15)
        (second,) = _fork_servers()
        assert second.pid != server.pid
        victim = pool.workers()[0]
        os.kill(victim.pid, signal.SIGKILL)
        replacement = await _replaced(pool, victim.id)
        assert psutil.Process(replacement.pid).ppid() == second.pid
    assert any("died" in r.getMessage() and "starting another" in r.getMessage() for r in caplog.records)
    assert not _fork_servers()


@pytest.mark.real_process
async def test_a_preloaded_parent_with_threads_falls_back_to_spawn(caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    async with trio_bridge.open_pool(THREADED, size=2) as pool:
        assert pool.start_method == "spawn"
        for worker in pool.workers():
            assert psutil.Process(worker.pid).ppid() == os.getpid()
            assert os.getpgid(worker.pid) == worker.pid
        assert await pool.execute("pid") in {w.pid for w in pool.workers()}
        assert not _fork_servers()  # it exited once it said it would not fork
    (record,) = [r for r in caplog.records if "start by spawn" in r.getMessage()]
    assert "2 threads after importing tests.threaded_adapter" in record.getMessage()
    assert record.levelno == logging.INFO  # the default method: no warning

    caplog.clear()
    async with trio_bridge.open_pool(THREADED, size=1, local=LocalWorkers(start_method="forkserver")) as pool:
        assert pool.start_method == "spawn"
    (record,) = [r for r in caplog.records if "start by spawn" in r.getMessage()]
    assert record.levelno == logging.WARNING  # asked for, not given: said out loud


@pytest.mark.real_process
async def test_start_method_spawn_starts_no_fork_server():
    async with trio_bridge.open_pool(FORKED, size=1, local=LocalWorkers(start_method="spawn")) as pool:
        assert pool.start_method == "spawn"
        assert not _fork_servers()
        assert psutil.Process(pool.workers()[0].pid).ppid() == os.getpid()
        assert await pool.execute("add", {"a": 1}) == 3


async def test_an_unknown_start_method_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"LocalWorkers\.start_method must be one of 'forkserver', 'spawn' or None"):
        async with trio_bridge.open_pool(FORKED, size=1, local=LocalWorkers(start_method="fork")):  # type: ignore[arg-type]
            pass


async def test_pools_in_threads_say_so():
    from trio_bridge.testing import open_pool_in_threads

    async with open_pool_in_threads(FORKED, size=1) as pool:
        assert pool.start_method == "threads"
