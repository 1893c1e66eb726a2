"""Native libraries' threads in local workers (``LocalWorkers(library_threads=...)``): each worker
gets the pool's share of the CPUs in the variables BLAS, OpenMP and the like read, unless the
user set them (variable by variable); forked and spawned workers start the same threads."""

from __future__ import annotations

import os

import pytest

import trio_bridge
from trio_bridge import InvalidArgumentError, LocalWorkers
from trio_bridge._host import _cpus, _library_threads
from trio_bridge._host._library_threads import VARIABLES, library_thread_environment

FORKED = "tests.fork_adapters:Forked"
NUMPY_FORKED = "tests.numpy_fork_adapter:NumpyForked"
CPUS = _cpus.usable_cpus()  # the pool's (affinity, at most a CPU quota)
AFFINITY = len(os.sched_getaffinity(0))  # OpenBLAS's own cap
METHODS = ["forkserver", "spawn"]


@pytest.fixture(autouse=True)
def _no_user_values(monkeypatch):
    """The host's environment sets none of the variables (unless a test does)."""
    for name in (*VARIABLES, "TRIO_BRIDGE_LIBRARY_THREADS"):
        monkeypatch.delenv(name, raising=False)


async def _variables(pool: trio_bridge.Pool) -> dict[str, str | None]:
    return {name: await pool.execute("env", {"name": name}) for name in VARIABLES}


def test_each_worker_gets_the_pools_share_of_the_cpus_unless_the_user_set_the_variable(monkeypatch):
    monkeypatch.setattr(_library_threads, "usable_cpus", lambda: 8)
    assert library_thread_environment(None, 3, given=()) == dict.fromkeys(VARIABLES, "2")  # 8 // 3
    assert library_thread_environment(None, 16, given=()) == dict.fromkeys(VARIABLES, "1")  # at least one
    assert library_thread_environment(5, 3, given=()) == dict.fromkeys(VARIABLES, "5")
    assert library_thread_environment(0, 3, given=()) == {}  # each library's own default
    assert library_thread_environment(None, 0, given=()) == {}  # no local workers
    chosen = library_thread_environment(None, 4, given=({"NUMBA_NUM_THREADS": "4"}, {"MKL_NUM_THREADS": "3"}))
    assert chosen == {name: "2" for name in VARIABLES if name not in ("NUMBA_NUM_THREADS", "MKL_NUM_THREADS")}


def test_a_variable_the_users_variable_stands_in_for_gets_the_users_value(monkeypatch):
    """OpenBLAS, MKL, BLIS and numexpr read OMP_NUM_THREADS when their own variable is not set
    (OpenBLAS GOTO_NUM_THREADS first): the user's OMP_NUM_THREADS=1 gives them one thread, and
    sets their own variable to it, so that no other value of the host's comes first."""
    monkeypatch.setattr(_library_threads, "usable_cpus", lambda: 8)
    stands_in = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    assert library_thread_environment(None, 2, given=({"OMP_NUM_THREADS": "1"},)) == {
        **dict.fromkeys(stands_in, "1"), "VECLIB_MAXIMUM_THREADS": "4", "NUMBA_NUM_THREADS": "4",
    }
    chosen = library_thread_environment(None, 2, given=({"GOTO_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"},))
    assert chosen["OPENBLAS_NUM_THREADS"] == "3"  # OpenBLAS reads GOTO_NUM_THREADS before OMP_NUM_THREADS
    # applied in order: the slot's over the pool's env; an empty value is unset, as the libraries read it
    chosen = library_thread_environment(5, 2, given=({"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": ""}))
    assert chosen == {**dict.fromkeys(stands_in, "2"), "VECLIB_MAXIMUM_THREADS": "5", "NUMBA_NUM_THREADS": "5"}


def test_an_explicit_library_threads_and_the_users_omp_come_before_the_hosts_values(monkeypatch):
    """library_threads given: the host's OPENBLAS_NUM_THREADS does not count as the user's, so a
    worker's OpenBLAS reads the env's OMP_NUM_THREADS value, not the host's."""
    from trio_bridge.worker._threads import wanted_threads

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "16")
    monkeypatch.setenv("MKL_NUM_THREADS", "16")
    env = {"OMP_NUM_THREADS": "1"}
    _, (slot,) = _library_threads.with_library_threads(2, 2, host=os.environ, env=env, slot_envs=[{}])
    worker = {**os.environ, **env, **slot}  # as WorkerSpec.command merges them
    assert worker["OPENBLAS_NUM_THREADS"] == worker["MKL_NUM_THREADS"] == "1"
    assert wanted_threads(worker, 64) == 1
    _, (slot,) = _library_threads.with_library_threads(2, 2, host=os.environ, env={}, slot_envs=[{}])
    assert {**os.environ, **slot}["OPENBLAS_NUM_THREADS"] == "2"  # the explicit value over the host's


def _cgroup(root, **files: str) -> str:
    for name, text in files.items():
        path = root / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return str(root)


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "200000 100000"}, 2),  # v2: docker --cpus=2
        ({"cpu.max": "150000 100000"}, 2),  # rounded up, as loky does
        ({"cpu.max": "max 100000"}, None),
        ({"cpu__cpu.cfs_quota_us": "50000", "cpu__cpu.cfs_period_us": "100000"}, 1),  # v1
        ({"cpu__cpu.cfs_quota_us": "-1", "cpu__cpu.cfs_period_us": "100000"}, None),
        ({}, None),
    ],
    ids=["v2", "v2_rounded_up", "v2_max", "v1", "v1_none", "no_cgroup"],
)
def test_a_containers_cpu_quota_bounds_the_usable_cpus(tmp_path, files, cpus):
    root = _cgroup(tmp_path, **files)
    assert _cpus.cgroup_cpus(root) == cpus
    affinity = len(os.sched_getaffinity(0))
    assert _cpus.usable_cpus(root) == (affinity if cpus is None else min(affinity, cpus))


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_a_bad_library_threads_is_refused(value):
    with pytest.raises(InvalidArgumentError, match=r"LocalWorkers\.library_threads must be a whole number >= 0"):
        LocalWorkers(library_threads=value)


@pytest.mark.real_process
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [1, 2])
async def test_a_workers_environment_holds_its_share_of_the_cpus(method, size):
    async with trio_bridge.open_pool(FORKED, size=size, local=LocalWorkers(start_method=method)) as pool:
        assert pool.start_method == method
        assert await _variables(pool) == dict.fromkeys(VARIABLES, str(max(1, CPUS // size)))


@pytest.mark.real_process
@pytest.mark.parametrize("method", METHODS)
async def test_the_users_values_win_variable_by_variable(method, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # the host's environment
    local = LocalWorkers(
        start_method=method, library_threads=3, env={"NUMBA_NUM_THREADS": "5"}, slot_env=lambda slot: {"MKL_NUM_THREADS": "4"},
    )
    async with trio_bridge.open_pool(FORKED, size=2, local=local) as pool:
        # library_threads given: over the host's value, not over env's or slot_env's
        assert await _variables(pool) == {**dict.fromkeys(VARIABLES, "3"), "NUMBA_NUM_THREADS": "5", "MKL_NUM_THREADS": "4"}
    async with trio_bridge.open_pool(FORKED, size=2, local=LocalWorkers(start_method=method, env={"NUMBA_NUM_THREADS": "5"})) as pool:
        # left out: the host's value wins too
        share = str(max(1, CPUS // 2))
        assert await _variables(pool) == {**dict.fromkeys(VARIABLES, share), "OPENBLAS_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "5"}


@pytest.mark.real_process
@pytest.mark.parametrize("method", METHODS)
async def test_a_slots_omp_num_threads_stands_for_the_libraries_that_read_it(method):
    local = LocalWorkers(start_method=method, library_threads=2, slot_env=lambda slot: {"OMP_NUM_THREADS": "1"})
    async with trio_bridge.open_pool(FORKED, size=1, local=local) as pool:
        stands_in = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
        assert await _variables(pool) == {**dict.fromkeys(VARIABLES, "2"), **dict.fromkeys(stands_in, "1"), "OMP_NUM_THREADS": "1"}


@pytest.mark.real_process
@pytest.mark.parametrize("method", METHODS)
async def test_the_users_omp_num_threads_gives_openblas_its_threads(method):
    """The README's advice: ``env={"OMP_NUM_THREADS": "1"}`` gives a worker's OpenBLAS one thread,
    forked (numpy loaded in the fork server) or spawned."""
    local = LocalWorkers(start_method=method, env={"OMP_NUM_THREADS": "1"})
    async with trio_bridge.open_pool(NUMPY_FORKED, size=1, local=local) as pool:
        assert pool.start_method == method
        assert await pool.execute("blas_threads") == [1]


@pytest.mark.real_process
@pytest.mark.parametrize("method", METHODS)
async def test_library_threads_0_sets_nothing(method, monkeypatch):
    monkeypatch.setenv("TRIO_BRIDGE_LIBRARY_THREADS", "0")
    async with trio_bridge.open_pool(FORKED, size=2, local=LocalWorkers(start_method=method)) as pool:
        assert await _variables(pool) == dict.fromkeys(VARIABLES)


@pytest.mark.real_process
@pytest.mark.parametrize(("size", "library_threads"), [(1, None), (2, None), (2, 0)], ids=["size_1", "size_2", "unset"])
async def test_a_forked_worker_with_numpy_preloaded_starts_the_blas_threads_of_a_spawned_one(size, library_threads):
    """numpy's OpenBLAS was loaded by the fork server, held at one thread: each forked worker sets
    it from its own environment (the pool's share of the CPUs), as a spawned one starts with it."""
    answers = {}
    for method in METHODS:
        local = LocalWorkers(start_method=method, library_threads=library_threads)  # type: ignore[arg-type]
        async with trio_bridge.open_pool(NUMPY_FORKED, size=size, local=local) as pool:
            assert pool.start_method == method
            answers[method] = [await pool.execute("blas_threads") for _ in range(size)]
    expected = AFFINITY if library_threads == 0 else min(AFFINITY, max(1, CPUS // size))  # 0: OpenBLAS's own default, one per CPU
    assert answers["forkserver"] == answers["spawn"] == [[expected]] * size
