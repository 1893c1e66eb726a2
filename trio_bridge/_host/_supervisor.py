"""Supervision: keep ``size`` workers running -- start them, restart the dead, ping, shut down.

Each slot is owned by one task (:meth:`Supervisor._supervise`) in the pool's nursery: it runs
the slot's :class:`WorkerHandle` and, when the worker dies, logs why (once) and starts a
replacement after a backoff that doubles on each failure in a row (reset once a worker has
lived ``_STABLE_AFTER`` seconds). A worker that fails its health check is recycled.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from functools import partial

import trio

from trio_bridge._errors import WorkerCrashedError, WorkerStartError
from trio_bridge._host._dispatch import Dispatcher
from trio_bridge._host._metrics import Metrics
from trio_bridge._host._tools import ToolRegistry
from trio_bridge._host._worker import WorkerHandle, WorkerInfo
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.shared_memory import SharedMemoryPlane

_logger = logging.getLogger("trio_bridge")
_STABLE_AFTER = 10.0    # seconds a worker must live before its slot's restart backoff resets
_SWEEP_INTERVAL = 60.0  # seconds between sweeps of shared-memory segments left by dead processes


class Supervisor:
    """Owns the pool's worker handles, one per slot.

    Args:
        new_worker: makes the handle of a slot's next worker, ``new_worker(worker_id, slot)``;
            the composition root passes the real one (a process), ``trio_bridge.testing`` a fake.
    """

    def __init__(
        self,
        *,
        new_worker: Callable[[str, int], WorkerHandle],
        size: int,
        dispatcher: Dispatcher[WorkerHandle],
        metrics: Metrics,
        tools: ToolRegistry,
        health_check_interval: float,
        restart_backoff: tuple[float, float],
        shutdown_timeout: float,
        plane: SharedMemoryPlane | None,
    ) -> None:
        self.size: int = size
        self.handles: dict[int, WorkerHandle] = {}
        self.closing: bool = False
        self.last_start_error: WorkerStartError | None = None
        """The latest failure to start a replacement; cleared when a worker starts."""
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._tools = tools
        self._health_check_interval = health_check_interval
        self._restart_backoff = restart_backoff
        self._shutdown_timeout = shutdown_timeout
        self.plane: SharedMemoryPlane | None = plane
        self._new_worker = new_worker
        self._worker_ids = itertools.count()
        self._nursery: trio.Nursery | None = None

    # ---- what others read ----
    def workers(self) -> list[WorkerInfo]:
        return [self.handles[slot].info() for slot in sorted(self.handles)]

    @property
    def ready(self) -> int:
        return sum(h.accepting for h in self.handles.values())

    @property
    def capacity(self) -> int:
        """Calls the ready workers can serve at once."""
        return sum(h.concurrency for h in self.handles.values() if h.accepting)

    @property
    def in_flight(self) -> int:
        return sum(h.busy for h in self.handles.values())

    def knows(self, worker_id: str) -> bool:
        """A live worker of this pool has that id (workers ask with their heartbeat)."""
        return any(h.id == worker_id and h.alive for h in self.handles.values())

    def live_handles(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if h.alive]

    # ---- life cycle ----
    async def start(self, nursery: trio.Nursery) -> None:
        """Start every slot's worker at once; return when all are ready.

        Raises:
            WorkerStartError: one failed to start (with a note if several did).
        """
        self._nursery = nursery
        errors: list[WorkerStartError] = []

        async def start_one(slot: int) -> None:
            try:
                await nursery.start(self._supervise, slot)
            except WorkerStartError as error:
                errors.append(error)

        async with trio.open_nursery() as starters:
            for slot in range(self.size):
                starters.start_soon(start_one, slot)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"({len(errors)} of {self.size} workers failed to start)")
            raise errors[0]
        nursery.start_soon(self._health_check)
        if self.plane is not None:
            nursery.start_soon(self._sweep_shared_memory)

    def add_slot(self) -> int:
        """One more slot (a remote worker that joined); its worker starts now, and a failed
        start is retried like a restart. Returns the slot."""
        assert self._nursery is not None, "add_slot() before start()"
        slot = self.size
        self.size += 1
        self._nursery.start_soon(partial(self._supervise, slot, must_start=False))
        return slot

    async def _supervise(
        self, slot: int, *, must_start: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the worker of one slot: start it, and restart it with backoff when it dies.
        ``must_start``: its first failed start raises (the pool's start fails) instead."""
        failures = 0
        first = must_start
        reported = False
        while not self.closing:
            handle = self._new_worker(f"w{next(self._worker_ids)}", slot)
            self.handles[slot] = handle
            lived_from = trio.current_time()
            failed: WorkerStartError | None = None
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(handle.run)
                    self._tools.worker_tools = handle.tools
                    self.last_start_error = None
                    if not reported:
                        task_status.started()
                        reported = True
                    first = False
                    self._dispatcher.add(handle)
                    await handle.exited.wait()
            except* WorkerStartError as group:
                failed = _first(group)
            finally:
                self._dispatcher.remove(handle)
                if self.plane is not None and handle.pid not in (None, os.getpid()) and not handle.remote:
                    self.plane.remove_files_of(handle.pid)
            if failed is not None:
                if first:
                    raise failed
                self.last_start_error = failed
                _logger.warning("worker %s (slot %d) could not start: %s", handle.id, slot, failed)
            if self.closing:
                return
            if handle.started_at is not None:
                _logger.warning(
                    "worker %s (slot %d, pid %s) is gone: %s (exit code %s); restarting the slot",
                    handle.id, slot, handle.pid, handle.death_reason or "it exited by itself", handle.exit_code,
                )
            self._metrics.restarts += 1
            failures = 1 if trio.current_time() - lived_from > _STABLE_AFTER else failures + 1
            if failures > 1:  # a slot that keeps failing backs off; a first crash restarts at once
                low, high = self._restart_backoff
                await trio.sleep(min(low * 2 ** (failures - 2), high))

    async def _sweep_shared_memory(self) -> None:
        """Segments of processes that are gone (a tool's child that wrote some) must not pile up;
        a worker's own are removed as it exits."""
        assert self.plane is not None
        while True:
            await trio.sleep(_SWEEP_INTERVAL)
            self.plane.sweep()

    async def _health_check(self) -> None:
        if self._health_check_interval <= 0:
            return
        assert self._nursery is not None
        while True:
            await trio.sleep(self._health_check_interval)
            for handle in list(self.handles.values()):
                if handle.accepting:
                    self._nursery.start_soon(self._ping, handle)

    async def _ping(self, handle: WorkerHandle) -> None:
        try:
            with trio.fail_after(self._health_check_interval):
                await handle.call(lambda stub: stub.ping(pb.PingRequest()))
        except (trio.TooSlowError, WorkerCrashedError):
            handle.kill("it failed its health check")

    def kill_all(self, reason: str) -> None:
        """Kill every live worker at once (their process groups: SIGKILL)."""
        self.closing = True
        for handle in self.live_handles():
            handle.kill(reason)

    async def shutdown(self) -> None:
        """Drain (workers finish their calls, up to ``shutdown_timeout``), then terminate, then kill."""
        self.closing = True
        self._dispatcher.close("the pool is closed")
        async with trio.open_nursery() as nursery:
            for handle in list(self.handles.values()):
                nursery.start_soon(handle.shutdown, self._shutdown_timeout)


def _first(group: BaseExceptionGroup[WorkerStartError]) -> WorkerStartError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, WorkerStartError)
    return exc
