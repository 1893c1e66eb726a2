"""New code without a restart: ``await pool.reload()`` replaces every local worker, one slot at
a time, with one that imports the adapter's code afresh -- no call fails, capacity never drops
below the pool's size, sessions and their variables are untouched -- and a reload whose new code
does not import keeps the old workers serving. Pool logic on fake workers and Trio's autojump
clock; then the promise with real processes, an adapter module rewritten on disk."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import trio

from tests.helpers import FAKE_TOOLS, wait_for
from tests.test_fork_server import _fork_servers
from trio_bridge import Lifecycle, LocalWorkers, PoolClosedError, Recycling, WorkerStartError, open_pool
from trio_bridge.testing import open_fake_pool

MODULE = "reload_target"
ADAPTER = f"{MODULE}:Versioned"
SOURCE = '''
from trio_bridge.worker import Adapter, SessionContext, tool

VERSION = {version}


class Versioned(Adapter):
    @tool
    def answer(self) -> int:
        """The version of the code that answers."""
        return VERSION

    @tool
    def scaled(self, ctx: SessionContext) -> int:
        """The session's variable ``factor`` times the version."""
        return ctx.variables["factor"] * VERSION
'''


def write_module(directory: Path, version: int, *, broken: bool = False, same_mtime: bool = False) -> None:
    """The adapter's module, answering ``version`` (a one-digit version: every version has the
    same size). ``broken``: with a SyntaxError. ``same_mtime``: keep the file's modification
    time as it was (a rewrite within the same second: Python's timestamp-checked bytecode
    cache would still take the old code). Otherwise its mtime moves on by two seconds."""
    path = directory / f"{MODULE}.py"
    before = path.stat() if path.exists() else None
    text = SOURCE.format(version=version)
    if broken:
        text = text.replace("return VERSION\n", "return (VERSION\n", 1)
    path.write_text(text)
    if before is not None:
        mtime = before.st_mtime_ns if same_mtime else max(before.st_mtime_ns, time.time_ns()) + 2_000_000_000
        os.utime(path, ns=(mtime, mtime))


def local(directory: Path, start_method: str = "forkserver") -> LocalWorkers:
    return LocalWorkers(env={"PYTHONPATH": str(directory)}, start_method=start_method)


# ---- pool logic (fake workers) ----


async def test_reload_replaces_each_worker_in_turn_without_a_failed_call_or_a_slot_less(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    async with open_fake_pool(FAKE_TOOLS, size=3, concurrency=2, start_delay=0.05) as fake:
        pool = fake.pool
        before = {w.id for w in pool.workers()}
        failures: list[BaseException] = []
        fewest = [3]
        done = trio.Event()

        async def caller() -> None:
            while not done.is_set():
                try:
                    await pool.execute("sleep", {"seconds": 0.01})
                except Exception as exc:
                    failures.append(exc)

        async def watch() -> None:
            while not done.is_set():
                fewest[0] = min(fewest[0], pool.statistics().workers_ready)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for _ in range(4):
                nursery.start_soon(caller)
            await trio.sleep(0.1)
            assert await pool.reload() == 3
            answered_after = {await pool.execute("whoami") for _ in range(6)}
            done.set()
        assert failures == [] and fewest[0] == 3
        after = {w.id for w in pool.workers() if w.state == "ready"}
        assert len(after) == 3 and not after & before and answered_after <= after
        assert pool.statistics().recycles == {"reload": 3} and pool.statistics().restarts == 0
        assert all("pool.reload()" in (w.last_recycle_reason or "") for w in pool.workers())
        await wait_for(lambda: len(pool.workers()) == 3)
        assert all(w.exit_code == 0 for w in fake.workers.made if w.id in before)  # drained, not killed


async def test_a_failed_reload_keeps_the_old_workers_and_says_so_once(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    async with open_fake_pool(FAKE_TOOLS, size=2) as fake:
        pool = fake.pool
        before = [w.id for w in pool.workers()]
        fake.workers.fail_starts(1, message="SyntaxError: '(' was never closed")
        with pytest.raises(WorkerStartError) as raised:
            await pool.reload()
        assert "SyntaxError" in raised.value.stderr_tail
        assert "0 of 2 local worker(s) were replaced" in str(raised.value.__notes__)
        assert [w.id for w in pool.workers()] == before and await pool.execute("whoami") in before
        said = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 1 and "pool.reload()" in said[0].getMessage() and "SyntaxError" in said[0].getMessage()
        assert pool.statistics().recycles == {}
        assert await pool.reload() == 2  # fixed: it reloads
    with pytest.raises(PoolClosedError):
        await pool.reload()


async def test_reloads_run_one_after_the_other_and_workers_started_ahead_are_replaced_too(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2, start_delay=0.05, recycling=Recycling(max_calls=10)) as fake:
        pool = fake.pool

        async def caller() -> None:
            for _ in range(100):
                await pool.execute("sleep", {"seconds": 0.002})

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(caller)
            await trio.sleep(0.03)
            nursery.start_soon(pool.reload)
            await trio.sleep(0)
            ids = {w.id for w in pool.workers()}
            assert await pool.reload() == 2  # waited for the first, then replaced both again
            replaced = {w.id for w in pool.workers()}
            assert not replaced & ids  # nothing made before the second reload serves, started ahead or not
        stats = pool.statistics()
        assert stats.recycles["reload"] == 4 and stats.calls_completed == 400 and stats.calls_failed == 0


async def test_a_slot_restarting_during_a_reload_is_replaced_by_its_restart(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2, lifecycle=Lifecycle(restart_backoff=(1.0, 1.0))) as fake:
        pool = fake.pool
        fake.workers.fail_starts(1)
        crashed = fake.workers.kill(0)
        await wait_for(lambda: len(fake.workers.made) == 3 and fake.workers.made[2].exit_code is not None)  # its restart failed: it backs off 1 s
        began = trio.current_time()
        assert await pool.reload() == 2
        assert trio.current_time() - began >= 0.9  # slot 0 waited for its restart, which counts as its replacement
        assert crashed.id not in {w.id for w in pool.workers()} and pool.statistics().workers_ready == 2
        assert pool.statistics().recycles == {"reload": 1}  # (slot 0's restart is counted as a restart)


async def test_a_cancelled_reload_leaves_no_replacement_behind(autojump_clock):
    # The slot's worker is past Recycling.max_age and its replacement failed to start: its task
    # backs off (5 s) before it tries again, so the reload's request waits for it, untaken.
    lifecycle = Lifecycle(restart_backoff=(5.0, 5.0))
    async with open_fake_pool(FAKE_TOOLS, size=1, recycling=Recycling(max_age=10.0), lifecycle=lifecycle) as fake:
        pool = fake.pool
        first = pool.workers()[0].id
        fake.workers.fail_starts(1)
        await wait_for(lambda: len(fake.workers.made) == 2, timeout=20)  # (at 10 s: the age replacement failed)
        with trio.move_on_after(1.0) as cancelled:
            await pool.reload()
        assert cancelled.cancelled_caught
        await trio.sleep(6.0)  # the backoff ends (at 15 s): the slot is replaced for its age, not for the reload
        assert pool.statistics().recycles == {"age": 1} and pool.statistics().restarts == 0
        assert first not in {w.id for w in pool.workers()}
        assert not any("pool.reload()" in (w.last_recycle_reason or "") for w in pool.workers())


async def test_closing_the_pool_during_a_reload_makes_the_reload_raise_pool_closed_at_once(autojump_clock):
    raised: list[tuple[float, BaseException]] = []
    with trio.fail_after(300):
        async with trio.open_nursery() as outside:  # reload() runs outside the pool's tasks
            lifecycle = Lifecycle(shutdown_timeout=1.0, startup_timeout=1000.0)
            async with open_fake_pool(FAKE_TOOLS, size=2, lifecycle=lifecycle) as fake:
                fake.workers.start_delay = 500.0  # the new worker is still starting when the pool closes

                async def reload() -> None:
                    try:
                        await fake.pool.reload()
                    except PoolClosedError as exc:
                        raised.append((trio.current_time(), exc))

                outside.start_soon(reload)
                await trio.sleep(1.0)
                closing_at = trio.current_time()
            closed_at = trio.current_time()
    assert len(raised) == 1 and closing_at <= raised[0][0] <= closed_at + 0.1
    assert fake.pool.statistics().recycles == {}


# ---- real processes ----
async def _calls_through_a_reload(directory: Path, start_method: str) -> dict[str, object]:
    """A pool of 2, four tasks calling ``answer`` in a loop; the module rewritten, then
    ``pool.reload()``. Returns the figures."""
    write_module(directory, 1)
    async with open_pool(ADAPTER, size=2, local=local(directory, start_method)) as pool:
        assert pool.start_method == start_method
        assert await pool.execute("answer") == 1
        first = {w.pid for w in pool.workers()}
        servers = [s.pid for s in _fork_servers()]
        assert len(servers) == (1 if start_method == "forkserver" else 0)
        calls: list[tuple[float, float, object]] = []  # (started, ended, answer or error)
        fewest = [2]
        reloading = trio.Event()
        done = trio.Event()

        async def caller() -> None:
            while not done.is_set():
                started = trio.current_time()
                try:
                    answer: object = await pool.execute("answer")
                except Exception as exc:
                    answer = exc
                calls.append((started, trio.current_time(), answer))
                await trio.sleep(0.002)

        async def watch() -> None:
            await reloading.wait()
            while not done.is_set():
                fewest[0] = min(fewest[0], pool.statistics().workers_ready)
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for _ in range(4):
                nursery.start_soon(caller)
            await wait_for(lambda: len(calls) >= 20)
            write_module(directory, 2)
            began = trio.current_time()
            reloading.set()
            replaced = await pool.reload()
            returned = trio.current_time()
            await wait_for(lambda: sum(1 for c in calls if c[0] > returned) >= 40)
            done.set()
        failed = [c for c in calls if isinstance(c[2], Exception)]
        after = [c[2] for c in calls if c[0] > returned]
        during = [c for c in calls if c[0] >= began and c[1] <= returned]
        await wait_for(lambda: len(pool.workers()) == 2 and all(w.state == "ready" for w in pool.workers()), timeout=30)
        now = {w.pid for w in pool.workers()}
        if start_method == "forkserver":  # the new workers' fork server took over; the old one is gone
            await wait_for(lambda: len(_fork_servers()) == 1 and _fork_servers()[0].pid not in servers, timeout=30)
            assert {psutil.Process(pid).ppid() for pid in now} == {_fork_servers()[0].pid}
        figures = {
            "start_method": start_method, "replaced": replaced, "calls": len(calls), "failed": len(failed),
            "served_during_reload": len(during), "reload_seconds": round(returned - began, 3),
            "after": len(after), "new_answers_after": after.count(2), "fewest_ready": fewest[0],
            "recycles": dict(pool.statistics().recycles), "old_workers_left": len(first & now),
        }
    print(f"\nreload figures: {figures}")
    assert failed == []
    assert replaced == 2 and figures["recycles"] == {"reload": 2} and not first & now
    assert after and set(after) == {2}  # every call that started after reload() returned: new code
    assert fewest[0] == 2  # capacity never dropped below size
    return figures


@pytest.mark.real_process
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_four_callers_see_no_failure_and_the_new_code_after_a_reload(tmp_path, start_method):
    await _calls_through_a_reload(tmp_path, start_method)


@pytest.mark.real_process
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_new_code_of_the_same_size_and_mtime_is_loaded(tmp_path, start_method):
    # A rewrite within the same second with the same size: Python's timestamp-checked .pyc would
    # still take the old code. The workers keep the adapter module's bytecode checked by hash.
    write_module(tmp_path, 1)
    writing = LocalWorkers(env={"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": ""}, start_method=start_method)
    async with open_pool(ADAPTER, size=1, local=writing) as pool:
        assert await pool.execute("answer") == 1
        assert list((tmp_path / "__pycache__").glob(f"{MODULE}.*.pyc"))  # (its bytecode was cached)
        write_module(tmp_path, 2, same_mtime=True)
        await pool.reload()
        assert await pool.execute("answer") == 2


@pytest.mark.real_process
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_a_broken_module_keeps_the_old_workers_serving(tmp_path, caplog, start_method):
    caplog.set_level(logging.INFO, logger="trio_bridge")
    write_module(tmp_path, 1)
    async with open_pool(ADAPTER, size=2, local=local(tmp_path, start_method)) as pool:
        before = [w.pid for w in pool.workers()]
        servers = [s.pid for s in _fork_servers()]
        write_module(tmp_path, 2, broken=True)
        with pytest.raises(WorkerStartError) as raised:
            await pool.reload()
        assert "SyntaxError" in raised.value.stderr_tail and "was never closed" in raised.value.stderr_tail
        assert [w.pid for w in pool.workers()] == before
        assert [await pool.execute("answer") for _ in range(4)] == [1] * 4
        said = [r.getMessage() for r in caplog.records if r.name == "trio_bridge" and r.levelno >= logging.WARNING]
        assert len(said) == 1 and "pool.reload()" in said[0] and "SyntaxError" in said[0], said
        assert pool.statistics().recycles == {}
        await wait_for(lambda: [s.pid for s in _fork_servers()] == servers, timeout=30)  # the new one is closed
        if start_method == "forkserver":  # the old fork server forks again: a crashed worker comes back with the old code
            os.kill(before[0], signal.SIGKILL)
            await wait_for(lambda: pool.statistics().workers_ready == 2 and before[0] not in {w.pid for w in pool.workers()}, timeout=30)
            assert [await pool.execute("answer") for _ in range(4)] == [1] * 4
        write_module(tmp_path, 3)  # fixed
        assert await pool.reload() == 2
        assert await pool.execute("answer") == 3


@pytest.mark.real_process
async def test_sessions_and_their_variables_survive_a_reload(tmp_path):
    write_module(tmp_path, 1)
    async with open_pool(ADAPTER, size=2, local=local(tmp_path)) as pool:
        async with pool.session(affinity="strict") as session:
            await session.register_variable("factor", "integer", 7)
            assert await session.execute("scaled") == 7
            write_module(tmp_path, 2)
            fewest = [2]
            done = trio.Event()

            async def watch() -> None:
                while not done.is_set():
                    fewest[0] = min(fewest[0], pool.statistics().workers_ready)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                assert await pool.reload() == 2
                done.set()
            assert fewest[0] == 2
            assert (await session.get_variable("factor")).value == 7
            assert await session.execute("scaled") == 14  # the new code, the same session and variable
            await session.set_variable("factor", 5)
            assert await session.execute("scaled") == 10


@pytest.mark.real_process
async def test_a_fork_server_that_dies_during_a_reload_leaves_exactly_one_behind(tmp_path):
    # The fork server dies while the reload's new one imports the new code (slowly): another is
    # started in its place meanwhile. Once the reload is done, one fork server runs, not two.
    write_module(tmp_path, 1)
    async with open_pool(ADAPTER, size=1, local=local(tmp_path)) as pool:
        [old] = _fork_servers()
        write_module(tmp_path, 2)
        path = tmp_path / f"{MODULE}.py"
        path.write_text("import time\ntime.sleep(2.0)  # a slow import: a fork server's verdict takes a while\n" + path.read_text())
        replaced: list[int] = []

        async def reload() -> None:
            replaced.append(await pool.reload())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload)
            await wait_for(lambda: len(_fork_servers()) == 2, timeout=30)  # the new one imports the new code
            old.kill()
        assert replaced == [1] and await pool.execute("answer") == 2
        await wait_for(lambda: len(_fork_servers()) == 1, timeout=60)
        await trio.sleep(3.0)  # (one started in the dead one's place has had time to answer)
        servers = _fork_servers()
        print(f"\nfork servers after the reload: {[s.pid for s in servers]} (the one killed: {old.pid})")
        assert len(servers) == 1 and servers[0].pid != old.pid
