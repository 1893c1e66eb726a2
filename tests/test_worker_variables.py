"""The full variable API in worker tools (list, delete, history, rollback, dependencies, session
info, the optimization lock), and watching with a bounded buffer on both sides, with real
worker processes."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import wait_for
from trio_bridge import ToolError, VariableLockedError
from trio_bridge.testing import open_pool_in_threads

VARIABLES = "tests.state_adapters:Variables"


@pytest.mark.parametrize("tool", ["tour", "atour"])
async def test_a_worker_tool_lists_reads_history_rolls_back_adds_dependencies_and_deletes(tool):
    async with open_pool_in_threads(VARIABLES, size=1) as pool, pool.session(ttl=600, metadata={"user": "ada"}) as session:
        await session.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
        await session.register_variable("model", "choice", "small", constraints={"choices": ["small", "large"]})
        seen = await session.execute(tool)
        info = await session.info()
        assert seen == {
            "listed": ["model", "temperature"],
            "listed_temp": ["temperature"],
            "history": [[0, 0.7], [1, 0.9], [2, 1.1]],
            "history_2": [[1, 0.9], [2, 1.1]],
            "rolled": [3, 0.9, 0.9, 3],  # read-your-writes: the cache has the rolled-back value
            "depends_on": ["model"],
            "cached_depends_on": ["model"],
            "after_delete": [["temperature"], False, []],
            # The host's SessionInfo, without the host's Trio-clock times in a worker.
            "info": [session.id, 600.0, {"user": "ada"}, 1, info.state_version, "SessionInfo", None],
        }
        assert await session.list_variables() == ["temperature"]
        variable = await session.get_variable("temperature")
        assert (variable.value, variable.version, variable.depends_on) == (0.9, 3, ())
        assert (await session.variable_history("temperature"))[-1].source == f"worker:{session.worker_id}"
        # The next call sees all of it (its cache was refreshed or kept in step, never stale).
        assert await session.execute("read", {"name": "temperature"}) == {
            "value": 0.9, "version": 3, "optimizer_id": None, "depends_on": [],
        }


async def test_refusals_reach_the_worker_tool_as_the_hosts_errors():
    async with open_pool_in_threads(VARIABLES, size=1) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.7)
        await session.register_variable("model", "string", "small")
        await session.add_dependency("temperature", "model")
        assert await session.execute("refused") == [
            "VariableNotFoundError", "DependencyCycleError", "VariableNotFoundError", "VariableNotFoundError",
        ]
        assert (await session.get_variable("model")).depends_on == ()


@pytest.mark.parametrize("tool", ["optimize", "aoptimize"])
async def test_a_workers_optimizer_lock_refuses_the_hosts_writes_until_its_tool_ends(tool):
    optimizer = "worker-grid" if tool == "optimize" else "worker-agrid"
    async with open_pool_in_threads(VARIABLES, size=2) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 2})

        # Ends normally: the tool wrote through the lock, and released it.
        result = await session.execute(tool, {"name": "temperature", "values": [1.0, 1.5]})
        assert result == {"holder": optimizer, "after": None, "value": 1.5}
        assert (await session.get_variable("temperature")).optimizer_id is None

        # Held: the host's writes and locks are refused, as are other tools'; released when the
        # tool ends, here by the host cancelling its call.
        async def holder_is(expected):
            async def check() -> bool:
                return (await session.get_variable("temperature")).optimizer_id == expected
            return check

        async with trio.open_nursery() as nursery:
            call = trio.CancelScope()

            async def hold() -> None:
                with call:
                    await session.execute(tool, {"name": "temperature", "values": [1.9], "hold": 30.0})

            nursery.start_soon(hold)
            await wait_for(await holder_is(optimizer))

            async def written() -> bool:  # the tool takes the lock, then writes through it
                return (await session.get_variable("temperature")).value == 1.9

            await wait_for(written)
            with pytest.raises(VariableLockedError, match=optimizer):
                await session.set_variable("temperature", 0.1)
            with pytest.raises(VariableLockedError):
                async with session.optimizing("temperature", optimizer_id="grid"):
                    pass
            assert await session.execute("write", {"name": "temperature", "value": 0.2}) == "VariableLockedError"
            call.cancel()
        await wait_for(await holder_is(None))
        await session.set_variable("temperature", 0.3)

        # Fails inside the block: released all the same.
        with pytest.raises(ToolError, match="the optimizer failed"):
            await session.execute(tool, {"name": "temperature", "values": [0.4], "fail": True})
        variable = await session.get_variable("temperature")
        assert (variable.optimizer_id, variable.value) == (None, 0.4)
        await session.set_variable("temperature", 0.5)


async def test_a_tool_sees_the_hosts_optimizer_lock_and_is_refused_while_it_is_held():
    async with open_pool_in_threads(VARIABLES, size=1) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.7)
        assert (await session.execute("read", {"name": "temperature"}))["optimizer_id"] is None
        async with session.optimizing("temperature", optimizer_id="grid") as opt:
            await opt.set(0.8)
            seen = await session.execute("read", {"name": "temperature"})
            assert (seen["optimizer_id"], seen["value"]) == ("grid", 0.8)
            assert await session.execute("write", {"name": "temperature", "value": 0.9}) == "VariableLockedError"
        assert (await session.execute("read", {"name": "temperature"}))["optimizer_id"] is None
        assert await session.execute("write", {"name": "temperature", "value": 0.9}) == "ok"


async def test_a_worker_watcher_gets_every_change_within_its_buffer_and_the_latest_beyond():
    async with open_pool_in_threads(VARIABLES, size=1) as pool, pool.session() as session:
        await session.register_variable("steps", "integer", 0)
        # Within its buffer: all of them, in order.
        seen = await session.execute("watch_burst", {"name": "steps", "count": 20, "buffer_size": 100, "pause": 0.0})
        assert seen == [["initial", None, 0, 0]] + [["change", i - 1, i, 0] for i in range(1, 21)]
        # Not reading while 20 changes arrive, with room for 5: the latest, and what it skipped.
        await session.set_variable("steps", 0)
        seen = await session.execute("watch_burst", {"name": "steps", "count": 20, "buffer_size": 5, "pause": 1.0})
        assert seen == [["initial", None, 0, 0], ["change", 0, 20, 19]]


async def test_a_host_watcher_has_a_buffer_size():
    async with open_pool_in_threads(VARIABLES, size=1) as pool, pool.session() as session:
        await session.register_variable("t", "integer", 0)
        async with session.watch_variables(["t"], include_initial=False, buffer_size=3) as updates:
            for value in range(1, 4):
                await session.set_variable("t", value)
            assert [u.new_value for u in await updates.next_batch()] == [1, 2, 3]
            for value in range(4, 8):
                await session.set_variable("t", value)
            (update,) = await updates.next_batch()
            assert (update.old_value, update.new_value, update.coalesced) == (3, 7, 3)
            assert await session.execute("write", {"name": "t", "value": 8}) == "ok"  # writes from workers too
            assert [(u.new_value, u.coalesced) for u in await updates.next_batch()] == [(8, 0)]
