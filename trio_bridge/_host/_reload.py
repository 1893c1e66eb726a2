"""New code without a restart: :meth:`Pool.reload` replaces the pool's local workers, one slot
at a time, with workers that import the adapter's code afresh.

Each slot's worker is replaced as a recycle replaces it (:meth:`Supervisor.recycle_now`): the
new worker starts and becomes ready first, takes the slot, and the old one finishes its calls
and exits. One slot at a time, so capacity never drops below the pool's size, no call fails,
and sessions and their variables (host state) are untouched. Before the first slot, the
launcher makes sure new workers import the code afresh (``fresh_code``: a pool with a fork
server starts a new one, a fresh preload of the adapter's module, and keeps the old one for the
workers it forked; spawned workers are fresh interpreters anyway).

Remote workers are not replaced: their code is on their machine (``trio-bridge worker``
reloads on SIGHUP there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from trio_bridge._errors import PoolClosedError, WorkerStartError
from trio_bridge._host._supervisor import Supervisor

_logger = logging.getLogger("trio_bridge")
RELOAD = "reload"  # the kind of recycle a reload is (Supervisor.recycles, PoolStatistics.recycles)


class Reloader:
    """Runs :meth:`Pool.reload`, one reload at a time.

    Args:
        supervisor: the pool's workers.
        adapter: the adapter's path (for the log).
        local_slots: the pool's local slots (``0 .. local_slots - 1``); the others are remote.
        fresh_code: for the block, new local workers import the adapter's code afresh; if the
            block raises, what started them before serves again.
    """

    def __init__(
        self, supervisor: Supervisor, *, adapter: str, local_slots: int,
        fresh_code: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self._supervisor = supervisor
        self._adapter = adapter
        self._local_slots = local_slots
        self._fresh_code = fresh_code
        self._lock = trio.Lock()  # fair: concurrent reloads run one after the other, in order

    async def reload(self) -> int:
        """Replace each local slot's worker in turn; see :meth:`Pool.reload`. Returns the
        number replaced.

        Raises:
            WorkerStartError: a new worker could not start (the adapter's new code fails to
                import, or its ``setup()`` raised): that slot and the next keep their workers.
            PoolClosedError: the pool is closing.
        """
        async with self._lock:
            if self._supervisor.closing:
                raise PoolClosedError("the pool is closed: nothing to reload")
            replaced = 0
            try:
                async with self._fresh_code():
                    for slot in range(self._local_slots):
                        if await self._supervisor.recycle_now(slot, RELOAD, "pool.reload() asked for the adapter's code afresh"):
                            replaced += 1
            except WorkerStartError as error:
                _logger.error(
                    "pool.reload() of %s failed: %s; %d of %d local worker(s) were replaced, the others serve the code they had",
                    self._adapter, error, replaced, self._local_slots,
                )
                error.add_note(f"pool.reload(): {replaced} of {self._local_slots} local worker(s) were replaced before it; the others serve on")
                raise
            except PoolClosedError:
                closed = True
            else:
                closed = self._supervisor.closing
            if closed:
                raise PoolClosedError(f"the pool closed during pool.reload() ({replaced} worker(s) replaced)")
            _logger.info("pool.reload() of %s: %d worker(s) replaced", self._adapter, replaced)
            return replaced
