"""Sessions and variables across the wire, with real worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from tests.helpers import wait_for
from trio_bridge import (
    InvalidVariableError,
    SessionNotFoundError,
    ToolError,
    VariableLockedError,
    VersionConflictError,
)
from trio_bridge.testing import open_pool_in_threads

STATEFUL = "tests.state_adapters:Stateful"


async def test_a_tool_sees_the_value_set_just_before_it_with_no_round_trip_when_unchanged():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
        for i in range(1, 11):
            await session.set_variable("temperature", i / 10)
            seen = await session.execute("read", {"name": "temperature"})
            assert (seen["value"], seen["version"]) == (i / 10, i)
        refreshes = seen["refreshes"]
        for _ in range(5):
            assert (await session.execute("read", {"name": "temperature"}))["refreshes"] == refreshes


async def test_a_host_watcher_sees_a_write_by_a_worker_tool():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        await session.register_variable("model", "choice", "small", constraints={"choices": ["small", "large"]})
        async with session.watch_variables(["model"]) as updates:
            first = await updates.next_batch()
            assert [(u.kind, u.new_value) for u in first] == [("initial", "small")]
            result = await session.execute("write", {"name": "model", "value": "large"})
            assert result == {"version": 1, "seen": "large"}  # read-your-writes inside the tool
            (change,) = await updates.next_batch()
        assert (change.kind, change.old_value, change.new_value, change.version) == ("change", "small", "large", 1)
        assert change.source == f"worker:{session.worker_id}"


async def test_a_refused_write_from_a_worker_raises_there_and_changes_nothing():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
        result = await session.execute("write", {"name": "temperature", "value": 5.0})
        assert result["error"] == "InvalidVariableError" and "above the maximum 2" in result["message"]
        variable = await session.get_variable("temperature")
        assert (variable.value, variable.version) == (0.7, 0)
        with pytest.raises(ToolError, match=r"VariableNotFoundError: no variable named .nope."):
            await session.execute("write_batch", {"updates": {"temperature": 1.0, "nope": 1}})
        assert (await session.get_variable("temperature")).version == 0  # atomic: nothing written


async def test_worker_registers_batches_and_async_tools_write():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        assert await session.execute("register", {"name": "steps", "type": "integer", "value": 3, "constraints": {"min": 1}}) == 0
        await session.register_variable("prompt", "string", "hi")
        names = await session.execute("write_batch", {"updates": {"steps": 4, "prompt": "hello"}})
        assert names == ["prompt", "steps"]
        assert await session.get_variables(["steps", "prompt"]) == {"steps": 4, "prompt": "hello"}
        assert await session.execute("async_write", {"name": "steps", "value": 5}) == 2
        hint = await session.execute("blocking_call_in_async_tool")
        assert "await ctx.aset_variable" in hint


async def test_a_worker_watches_changes_made_by_the_host_while_its_tool_runs():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        await session.register_variable("t", "float", 0.0)
        async with trio.open_nursery() as nursery:
            result = {}

            async def watch() -> None:
                result["seen"] = await session.execute("watch", {"name": "t", "count": 3})

            nursery.start_soon(watch)
            async with session.watch_variables(["t"], include_initial=False) as mine:
                await trio.sleep(0.5)  # let the worker subscribe
                for value in (0.5, 1.5):
                    await session.set_variable("t", value)
                    await mine.next_batch()
                    await trio.sleep(0.1)
        assert result["seen"] == [["initial", 0.0], ["change", 0.5], ["change", 1.5]]

        async def watch_closed() -> bool:  # the tool returned mid-iteration: its watch ended too
            return session.id not in pool._state._feeds

        await wait_for(watch_closed)


async def test_version_conflicts_locks_history_rollback_and_arrays_through_the_session_api():
    async with open_pool_in_threads(STATEFUL, size=1) as pool, pool.session() as session:
        var = await session.register_variable("temperature", "float", 0.7)
        var = await session.set_variable("temperature", 0.9, expected_version=var.version)
        with pytest.raises(VersionConflictError):
            await session.set_variable("temperature", 1.0, expected_version=0)
        async with session.optimizing("temperature", optimizer_id="grid") as opt:
            await opt.set(1.2)
            with pytest.raises(VariableLockedError):
                await session.set_variable("temperature", 0.1)
            assert (await session.execute("write", {"name": "temperature", "value": 0.3}))["error"] == "VariableLockedError"
        await session.set_variable("temperature", 0.1)  # released
        assert [e.value for e in await session.variable_history("temperature")] == [0.7, 0.9, 1.2, 0.1]
        assert (await session.rollback_variable("temperature", version=1)).value == 0.9
        await session.register_variable("centroid", "embedding", np.zeros(4, np.float32), constraints={"dimensions": 4})
        seen = await session.execute("read", {"name": "centroid"})
        assert seen["value"].dtype == np.float32 and seen["value"].shape == (4,)
        with pytest.raises(InvalidVariableError, match="5 dimensions, expected 4"):
            await session.set_variable("centroid", np.zeros(5))
        assert await session.list_variables("temp*") == ["temperature"]


async def test_workers_are_told_when_a_session_starts_and_ends_and_it_is_gone_for_good():
    async with open_pool_in_threads(STATEFUL, size=1) as pool:
        async with pool.session("job-1", metadata={"user": "ada", "priority": 2}) as session:
            await session.execute("pid")
            await session.execute("pid")
            assert await session.execute("started_sessions") == [["job-1", {"user": "ada", "priority": 2}]]  # once
        async def told() -> bool:
            return "job-1" in await pool.execute("ended_sessions")

        await wait_for(told)
        with pytest.raises(SessionNotFoundError):
            await session.execute("pid")
