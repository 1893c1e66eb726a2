"""The in-memory backend: sessions with TTLs on the Trio clock, quotas, and watching."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_bridge import QuotaExceededError, SessionNotFoundError, VariableNotFoundError
from trio_bridge._state.backend import MemoryBackend
from trio_bridge._state.sessions import SessionStore


async def test_a_full_store_of_sessions_with_ten_variables_expires_on_time(autojump_clock):
    backend = MemoryBackend(SessionStore(max_sessions=2_000))
    ended: list[str] = []
    backend.on_session_end.append(ended.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        for i in range(2_000):
            info = await backend.create_session(f"s{i}", ttl=60 if i % 2 else 120, metadata=None)
            for j in range(10):
                await backend.register_variable(info.id, f"v{j}", "integer", j, constraints=None, metadata=None, source="host")
        with pytest.raises(QuotaExceededError, match="max_sessions"):
            await backend.create_session(None, ttl=60, metadata=None)
        start = trio.current_time()
        await trio.sleep(59.9)
        assert ended == []
        await trio.sleep(0.2)
        assert len(ended) == 1000 and all(int(s[1:]) % 2 for s in ended)
        assert trio.current_time() - start < 60.2
        await backend.touch_session("s0")  # used: lives on for another 120 s
        await trio.sleep(60)
        assert len(ended) == 1999 and "s0" not in ended
        with pytest.raises(SessionNotFoundError):
            await backend.get_session("s2")
        nursery.cancel_scope.cancel()


async def test_cleanup_is_idempotent_and_ends_watchers():
    backend = MemoryBackend()
    await backend.create_session("a", ttl=None, metadata={"user": "x"})
    await backend.register_variable("a", "t", "float", 1.0, constraints=None, metadata=None, source="host")
    async with backend.watch("a", ["t"], include_initial=False) as watcher:
        assert await backend.cleanup_session("a") is True
        assert await backend.cleanup_session("a") is False
        assert await backend.cleanup_session("never-existed") is False
        assert [u async for u in watcher] == []


async def test_watch_delivers_initial_values_then_changes_in_order():
    backend = MemoryBackend()
    await backend.create_session("a", ttl=None, metadata=None)
    await backend.register_variable("a", "t", "float", 0.5, constraints=None, metadata=None, source="host")
    await backend.register_variable("a", "n", "integer", 1, constraints=None, metadata=None, source="host")
    got = []
    async with backend.watch("a", ["t", "n"], include_initial=True) as watcher:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for update in watcher:
                    got.append((update.kind, update.name, update.new_value, update.version))
                    if len(got) == 5:
                        return

            nursery.start_soon(read)
            for value in (0.6, 0.7):
                await trio.testing.wait_all_tasks_blocked()
                await backend.set_variable("a", "t", value, expected_version=None, source="host", optimizer_id=None, metadata=None)
            await trio.testing.wait_all_tasks_blocked()
            await backend.set_variable("a", "t", 0.7, expected_version=None, source="host", optimizer_id=None, metadata=None)  # equal: no news
            await backend.delete_variable("a", "n", source="host")
    assert got == [
        ("initial", "t", 0.5, 0), ("initial", "n", 1, 0),
        ("change", "t", 0.6, 1), ("change", "t", 0.7, 2),
        ("delete", "n", None, 1),
    ]


async def test_slow_watcher_never_blocks_writers_and_gets_the_latest_value():
    backend = MemoryBackend()
    await backend.create_session("a", ttl=None, metadata=None)
    await backend.register_variable("a", "t", "integer", 0, constraints=None, metadata=None, source="host")
    async with backend.watch("a", ["t"], include_initial=False) as watcher:
        for i in range(1, 10_001):  # nobody reads meanwhile; writers never wait
            await backend.set_variable("a", "t", i, expected_version=None, source="host", optimizer_id=None, metadata=None)
        (update,) = await watcher.next_batch()
    assert (update.old_value, update.new_value, update.version) == (0, 10_000, 10_000)
    assert update.coalesced == 9_999 and watcher.coalesced == 9_999


async def test_watching_an_unknown_variable_is_refused():
    backend = MemoryBackend()
    await backend.create_session("a", ttl=None, metadata=None)
    with pytest.raises(VariableNotFoundError):
        async with backend.watch("a", ["nope"], include_initial=True):
            pass


async def test_state_version_counts_changes_only():
    backend = MemoryBackend()
    await backend.create_session("a", ttl=None, metadata=None)
    _, v1 = await backend.register_variable("a", "t", "float", 1.0, constraints=None, metadata=None, source="host")
    _, v2 = await backend.set_variable("a", "t", 1.0, expected_version=None, source="host", optimizer_id=None, metadata=None)
    _, v3 = await backend.set_variable("a", "t", 2.0, expected_version=None, source="host", optimizer_id=None, metadata=None)
    assert (v1, v2, v3) == (1, 1, 2)


async def test_the_backend_keeps_the_quotas_it_was_given():
    backend = MemoryBackend(SessionStore(max_sessions=2, max_variables_per_session=1))
    await backend.create_session("a", ttl=None, metadata=None)
    await backend.create_session("b", ttl=None, metadata=None)
    with pytest.raises(QuotaExceededError, match="2 sessions"):
        await backend.create_session("c", ttl=None, metadata=None)
    await backend.register_variable("a", "x", "boolean", True, constraints=None, metadata=None, source="host")
    with pytest.raises(QuotaExceededError, match="max_variables"):
        await backend.register_variable("a", "y", "boolean", True, constraints=None, metadata=None, source="host")
