"""A pytest plugin for test suites of code that uses trio-bridge (with pytest-trio).

Enable it in your ``conftest.py``::

    pytest_plugins = ["trio_bridge.testing.pytest_plugin"]

and a test gets real pools -- :func:`~trio_bridge.open_pool`, worker processes and all -- from
the :func:`trio_bridge_pool` fixture::

    async def test_predict(trio_bridge_pool):
        pool = await trio_bridge_pool("myapp.adapters:Inference", size=2)
        assert await pool.execute("predict", {"x": [1.0, 2.0]}) == [0, 1]

Each pool is opened in a task of the fixture's nursery (within the test's Trio run) and closed
when the test ends, however it ends: its workers drain, and no worker process is left.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
import trio

from trio_bridge._host._pool import Pool, open_pool

__all__ = ["PoolFactory", "trio_bridge_pool"]


class PoolFactory(Protocol):
    """What :func:`trio_bridge_pool` gives a test: ``await factory(adapter, **options)``."""

    async def __call__(self, adapter: str, /, **options: Any) -> Pool:
        """Open ``open_pool(adapter, **options)`` until the test ends; the pool, once its
        workers are ready.

        Raises:
            WorkerStartError, InvalidArgumentError, TypeError: as ``open_pool``.
        """
        ...


@pytest.fixture
async def trio_bridge_pool() -> AsyncIterator[PoolFactory]:
    """A factory of real pools for one test (pytest-trio): ``pool = await
    trio_bridge_pool("myapp.adapters:Inference", size=2, adapter_options={...})`` opens
    :func:`~trio_bridge.open_pool` with those arguments (give ``size``: its default is one
    worker per CPU) and returns the pool once its workers are ready. Pools stay open for the
    rest of the test and are closed, their workers drained and stopped, when it ends, in the
    reverse order of opening.

    Raises:
        WorkerStartError, InvalidArgumentError, TypeError: from the factory, as ``open_pool``
            raises them.
    """
    opened: list[tuple[trio.Event, trio.Event]] = []  # (stop, stopped) of each pool

    async def serve(
        adapter: str, options: dict[str, Any], stop: trio.Event, stopped: trio.Event, *,
        task_status: trio.TaskStatus[Pool],
    ) -> None:
        try:
            async with open_pool(adapter, **options) as pool:
                task_status.started(pool)
                await stop.wait()
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:

        async def open_one(adapter: str, /, **options: Any) -> Pool:
            stop, stopped = trio.Event(), trio.Event()
            pool: Pool = await nursery.start(serve, adapter, options, stop, stopped)
            opened.append((stop, stopped))
            return pool

        try:
            yield open_one
        finally:
            while opened:  # the newest first: a later pool may use an earlier one
                stop, stopped = opened.pop()
                stop.set()
                await stopped.wait()
