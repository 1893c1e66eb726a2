"""Slots and the wait queue: which worker serves the next call (pure Trio, no I/O).

Each ready worker offers ``concurrency`` slots. A call takes a free slot at once when nobody is
queued; otherwise it joins a bounded FIFO queue and is handed the next slot that frees. Among
free workers the least busy wins, ties going to the one idle longest, so a burst of calls fans
out over all workers.

Session affinity (``acquire(worker=..., affinity=...)``):

* ``"prefer"``: that worker if it has a free slot, else any worker (the seeds' default);
* ``"strict"``: wait for that worker; calls for other workers queued behind are not held up;
* ``"strict_fail_fast"``: that worker now, or :class:`WorkerBusyError` at once.

A call bound to a worker that leaves the pool (it died) is handed any worker instead.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import trio

from trio_bridge._errors import PoolClosedError, PoolSaturatedError, WorkerBusyError

Affinity = Literal["prefer", "strict", "strict_fail_fast"]
AFFINITIES: tuple[Affinity, ...] = ("prefer", "strict", "strict_fail_fast")


class Slots(Protocol):
    """A worker's slots (``_worker.WorkerLifecycle`` is one)."""

    concurrency: int
    busy: int

    def admit(self) -> None:
        """It was handed a call (what a limit on calls per worker counts); it may stop accepting."""
        ...

    @property
    def accepting(self) -> bool:
        """False once the worker is being stopped: its free slots are not handed out."""
        ...


class Slotted(Protocol):
    """What the dispatcher hands out: a worker, whose ``lifecycle`` keeps its slots."""

    @property
    def lifecycle(self) -> Slots: ...


W = TypeVar("W", bound=Slotted)


@dataclass(eq=False)
class _Waiter(Generic[W]):
    only: W | None = None  # strict affinity: this worker and no other
    event: trio.Event = field(default_factory=trio.Event)
    worker: W | None = None
    error: BaseException | None = None


class Dispatcher(Generic[W]):
    """Hands out worker slots to calls, FIFO, with a bounded queue.

    Args:
        max_queue: how many calls may wait for a slot; one more raises
            :class:`PoolSaturatedError` at once.
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._workers: dict[W, int] = {}  # worker -> tick of its last hand-out
        self._waiters: collections.deque[_Waiter[W]] = collections.deque()
        self._ticks = itertools.count()
        self._closed: str | None = None
        self.admitted: int = 0
        """Calls handed to workers so far."""
        self._rate = 0.0
        self._rate_mark: tuple[float, int] | None = None  # (when, admitted) of the rate's last look

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def add(self, worker: W) -> None:
        """A worker became ready: its free slots go to waiting calls first."""
        self._workers[worker] = next(self._ticks)
        self._hand_over()

    def remove(self, worker: W) -> None:
        """A worker stopped serving (died, recycled, shutting down). Calls waiting for it
        specifically are re-queued for any worker."""
        self._workers.pop(worker, None)
        for waiter in self._waiters:
            if waiter.only is worker:
                waiter.only = None
        self._hand_over()

    def has(self, worker: W) -> bool:
        return worker in self._workers

    async def acquire(self, worker: W | None = None, affinity: Affinity = "prefer") -> W:
        """Take a slot, waiting in the queue if none is free.

        Args:
            worker: the worker this call has affinity to (a session's worker), if any.
            affinity: ``"prefer"``, ``"strict"`` or ``"strict_fail_fast"`` (see the module doc).

        Raises:
            PoolSaturatedError: the queue is full.
            PoolClosedError: the pool is closing.
            WorkerBusyError: ``strict_fail_fast`` and ``worker`` has no free slot.
        """
        if self._closed is not None:
            raise PoolClosedError(self._closed)
        if worker is not None and (worker not in self._workers or not worker.lifecycle.accepting):
            worker = None  # it left the pool, or is leaving it (it never accepts again): any worker will do
        if worker is not None and self._free(worker):
            self._take(worker)
            return worker
        if worker is not None and affinity == "strict_fail_fast":
            raise WorkerBusyError(f"the session's worker {worker!r} is busy (affinity 'strict_fail_fast')")
        only = worker if affinity == "strict" else None
        if only is None and not self._waiters:
            free = self._pick()
            if free is not None:
                self._take(free)
                return free
        if len(self._waiters) >= self.max_queue:
            raise PoolSaturatedError(
                f"all workers are busy and {len(self._waiters)} call(s) are already queued "
                f"(max_queue={self.max_queue}); retry later or enlarge the pool"
            )
        waiter: _Waiter[W] = _Waiter(only=only)
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.worker is not None:  # handed a slot just as we were cancelled
                self.release(waiter.worker)
            else:
                self._waiters.remove(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.worker is not None
        return waiter.worker

    def release(self, worker: W) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        worker.lifecycle.busy -= 1
        self._hand_over()

    def close(self, reason: str) -> None:
        """Refuse new calls and fail the queued ones with :class:`PoolClosedError`."""
        self._closed = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = PoolClosedError(reason)
            waiter.event.set()

    @staticmethod
    def _free(worker: W) -> bool:
        slots = worker.lifecycle
        return slots.busy < slots.concurrency and slots.accepting

    def _pick(self) -> W | None:
        best = None
        for worker, tick in self._workers.items():
            if self._free(worker) and (best is None or (worker.lifecycle.busy, tick) < (best.lifecycle.busy, self._workers[best])):
                best = worker
        return best

    def admission_rate(self) -> float:
        """Calls handed out per second, over the time since the previous look (at least
        0.05 s; the last figure until then). For the supervisor's recycling estimates."""
        now = trio.current_time()
        if self._rate_mark is None:
            self._rate_mark = (now, self.admitted)
        when, admitted = self._rate_mark
        if now - when >= 0.05:
            self._rate = (self.admitted - admitted) / (now - when)
            self._rate_mark = (now, self.admitted)
        return self._rate

    def _take(self, worker: W) -> None:
        worker.lifecycle.busy += 1
        self.admitted += 1
        worker.lifecycle.admit()
        self._workers[worker] = next(self._ticks)

    def _hand_over(self) -> None:
        # FIFO, except that a call waiting for one busy worker does not hold up the others.
        served = []
        for waiter in self._waiters:
            if waiter.only is not None:
                worker = waiter.only if self._free(waiter.only) else None
            else:
                worker = self._pick()
            if worker is None:
                if waiter.only is None:
                    break  # no free worker at all
                continue
            self._take(worker)
            waiter.worker = worker
            waiter.event.set()
            served.append(waiter)
        for waiter in served:
            self._waiters.remove(waiter)
