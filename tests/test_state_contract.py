"""One contract, two backends: every behaviour a pool relies on holds on the in-memory backend and
on Redis (a real server) alike -- sessions, quotas, typed versioned variables, batches, history,
dependencies, locks, watches and TTLs."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import trio

from trio_bridge import (
    DependencyCycleError,
    InvalidArgumentError,
    InvalidVariableError,
    MemoryBackend,
    QuotaExceededError,
    RedisBackend,
    SessionExistsError,
    SessionNotFoundError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from trio_bridge._state.sessions import SessionStore

QUOTAS = {"max_sessions": 5, "max_variables_per_session": 4, "max_value_bytes": 10_000, "history_limit": 3}


@pytest.fixture(params=["memory", "redis"])
async def backend(request, nursery, redis_server):
    if request.param == "memory":
        state = MemoryBackend(SessionStore(**QUOTAS))
    else:
        state = RedisBackend(redis_server.url, prefix=f"test-{uuid.uuid4().hex[:8]}", **QUOTAS)
    await nursery.start(state.run)
    return state


async def _register(backend, session: str, name: str = "t", type_name: str = "float", value=0.5, **kw):
    options = {"constraints": None, "metadata": None, "source": "host"} | kw
    return await backend.register_variable(session, name, type_name, value, **options)


async def _set(backend, session: str, name: str, value, **kw):
    options = {"expected_version": None, "source": "host", "optimizer_id": None, "metadata": None} | kw
    return await backend.set_variable(session, name, value, **options)


async def test_sessions_are_created_found_refused_and_ended_once(backend):
    ended: list[str] = []
    backend.on_session_end.append(ended.append)
    info = await backend.create_session("user-42", ttl=60, metadata={"team": "a"})
    assert (info.id, info.ttl, dict(info.metadata), info.variable_count, info.state_version) == ("user-42", 60, {"team": "a"}, 0, 0)
    random_id = (await backend.create_session(None, ttl=None, metadata=None)).id
    assert random_id.startswith("s_")
    for bad, error in (
        (dict(session_id="user-42", ttl=None, metadata=None), SessionExistsError),
        (dict(session_id="bad id!", ttl=None, metadata=None), InvalidArgumentError),
        (dict(session_id="x", ttl=-1, metadata=None), InvalidArgumentError),
        (dict(session_id="y", ttl=None, metadata={1: 2}), InvalidArgumentError),
    ):
        with pytest.raises(error):
            await backend.create_session(**bad)
    for i in range(3):
        await backend.create_session(f"more-{i}", ttl=None, metadata=None)
    with pytest.raises(QuotaExceededError, match="max_sessions"):
        await backend.create_session("one-too-many", ttl=None, metadata=None)
    for missing in ("x", "y", "one-too-many"):
        with pytest.raises(SessionNotFoundError):
            await backend.get_session(missing)
    touched = await backend.touch_session("user-42")
    assert touched.last_used >= info.last_used
    assert await backend.cleanup_session("user-42") is True
    assert await backend.cleanup_session("user-42") is False
    assert ended == ["user-42"]
    with pytest.raises(SessionNotFoundError):
        await backend.get_variables("user-42", None)
    await backend.create_session("user-42", ttl=None, metadata=None)  # the id is free again


async def test_typed_versioned_variables_and_refusals_that_change_nothing(backend):
    session = (await backend.create_session(None, ttl=None, metadata=None)).id
    variable, version = await _register(backend, session, constraints={"min": 0.0, "max": 1.0})
    assert (variable.value, variable.version, version) == (0.5, 0, 1)
    found, _ = await backend.get_variables(session, [variable.id])  # by id, too
    assert found["t"].value == 0.5
    variable, version = await _set(backend, session, "t", 0.7, expected_version=0)
    assert (variable.version, version) == (1, 2)
    same, version = await _set(backend, session, "t", 0.7)
    assert (same.version, version) == (1, 2)  # an equal value is no change
    for value, kw, error in (
        (0.9, {"expected_version": 0}, VersionConflictError),
        (1.5, {}, InvalidVariableError),
        ("hot", {}, InvalidVariableError),
        (0.9, {"metadata": {"k": object()}}, InvalidVariableError),
    ):
        with pytest.raises(error):
            await _set(backend, session, "t", value, **kw)
    with pytest.raises(QuotaExceededError, match="max_value_bytes"):
        await _register(backend, session, "big", "string", "x" * 20_000)
    with pytest.raises(VariableNotFoundError):
        await _set(backend, session, "nope", 1.0)
    found, version = await backend.get_variables(session, None)
    assert list(found) == ["t"] and (found["t"].value, found["t"].version, version) == (0.7, 1, 2)

    await _register(backend, session, "w", "tensor", np.arange(6, dtype=np.float32).reshape(2, 3))
    found, _ = await backend.get_variables(session, ["w"])
    assert found["w"].value.dtype == np.float32 and found["w"].value.shape == (2, 3)
    await _register(backend, session, "n", "integer", 10**5000)  # past Python's int<->str limit
    assert (await backend.get_variables(session, ["n"]))[0]["n"].value == 10**5000
    await _register(backend, session, "c", "choice", "a", constraints={"choices": ["a", "b"]})
    with pytest.raises(QuotaExceededError, match="4 variables"):
        await _register(backend, session, "fifth", "integer", 1)
    assert [v.name for v in await backend.list_variables(session, "[cn]")] == ["c", "n"]


async def test_batches_history_rollback_dependencies_locks_and_delete(backend):
    session = (await backend.create_session(None, ttl=None, metadata=None)).id
    await _register(backend, session, "a", "integer", 1)
    await _register(backend, session, "b", "integer", 2, constraints={"max": 10})
    with pytest.raises(InvalidVariableError):
        await backend.set_variables(session, {"a": 5, "b": 50}, atomic=True, source="host", optimizer_id=None)
    found, version = await backend.get_variables(session, None)
    assert (found["a"].value, found["b"].value) == (1, 2)  # all or nothing
    results, version_after = await backend.set_variables(session, {"a": 5, "b": 50}, atomic=False, source="host", optimizer_id=None)
    assert results["a"].value == 5 and isinstance(results["b"], InvalidVariableError) and version_after == version + 1

    for value in (6, 7, 8):
        await _set(backend, session, "a", value)
    history = await backend.variable_history(session, "a")
    assert [(h.version, h.value) for h in history] == [(2, 6), (3, 7), (4, 8)]  # history_limit 3
    rolled, _ = await backend.rollback_variable(session, "a", 3, source="host", optimizer_id=None)
    assert (rolled.value, rolled.version) == (7, 5)
    with pytest.raises(VariableNotFoundError, match="no version 0"):
        await backend.rollback_variable(session, "a", 0, source="host", optimizer_id=None)

    assert (await backend.add_dependency(session, "a", "b")).depends_on == ("b",)
    with pytest.raises(DependencyCycleError):
        await backend.add_dependency(session, "b", "a")

    await backend.set_optimization(session, "b", "opt-1", active=True)
    with pytest.raises(VariableLockedError):
        await _set(backend, session, "b", 3)
    with pytest.raises(VariableLockedError):
        await backend.set_optimization(session, "b", "opt-2", active=True)
    with pytest.raises(VariableLockedError):
        await backend.delete_variable(session, "b", source="host")
    assert (await _set(backend, session, "b", 3, optimizer_id="opt-1"))[0].value == 3
    assert (await backend.set_optimization(session, "b", "opt-1", active=False)).optimizer_id is None
    await backend.delete_variable(session, "b", source="host")
    found, _ = await backend.get_variables(session, None)
    assert list(found) == ["a"] and found["a"].depends_on == ()  # the edge went with it


async def test_a_watch_gets_every_change_in_order_then_the_latest_when_behind_and_ends_with_the_session(backend):
    session = (await backend.create_session(None, ttl=None, metadata=None)).id
    await _register(backend, session, "n", "integer", 0)
    await _register(backend, session, "other", "integer", 0)
    with pytest.raises(VariableNotFoundError):
        async with backend.watch(session, ["n", "nope"], include_initial=True):
            pass
    with pytest.raises(InvalidArgumentError):
        async with backend.watch(session, ["n"], include_initial=True, buffer_size=0):
            pass
    async with backend.watch(session, ["n"], include_initial=True, buffer_size=8) as watcher:
        for value in range(1, 6):  # quick writes: none may be lost
            await _set(backend, session, "n", value)
            await _set(backend, session, "other", value)  # not watched
        seen = []
        with trio.fail_after(10):
            while len(seen) < 6:
                seen += [(u.kind, u.new_value, u.version, u.coalesced) for u in await watcher.next_batch()]
        assert seen == [("initial", 0, 0, 0)] + [("change", v, v, 0) for v in range(1, 6)]

        for value in range(6, 36):  # 30 changes: more than its buffer of 8
            await _set(backend, session, "n", value)
        with trio.fail_after(10):
            batch = await watcher.next_batch()
        assert [(u.old_value, u.new_value, u.version, u.coalesced) for u in batch] == [(5, 35, 35, 29)]
        assert watcher.coalesced == 29

        await _set(backend, session, "n", 36)
        await backend.cleanup_session(session)
        with trio.fail_after(10):
            rest = [u.new_value async for u in watcher]
        assert rest == [36]  # what was pending, then the end


async def test_sessions_expire_after_their_ttl_without_use(backend):
    ended: list[str] = []
    backend.on_session_end.append(ended.append)
    await backend.create_session("short", ttl=0.4, metadata=None)
    await backend.create_session("kept", ttl=None, metadata=None)
    await _register(backend, "short", "t", "integer", 1)
    with trio.fail_after(5):
        while not ended:
            await trio.sleep(0.05)
    assert ended == ["short"]
    with pytest.raises(SessionNotFoundError):
        await backend.get_session("short")
    assert (await backend.get_session("kept")).id == "kept"
