"""trio_bridge.testing's helpers for users' own test suites: ``open_adapter_pool`` (an adapter
run in process, on Trio's clock) and the ``trio_bridge_pool`` fixture of the pytest plugin (real
pools, closed after the test)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import psutil
import pytest
import trio
import trio.testing

from tests import inprocess_adapters
from tests.inprocess_adapters import Calculator
from trio_bridge import (
    EncodeError,
    InvalidArgumentError,
    Lifecycle,
    MemoryBackend,
    ToolError,
    ToolNotFoundError,
    VariableLockedError,
    WorkerStartError,
)
from trio_bridge.testing import open_adapter_pool

pytest_plugins = ["trio_bridge.testing.pytest_plugin"]

CALCULATOR = "tests.inprocess_adapters:Calculator"
ROOT = pathlib.Path(__file__).resolve().parent.parent


async def _shout(text: str) -> str:
    return text.upper()


async def _words(text: str):
    for word in text.split():
        yield word


# ---- tools of each kind, on the autojump clock ----


async def test_sync_async_and_streaming_tools(autojump_clock):
    async with open_adapter_pool(CALCULATOR, adapter_options={"scale": 3}) as pool:
        assert pool.adapter == CALCULATOR
        assert [w.pid for w in pool.workers()] == [None]
        assert await pool.execute("multiply", {"x": 2.0}) == 6.0
        where = await pool.execute("where")
        assert not where["main"]  # a sync tool runs in a Trio worker thread
        assert where["name"].startswith("trio-bridge w0 tool where")

        wall, start = time.monotonic(), trio.current_time()
        assert await pool.execute("slow_add", {"a": 1, "b": 2}) == 3  # an hour on the Trio clock
        assert trio.current_time() - start == pytest.approx(3600)
        assert time.monotonic() - wall < 5

        async with pool.stream("count", {"n": 4}) as chunks:
            assert [c async for c in chunks] == [0, 3, 6, 9]
        start = trio.current_time()
        async with pool.stream("ticks", {"n": 3, "every": 60.0}) as chunks:
            ticks = [c async for c in chunks]
        assert [t["at"] - start for t in ticks] == pytest.approx([60, 120, 180])
        stats = pool.statistics()
        assert stats.calls_completed == 5 and stats.in_flight == 0


async def test_setup_runs_once_per_worker_with_the_options_as_json(autojump_clock):
    inprocess_adapters.SETUPS.clear()
    options = {"scale": 2, "pair": (1, 2)}
    async with open_adapter_pool(Calculator, size=3, adapter_options=options) as pool:
        assert pool.adapter == "tests.inprocess_adapters:Calculator"  # from the class
        assert inprocess_adapters.SETUPS == [{"scale": 2, "pair": [1, 2]}] * 3  # through JSON, as to a process
        for _ in range(6):
            assert await pool.execute("show_options") == {"scale": 2, "pair": [1, 2]}
    assert len(inprocess_adapters.SETUPS) == 3


async def test_async_setup_runs_on_the_trio_clock(autojump_clock):
    async with open_adapter_pool("tests.inprocess_adapters:AsyncSetup") as pool:
        assert await pool.execute("setup_took") == pytest.approx(30)
    with pytest.raises(WorkerStartError, match="no ready line within 20 s"):
        async with open_adapter_pool("tests.inprocess_adapters:AsyncSetup", lifecycle=Lifecycle(startup_timeout=20)):
            pass


async def test_deadline_cancels_an_async_tool_in_trio_time(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool, pool.session() as session:
        await session.register_variable("outcome", "string", "")
        wall, start = time.monotonic(), trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(10):
                await session.execute("sleep_until_cancelled", {"seconds": 3600})
        assert trio.current_time() - start == pytest.approx(10)
        assert time.monotonic() - wall < 5
        await trio.testing.wait_all_tasks_blocked()  # the tool's own cancellation ran
        assert (await session.get_variable("outcome")).value == "cancelled"
        await trio.sleep(1)  # the host polls the worker until it let go of the call
        stats = pool.statistics()
        assert stats.calls_cancelled == 1 and stats.in_flight == 0 and stats.recycles == {}

        assert await session.execute("sleep_until_cancelled", {"seconds": 5}) == "finished"
        assert (await session.get_variable("outcome")).value == "finished"

        # The tool sees the deadline, on the Trio clock.
        with trio.fail_after(100):
            deadline, left = await pool.execute("deadline_left")
        assert left == pytest.approx(100, abs=0.01)
        assert deadline == pytest.approx(trio.current_time() + 100, abs=0.01)
        assert await pool.execute("deadline_left") == [None, None]


async def test_cancelling_a_call_cancels_an_async_stream(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool:
        start = trio.current_time()
        async with pool.stream("ticks", {"n": 1000, "every": 60.0}) as chunks:
            async for chunk in chunks:
                if chunk["tick"] == 2:
                    break
        assert trio.current_time() - start == pytest.approx(180)
        await trio.sleep(1)  # the host polls the worker until it let go of the call
        assert pool.statistics().in_flight == 0
        assert pool.statistics().recycles == {}


async def test_cancelling_a_sync_tool_sets_ctx_cancelled():
    # On the real clock: while a thread runs, the autojump clock would jump (to the cancel
    # grace, recycling the worker), see open_adapter_pool's docstring.
    inprocess_adapters.CANCELLED_SEEN.clear()
    async with open_adapter_pool(CALCULATOR) as pool:
        wall = time.monotonic()
        with trio.move_on_after(0.2) as scope:
            await pool.execute("spin", {"limit": 30.0})
        assert scope.cancelled_caught
        with trio.fail_after(10):
            while pool.statistics().in_flight:  # the slot frees once the thread returned
                await trio.sleep(0.01)
        assert len(inprocess_adapters.CANCELLED_SEEN) == 1
        assert time.monotonic() - wall < 10
        assert pool.statistics().recycles == {}
        assert await pool.execute("multiply", {"x": 1.5}) == 1.5


# ---- session variables ----


async def test_session_variables_from_sync_and_async_tools(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool, pool.session() as session:
        await session.register_variable("counter", "integer", 1)
        result = await session.execute("bump", {"by": 2})  # sync: blocking forms, from its thread
        assert result == {"before": 1, "after": 3, "version": 1, "source": "worker:w0"}
        assert await session.execute("abump", {"by": 10}) == {"before": 3, "after": 13, "version": 2}
        assert (await session.get_variable("counter")).value == 13

        await session.set_variable("counter", 100)  # read-your-writes: the next call sees it
        assert (await session.execute("bump"))["before"] == 100

        assert await session.execute("register", {"name": "lr", "value": 0.5}) == ["counter", "lr"]
        assert (await session.get_variable("lr")).value == 0.5
        with pytest.raises(ToolError) as refused:
            await session.execute("register", {"name": "lr2", "value": -1.0})  # min 0
        assert refused.value.remote_type == "InvalidVariableError"
        assert await session.execute("bump") == {"before": 101, "after": 102, "version": 5, "source": "worker:w0"}
        with pytest.raises(ToolError, match="not in a session"):
            await pool.execute("bump")


async def test_variable_history_and_optimization_locks(autojump_clock):
    state = MemoryBackend(lock_lease=3.0)
    async with open_adapter_pool(CALCULATOR, state=state) as pool, pool.session() as session:
        await session.register_variable("counter", "integer", 0)
        async with trio.open_nursery() as nursery:
            result: list[object] = []

            async def optimize() -> None:
                result.append(await session.execute("optimize", {"seconds": 60}))

            nursery.start_soon(optimize)
            await trio.sleep(30)  # ten leases: the tool's lock is renewed meanwhile
            with pytest.raises(VariableLockedError):
                await session.set_variable("counter", 5)
        assert result == [[10, 11]]
        await session.set_variable("counter", 5)  # released

        with pytest.raises(ToolError) as refused:
            await session.execute("optimize_sync")
        assert refused.value.remote_type == "VariableLockedError"  # a write that is not the holder's
        await session.set_variable("counter", 6)  # released even so
        assert await session.execute("history") == [0, 10, 11, 5, 7, 6]


async def test_a_tool_watches_variables(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool, pool.session() as session:
        await session.register_variable("counter", "integer", 0)
        async with trio.open_nursery() as nursery:
            seen: list[object] = []

            async def watch() -> None:
                seen.append(await session.execute("watch", {"changes": 2}))

            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            await session.set_variable("counter", 1)
            await trio.testing.wait_all_tasks_blocked()
            await session.set_variable("counter", 2)
        assert seen == [[0, 1, 2]]
        stats = pool.statistics()
        assert stats.in_flight == 0


# ---- host tools and worker-to-worker calls ----


async def test_tools_call_host_tools(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool:
        pool.host_tool(name="shout")(_shout)
        pool.host_tool(name="words")(_words)
        assert await pool.execute("ask_host", {"text": "hi"}) == "HI"  # sync, blocking form
        assert await pool.execute("aask_host", {"text": "hi"}) == "HI"  # async, ctx.ahost_tools() proxy
        assert await pool.execute("host_words", {"text": "a b c"}) == ["a", "b", "c"]  # streaming
        with pytest.raises(ToolError, match="blocks") as misuse:
            await pool.execute("blocking_in_async")
        assert misuse.value.remote_type == "RuntimeError"
    async with open_adapter_pool(CALCULATOR) as pool:
        async with pool.session() as session:
            session.register_host_tool(_shout, name="shout")  # the session's own
            assert await session.execute("ask_host", {"text": "yo"}) == "YO"
        with pytest.raises(ToolError) as missing:
            await pool.execute("ask_host", {"text": "yo"})
        assert missing.value.remote_type == "ToolNotFoundError"


async def test_cancelling_a_sync_tool_cancels_the_host_tool_it_waits_on():
    # On the real clock, as for any sync tool's cancellation (see above).
    cancelled = trio.Event()
    async with open_adapter_pool(CALCULATOR) as pool:

        @pool.host_tool
        async def shout(text: str) -> str:
            try:
                await trio.sleep(30)
            except trio.Cancelled:
                cancelled.set()
                raise
            return text

        with trio.move_on_after(0.3):
            await pool.execute("ask_host", {"text": "x"})
        with trio.fail_after(10):
            await cancelled.wait()
            while pool.statistics().in_flight:
                await trio.sleep(0.01)
        assert pool.statistics().recycles == {}


async def test_a_tool_calls_another_workers_tool(autojump_clock):
    async with open_adapter_pool(CALCULATOR, size=2, adapter_options={"scale": 5}) as pool:
        assert await pool.execute("via_worker", {"x": 2.0}) == 10.0


async def test_session_hooks_run_in_the_worker(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool:
        async with pool.session(metadata={"user": "ada"}) as session:
            assert await session.execute("session_log") == [["start", session.id, {"user": "ada"}]]
        await trio.testing.wait_all_tasks_blocked()
        assert await pool.execute("session_log") == [["start", session.id, {"user": "ada"}], ["end", session.id, None]]


# ---- errors ----


async def test_tool_errors_are_those_of_a_real_worker(autojump_clock):
    async with open_adapter_pool(CALCULATOR) as pool:
        with pytest.raises(ToolError) as failed:
            await pool.execute("fail", {"message": "boom"})
        assert failed.value.remote_type == "ValueError" and failed.value.remote_message == "boom"
        assert "inprocess_adapters.py" in failed.value.remote_traceback
        with pytest.raises(EncodeError):
            await pool.execute("unencodable")
        with pytest.raises(ToolNotFoundError):
            await pool.execute("nope")
        with pytest.raises(InvalidArgumentError, match="'x'"):
            await pool.execute("multiply", {"x": "two"})
        with pytest.raises(InvalidArgumentError, match="streaming"):
            await pool.execute("count", {"n": 1})
        assert await pool.execute("multiply", {"x": 2.0}) == 2.0


async def test_a_tools_non_exception_fails_only_its_call_as_in_a_real_worker(autojump_clock):
    # a BaseException (pytest.fail()'s Failed is one) returned None, then failed the pool
    async with open_adapter_pool("tests.adapters:Echo") as pool:
        for tool in ("raise_sync", "raise_async"):
            for name in ("LibraryStop", "GeneratorExit", "BaseExceptionGroup"):
                with pytest.raises(ToolError) as failed:
                    await pool.execute(tool, {"name": name})
                assert failed.value.remote_type == name
        with pytest.raises(ToolError, match="raised BaseException"):
            async with pool.stream("raise_async_generator", {"name": "BaseException"}) as chunks:
                assert [chunk async for chunk in chunks] == [1]
        assert await pool.execute("add", {"a": 1}) == 3


@pytest.mark.parametrize(
    ("adapter", "exit_code", "expected"),
    [
        ("tests.inprocess_adapters:Nope", 3, "has no 'Nope' for adapter"),
        ("no_such_module_here:Adapter", 3, "No module named 'no_such_module_here'"),
        ("tests.inprocess_adapters:NotAnAdapter", 3, "is not a subclass of trio_bridge.worker.Adapter"),
        ("tests.inprocess_adapters:BrokenSetup", 4, "RuntimeError: no model file"),
    ],
)
async def test_an_adapter_that_cannot_start_gives_a_clear_error(autojump_clock, adapter, exit_code, expected):
    with pytest.raises(WorkerStartError) as failed:
        async with open_adapter_pool(adapter, size=2):
            pytest.fail("the pool opened")
    assert failed.value.exit_code == exit_code
    assert expected in failed.value.stderr_tail
    assert adapter in str(failed.value)


async def test_bad_arguments_are_refused_at_once():
    with pytest.raises(InvalidArgumentError, match=r"'package\.module:ClassName'"):
        open_adapter_pool(inprocess_adapters.NotAnAdapter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'sizes'"):
        open_adapter_pool(CALCULATOR, sizes=2)
    with pytest.raises(InvalidArgumentError, match="adapter must be"):
        async with open_adapter_pool("no colon"):
            pass
    with pytest.raises(InvalidArgumentError, match="JSON"):
        async with open_adapter_pool(CALCULATOR, adapter_options={"x": object()}):
            pass


# ---- the pytest fixture: real pools ----


@pytest.fixture
def no_worker_left():
    """Worker pids a test records; once the test's Trio run (and so the ``trio_bridge_pool``
    fixture) has ended, none of them may be alive."""
    pids: list[int] = []
    yield pids
    assert pids
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children.isdisjoint(pids)


@pytest.mark.real_process
async def test_the_fixture_opens_real_pools_and_closes_them_after_the_test(no_worker_left, trio_bridge_pool):
    pool = await trio_bridge_pool(CALCULATOR, size=2, adapter_options={"scale": 4})
    other = await trio_bridge_pool(CALCULATOR, size=1)
    assert await pool.execute("multiply", {"x": 2.0}) == 8.0
    assert await other.execute("multiply", {"x": 2.0}) == 2.0
    pids = [w.pid for w in pool.workers() + other.workers()]
    assert all(pid is not None and pid != os.getpid() and psutil.pid_exists(pid) for pid in pids)
    no_worker_left.extend(pid for pid in pids if pid is not None)


@pytest.mark.real_process
def test_the_readme_example_passes(tmp_path):
    """The README's "Testing your adapter" example, as a user's project of its own: its files
    written out, its tests run by pytest in a fresh process."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Testing your adapter\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    files = {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}
    assert set(files) == {"myapp/adapters.py", "tests/conftest.py", "tests/test_greeter.py"}
    for name, text in [*files.items(), ("myapp/__init__.py", ""), ("tests/__init__.py", "")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_greeter.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_a_remote_worker_that_says_nothing_is_killed_after_the_start_timeout(tmp_path):
    """``RemoteWorkerProcess.start`` is bounded: a process that never prints its ready line is
    killed (its whole group) and the caller is told, instead of waiting forever."""
    from trio_bridge.testing import RemoteWorkerProcess, write_token_file

    silent = [sys.executable, "-c", "import time; time.sleep(60)"]  # the worker's argv follows, unread
    worker = RemoteWorkerProcess(
        "tests.adapters:Echo", "tcp:127.0.0.1:1", write_token_file(tmp_path / "token", "t" * 32), command_prefix=silent,
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"said nothing within 0\.5 s"):
        worker.start(timeout=0.5)
    assert time.monotonic() - started < 10
    assert worker.process is not None and worker.process.poll() is not None  # killed and reaped


async def test_buffers_are_plain_arrays_in_an_adapter_pool():
    """``pool.empty`` and ``ctx.empty`` work without shared memory: plain numpy arrays, copied."""
    import numpy as np

    async with open_adapter_pool("tests.buffer_adapters:Buffers") as pool:
        a = pool.empty((4, 3), "float32")
        a[...] = 2.0
        result = await pool.execute("plus_one_into", {"a": a})
        assert result.dtype == np.float32 and (result == 3.0).all() and a.flags.writeable
