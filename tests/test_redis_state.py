"""Redis as the shared state of several hosts (each host here is its own ``RedisBackend``, or its
own pool, on one real server): writes seen across hosts, watches across hosts, atomicity from
Redis itself, leases that lapse, and an outage that fails calls clearly and loses no change."""

from __future__ import annotations

import os
import signal
import uuid

import pytest
import trio

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import (
    Lifecycle,
    RedisBackend,
    StateUnavailableError,
    VariableLockedError,
    VersionConflictError,
    WorkerCrashedError,
)
from trio_bridge.testing import open_pool_in_threads


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def _hosts(nursery, url: str, count: int = 2, **options) -> list[RedisBackend]:
    prefix, hosts = _prefix(), []
    for _ in range(count):
        host = RedisBackend(url, prefix=prefix, **options)
        await nursery.start(host.run)
        hosts.append(host)
    return hosts


async def _set(backend, session, name, value, **kw):
    options = {"expected_version": None, "source": "host", "optimizer_id": None, "metadata": None} | kw
    return await backend.set_variable(session, name, value, **options)


async def test_two_hosts_share_a_session_its_watches_batches_and_its_end(nursery, redis_server):
    a, b = await _hosts(nursery, redis_server.url)
    ended_on_b: list[str] = []
    b.on_session_end.append(ended_on_b.append)
    session = (await a.create_session("user-42", ttl=None, metadata={"team": "x"})).id
    await a.register_variable(session, "t", "float", 0.5, constraints={"max": 1.0}, metadata=None, source="host")
    await a.register_variable(session, "k", "integer", 1, constraints=None, metadata=None, source="host")
    assert dict((await b.get_session(session)).metadata) == {"team": "x"}

    async with b.watch(session, ["t", "k"], include_initial=True) as watcher:
        for value in (0.6, 0.7, 0.8):
            await _set(a, session, "t", value)
        with pytest.raises(Exception, match="max"):  # atomic: the valid half is not written either
            await a.set_variables(session, {"k": 2, "t": 5.0}, atomic=True, source="host", optimizer_id=None)
        await a.set_variables(session, {"k": 3, "t": 0.9}, atomic=True, source="host", optimizer_id=None)
        seen = []
        with trio.fail_after(10):
            while len(seen) < 7:
                seen += [(u.name, u.new_value) for u in await watcher.next_batch()]
    assert seen == [("t", 0.5), ("k", 1), ("t", 0.6), ("t", 0.7), ("t", 0.8), ("k", 3), ("t", 0.9)]
    found, version_on_b = await b.get_variables(session, None)
    assert (found["t"].value, found["k"].value) == (0.9, 3)
    assert version_on_b == (await a.get_session(session)).state_version

    await a.cleanup_session(session)
    await wait_for(lambda: ended_on_b == ["user-42"], timeout=5)  # B learns of the end too


async def test_concurrent_read_modify_writes_from_two_hosts_lose_nothing(nursery, redis_server):
    a, b = await _hosts(nursery, redis_server.url)
    session = (await a.create_session(None, ttl=None, metadata=None)).id
    await a.register_variable(session, "n", "integer", 0, constraints=None, metadata=None, source="host")
    conflicts = 0

    async def increment(host: RedisBackend, times: int) -> None:
        nonlocal conflicts
        for _ in range(times):
            while True:
                found, _ = await host.get_variables(session, ["n"])
                try:
                    await _set(host, session, "n", found["n"].value + 1, expected_version=found["n"].version)
                    break
                except VersionConflictError:
                    conflicts += 1

    async with trio.open_nursery() as writers:
        for host in (a, b, a, b):
            writers.start_soon(increment, host, 25)
    found, _ = await b.get_variables(session, ["n"])
    assert (found["n"].value, found["n"].version) == (100, 100)
    assert conflicts > 0  # they did race, and expected_version caught every race


async def test_an_optimization_lock_whose_holder_stops_renewing_lapses(nursery, redis_server):
    a, b = await _hosts(nursery, redis_server.url, lock_lease=0.3)
    session = (await a.create_session(None, ttl=None, metadata=None)).id
    await a.register_variable(session, "t", "float", 0.5, constraints=None, metadata=None, source="host")
    await a.set_optimization(session, "t", "optimizer-on-a", active=True)  # then its holder "dies"
    with pytest.raises(VariableLockedError):
        await b.set_optimization(session, "t", "optimizer-on-b", active=True)
    await trio.sleep(0.5)
    assert (await b.set_optimization(session, "t", "optimizer-on-b", active=True)).optimizer_id == "optimizer-on-b"


async def test_an_outage_fails_calls_clearly_and_watchers_resume_without_losing_a_change(nursery, tmp_path):
    from trio_bridge.testing import RedisServer

    server = RedisServer(tmp_path, durable=True).start()
    try:
        a, b = await _hosts(nursery, server.url, timeout=1.0)
        session = (await a.create_session(None, ttl=None, metadata=None)).id
        await a.register_variable(session, "n", "integer", 0, constraints=None, metadata=None, source="host")
        async with b.watch(session, ["n"], include_initial=False) as watcher:
            await _set(a, session, "n", 1)
            await _set(a, session, "n", 2)  # not read by the watcher before the outage
            server.stop()
            with trio.fail_after(5):  # a clear error, soon: nothing hangs
                with pytest.raises(StateUnavailableError, match="unavailable"):
                    await _set(a, session, "n", 99)
                with pytest.raises(StateUnavailableError):
                    await b.get_variables(session, None)
            server.start()  # same port, same data
            await _set(a, session, "n", 3)
            seen: list[int] = []
            with trio.fail_after(15):
                while len(seen) < 3:
                    seen += [u.new_value for u in await watcher.next_batch()]
        assert seen == [1, 2, 3]
        assert (await b.get_variables(session, ["n"]))[0]["n"].version == 3  # the refused write left nothing
    finally:
        server.stop()


async def test_two_pools_on_one_redis_share_a_session_and_read_their_writes(redis_server):
    url = redis_server.url
    async with open_pool_in_threads("tests.state_adapters:Stateful", size=1, state=url) as host_a, \
            open_pool_in_threads("tests.state_adapters:Stateful", size=1, state=url) as host_b:
        async with host_a.session("shared-" + uuid.uuid4().hex[:6]) as on_a:
            await on_a.register_variable("temperature", "float", 0.5)
            async with host_b.session(on_a.id) as on_b:  # joins it
                assert (await on_b.execute("read", {"name": "temperature"}))["value"] == 0.5
                for value in (0.6, 0.7):
                    await on_a.set_variable("temperature", value)
                    # read-your-writes: B's next call sees what A's call returned having written
                    assert (await on_b.execute("read", {"name": "temperature"}))["value"] == value
                written = await on_b.execute("write", {"name": "temperature", "value": 0.9})
                assert written["version"] == 3
                assert (await on_a.get_variable("temperature")).value == 0.9


@pytest.mark.parametrize("tool", ["optimize", "aoptimize"])
async def test_a_live_holder_renews_its_lease_so_its_lock_outlasts_it(redis_server, tool):
    # A lease of 0.5 s is renewed every ~0.17 s: a stall of over 0.3 s on a loaded machine would lapse it.
    backend = RedisBackend(redis_server.url, prefix=_prefix(), lock_lease=0.5)
    async with open_pool_in_threads("tests.state_adapters:Variables", size=1, state=backend) as pool:
        async with pool.session() as session:
            await session.register_variable("t", "float", 0.0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.execute, tool, {"name": "t", "values": [0.1], "hold": 1.6})
                await wait_for(lambda: _locked(session), timeout=5)
                await trio.sleep(1.1)  # more than two leases: the worker renewed it
                with pytest.raises(VariableLockedError):
                    await session.set_variable("t", 0.5)
            assert (await session.set_variable("t", 0.5)).value == 0.5  # released at the block's end

            async with session.optimizing("t", optimizer_id="host-optimizer") as opt:  # the host renews its own
                await trio.sleep(1.1)
                with pytest.raises(VariableLockedError):
                    await backend.set_optimization(session.id, "t", "someone-else", active=True)
                await opt.set(0.6)
            assert (await session.get_variable("t")).optimizer_id is None


async def _locked(session) -> bool:
    return (await session.get_variable("t")).optimizer_id is not None


@pytest.mark.real_process
async def test_a_lock_held_by_a_killed_optimizer_lapses(redis_server):
    backend = RedisBackend(redis_server.url, prefix=_prefix(), lock_lease=0.5)
    async with trio_bridge.open_pool("tests.state_adapters:Variables", size=1, state=backend,
                                     lifecycle=Lifecycle(restart_backoff=(0.05, 0.1))) as pool:
        async with pool.session() as session:
            await session.register_variable("t", "float", 0.0)
            async with trio.open_nursery() as nursery:
                async def optimizer() -> None:
                    with pytest.raises(WorkerCrashedError):
                        await session.execute("optimize", {"name": "t", "values": [0.1], "hold": 60})

                nursery.start_soon(optimizer)
                await wait_for(lambda: _locked(session), timeout=10)
                os.kill(pool.workers()[0].pid, signal.SIGKILL)  # the holder dies with its lock
            with trio.fail_after(5):
                while await _locked(session):
                    await trio.sleep(0.05)
            assert (await session.set_variable("t", 0.9)).value == 0.9
