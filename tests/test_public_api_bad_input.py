"""Bad input through the public API: only TrioBridgeError subclasses, and nothing changes.

Driven by hypothesis over a real Pool backed by fake workers (``trio_bridge.testing``), so every
public entry point -- calls, sessions, variables -- sees arbitrary values in milliseconds.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_bridge
from trio_bridge import InvalidArgumentError, TrioBridgeError
from trio_bridge.testing import open_fake_pool

junk = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
    | st.sampled_from([object(), {1, 2}, np.zeros(2, dtype=object), np.arange(3), 1 + 2j, Ellipsis])
    | st.builds(pow, st.sampled_from([10, -10]), st.sampled_from([5001, 6001])),  # past the int<->str limit
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3),
    max_leaves=8,
)
TYPES = ["float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor", "nonsense"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def echo(value: object = None) -> object:
    return value


def typed(x: list[float], y: dict[str, int] | None = None) -> float:
    return sum(x)


def _run(scenario):
    trio.run(scenario)


@SETTINGS
@given(tool=st.sampled_from(["echo", "typed", "nope"]), arguments=junk)
def test_calls_with_junk_raise_only_our_errors(tool, arguments):
    async def scenario() -> None:
        async with open_fake_pool({"echo": echo, "typed": typed}, size=1) as (pool, _):
            try:
                await pool.execute(tool, arguments)  # type: ignore[arg-type]
            except TrioBridgeError:
                pass
            assert await pool.execute("echo", {"value": 1}) == 1  # the pool is unharmed

    _run(scenario)


@SETTINGS
@given(type_name=st.sampled_from(TYPES), value=junk, new=junk, constraints=junk, metadata=junk)
def test_variables_with_junk_raise_only_our_errors_and_a_refused_write_changes_nothing(
    type_name, value, new, constraints, metadata
):
    async def scenario() -> None:
        async with open_fake_pool({"echo": echo}, size=1) as (pool, _), pool.session() as session:
            try:
                await session.register_variable("v", type_name, value, constraints=constraints, metadata=metadata)
            except TrioBridgeError:
                with pytest.raises(TrioBridgeError):
                    await session.get_variable("v")  # nothing was registered
                return
            before = await session.get_variable("v")
            try:
                await session.set_variable("v", new, metadata=metadata)
            except TrioBridgeError:
                after = await session.get_variable("v")
                assert (after.version, after.metadata) == (before.version, before.metadata)
                assert trio_bridge_values_equal(after.value, before.value)

    _run(scenario)


@SETTINGS
@given(session_id=st.none() | st.text(max_size=200) | junk, ttl=junk, metadata=junk, affinity=junk)
def test_sessions_with_junk_raise_only_our_errors(session_id, ttl, metadata, affinity):
    async def scenario() -> None:
        async with open_fake_pool({"echo": echo}, size=1) as (pool, _):
            try:
                async with pool.session(session_id, ttl=ttl, metadata=metadata, affinity=affinity) as session:
                    assert await session.execute("echo", {"value": 2}) == 2
            except TrioBridgeError:
                pass

    _run(scenario)


async def test_session_errors_are_the_real_ones(autojump_clock):
    async with open_fake_pool({"echo": echo}, size=1) as (pool, _):
        with pytest.raises(InvalidArgumentError, match="session id"):
            async with pool.session("bad id!"):
                pass
        with pytest.raises(InvalidArgumentError, match="ttl"):
            async with pool.session("fresh", ttl=-1):
                pass
        async with pool.session("shared", ttl=60, metadata={"owner": "a"}) as first:
            async with pool.session("shared") as joined:  # joining as it is: fine
                assert joined.id == first.id
            with pytest.raises(InvalidArgumentError, match="exists with ttl=60"):
                async with pool.session("shared", ttl=5):
                    pass
            with pytest.raises(InvalidArgumentError, match="other metadata"):
                async with pool.session("shared", metadata={"owner": "b"}):
                    pass
            assert (await first.info()).ttl == 60  # unchanged


@pytest.mark.real_process
def test_using_the_api_outside_trio_says_so_in_one_line():
    async def from_asyncio() -> None:
        async with trio_bridge.open_pool("tests.adapters:Echo"):
            pass

    # After a pool has run in this process (its asyncio boundary included), a user's asyncio.run
    # gets the one-line error, whatever the loop.
    async def a_pool_first() -> None:
        async with trio_bridge.open_pool("tests.adapters:Echo", size=1) as pool:
            assert await pool.execute("add", {"a": 1}) == 3

    trio.run(a_pool_first)
    with pytest.raises(RuntimeError, match=r"^trio-bridge runs under Trio: use trio.run") as raised:
        asyncio.run(from_asyncio())
    assert "\n" not in str(raised.value)


def trio_bridge_values_equal(a: object, b: object) -> bool:
    from trio_bridge._state.types import values_equal

    return values_equal(a, b)
