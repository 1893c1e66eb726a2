"""Slots and the wait queues: which worker serves the next call (pure Trio, no I/O).

Each ready worker offers ``concurrency`` slots. A call takes a free slot at once when its class
has nobody queued; otherwise it joins its class's queue and is handed a slot that frees. Among
free workers the least busy wins, ties going to the one idle longest, so a burst of calls fans
out over all workers.

Fair queueing: calls are grouped in classes, one per session (its id), and one (key ``""``) for
calls without a session. Each class has a FIFO queue, a weight (``Pool.session(weight=)``,
default 1) and optionally ``max_in_flight`` (calls of the class on workers at once; more wait in
its queue even while workers are free). A nested call (``acquire(nested=True)``: made from
inside one of the class's calls, which holds its place until this one ends) is not held back by
``max_in_flight`` -- waiting for that place would deadlock -- though it counts in it; like a
readmitted call (``readmitted=True``: a draining worker gave it back), it waits at the front of
its class's queue. Freed slots go round the classes that have calls waiting, by deficit round
robin with a cost of one per call: at the head of the rotation, a class whose deficit is >= 1 is
served one call (deficit - 1) and stays at the head; one with less gets its quantum added and
moves to the back. The quantum is the class's weight over the smallest weight among the
waiting classes (at least one call), so every turn serves at least one call -- O(1) work per call,
amortized (the smallest weight is kept with a count per weight) -- and classes are served in
proportion to their weights while they all wait: with weights 2 and 1, two calls a turn and one.
A class that starts waiting is served after at most one turn of each other waiting class (one
call each with equal weights; ``weight / smallest`` calls for a heavier one), however many calls
those have queued. A class that runs out of waiting calls leaves the rotation and its deficit. The total of
waiting calls over all classes is bounded by ``max_queue`` (readmitted calls aside: each was
admitted before, and gave back the slot it held).

Session affinity (``acquire(worker=..., affinity=...)``):

* ``"prefer"``: that worker if it has a free slot, else any worker (the seeds' default);
* ``"strict"``: wait for that worker; calls for other workers queued behind are not held up
  (within a class too: of its waiting calls, the oldest that a free slot can take is served);
* ``"strict_fail_fast"``: that worker now, or :class:`WorkerBusyError` at once.

A class whose waiting calls all wait for busy workers is parked on those workers, out of the
rotation, until one of them frees a slot: the classes parked on it then go to the front of the
rotation, the longest parked first, one at a time until one takes the slot (O(1) amortized per
release); a class at ``max_in_flight`` parks on the workers its nested calls wait for. A call
bound to a worker that leaves the pool (it died) is handed any worker instead.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import trio

from trio_bridge._errors import PoolClosedError, PoolSaturatedError, WorkerBusyError
from trio_bridge._host._metrics import SessionQueueStatistics

Affinity = Literal["prefer", "strict", "strict_fail_fast"]
AFFINITIES: tuple[Affinity, ...] = ("prefer", "strict", "strict_fail_fast")
NO_SESSION = ""
"""The class key of calls made without a session."""


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
    seq: int  # arrival order, within its class (urgent calls' seqs come before all others)
    queued_at: float
    only: W | None = None  # strict affinity: this worker and no other
    nested: bool = False  # made from inside one of the class's calls: not held back by max_in_flight
    readmitted: bool = False  # given back by a draining worker: outside max_queue
    event: trio.Event = field(default_factory=trio.Event)
    worker: W | None = None
    error: BaseException | None = None


class _ClassQueue(Generic[W]):
    """One class's waiting calls (FIFO; strict ones kept per worker so that they hold up
    nobody), its share (weight, deficit), its calls on workers, and its wait figures."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.weight = 1.0
        self.max_in_flight: int | None = None
        self.opens = 0  # session blocks that configured it and are still open
        self.any: collections.deque[_Waiter[W]] = collections.deque()
        self.strict: dict[W, collections.deque[_Waiter[W]]] = {}
        self.count = 0  # waiting calls
        self.nested = 0  # of which nested (see _Waiter.nested)
        self.in_flight = 0
        self.deficit = 0.0
        self.in_rotation = False
        self.parked_on: list[W] = []  # the busy workers all its waiting calls wait for
        self.calls = 0  # handed to a worker
        self.wait_total = 0.0
        self.wait_max = 0.0

    @property
    def capped(self) -> bool:
        return self.max_in_flight is not None and self.in_flight >= self.max_in_flight

    @property
    def servable(self) -> bool:
        """It has waiting calls that ``max_in_flight`` lets through."""
        return self.count > 0 and (not self.capped or self.nested > 0)

    def push(self, waiter: _Waiter[W]) -> None:
        """Queue ``waiter`` in seq order: at the back, or an urgent one (negative seq) after
        the urgent ones already at the front (O(those))."""
        queue = self.any if waiter.only is None else self.strict.setdefault(waiter.only, collections.deque())
        if waiter.seq < 0:
            at = 0
            while at < len(queue) and queue[at].seq < waiter.seq:
                at += 1
            queue.insert(at, waiter)
        else:
            queue.append(waiter)
        self.count += 1
        self.nested += waiter.nested

    def discard(self, waiter: _Waiter[W]) -> None:
        """Take out a waiter wherever it is (cancelled, or served): O(its queue)."""
        if waiter.only is None:
            queue = self.any
        else:
            queue = self.strict[waiter.only]
        if queue[0] is waiter:
            queue.popleft()
        else:
            queue.remove(waiter)
        if waiter.only is not None and not queue:
            del self.strict[waiter.only]
        self.count -= 1
        self.nested -= waiter.nested

    def next_call(self, any_free: W, free: Callable[[W], bool]) -> tuple[_Waiter[W], W] | None:
        """Its oldest waiting call that a free slot can take (only a nested one while the class
        is at ``max_in_flight``), and that slot's worker."""
        if self.capped:
            best = _first_nested(self.any)
            worker = any_free
            for bound, queue in self.strict.items():
                first = _first_nested(queue)
                if first is not None and (best is None or first.seq < best.seq) and free(bound):
                    best, worker = first, bound
            return None if best is None else (best, worker)
        best = self.any[0] if self.any else None
        worker = any_free
        for bound, queue in self.strict.items():
            if (best is None or queue[0].seq < best.seq) and free(bound):
                best, worker = queue[0], bound
        return None if best is None else (best, worker)

    def unbind(self, worker: W) -> bool:
        """``worker`` left the pool: the calls waiting for it take any worker (in their order)."""
        queue = self.strict.pop(worker, None)
        if queue is None:
            return False
        for waiter in queue:
            waiter.only = None
        self.any = collections.deque(heapq.merge(self.any, queue, key=lambda w: w.seq))
        return True

    def served(self, seconds: float) -> None:
        self.calls += 1
        self.wait_total += seconds
        self.wait_max = max(self.wait_max, seconds)

    def statistics(self) -> SessionQueueStatistics:
        return SessionQueueStatistics(
            queued=self.count, in_flight=self.in_flight, calls=self.calls,
            wait_mean=self.wait_total / self.calls if self.calls else 0.0, wait_max=self.wait_max,
            weight=self.weight, max_in_flight=self.max_in_flight,
        )


def _first_nested(queue: collections.deque[_Waiter[W]]) -> _Waiter[W] | None:
    """The first nested call in ``queue``: nested calls are urgent, so among its first ones
    (O(the urgent calls waiting))."""
    for waiter in queue:
        if waiter.seq >= 0:
            return None
        if waiter.nested:
            return waiter
    return None


class _Rotation(Generic[W]):
    """The classes whose calls a free slot could take, in deficit round robin order; it keeps
    the smallest weight among them (a count per weight) for the quanta."""

    def __init__(self) -> None:
        self._order: collections.deque[_ClassQueue[W]] = collections.deque()
        self._weights: collections.Counter[float] = collections.Counter()
        self._lightest = math.inf

    def __bool__(self) -> bool:
        return bool(self._order)

    def head(self) -> _ClassQueue[W]:
        return self._order[0]

    def add(self, queue: _ClassQueue[W], *, front: bool = False) -> None:
        if front:
            self._order.appendleft(queue)
        else:
            self._order.append(queue)
        queue.in_rotation = True
        self._weigh(queue.weight)

    def discard(self, queue: _ClassQueue[W]) -> None:
        if self._order[0] is queue:
            self._order.popleft()
        else:
            self._order.remove(queue)  # a cancellation: O(classes waiting)
        queue.in_rotation = False
        self._unweigh(queue.weight)

    def pass_turn(self) -> None:
        """The head's deficit is below one call: it gets its quantum (at least one call: its
        weight over the smallest waiting one) and goes to the back."""
        queue = self._order[0]
        queue.deficit += queue.weight / self._lightest
        self._order.rotate(-1)

    def reweigh(self, queue: _ClassQueue[W], weight: float) -> None:
        if queue.in_rotation:
            self._unweigh(queue.weight)
            self._weigh(weight)
        queue.weight = weight

    def clear(self) -> None:
        for queue in self._order:
            queue.in_rotation = False
        self._order.clear()
        self._weights.clear()
        self._lightest = math.inf

    def _weigh(self, weight: float) -> None:
        self._weights[weight] += 1
        self._lightest = min(self._lightest, weight)

    def _unweigh(self, weight: float) -> None:
        self._weights[weight] -= 1
        if not self._weights[weight]:
            del self._weights[weight]
            if weight == self._lightest:
                self._lightest = min(self._weights, default=math.inf)


class Dispatcher(Generic[W]):
    """Hands out worker slots to calls: fair between classes (sessions), FIFO within one, with
    a bounded queue (see the module doc).

    Args:
        max_queue: how many calls may wait for a slot, over all classes; one more raises
            :class:`PoolSaturatedError` at once.
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._workers: dict[W, int] = {}  # worker -> tick of its last hand-out
        self._classes: dict[str, _ClassQueue[W]] = {}
        self._rotation: _Rotation[W] = _Rotation()
        self._parked: dict[W, dict[_ClassQueue[W], None]] = {}  # busy worker -> classes parked on it, in order
        self._queued = 0
        self._readmitted = 0  # of which readmitted: they take none of max_queue's places
        self._arrivals = itertools.count()
        self._urgent_arrivals = itertools.count(-(2**62))  # before every other arrival, in their order
        self._ticks = itertools.count()
        self._closed: str | None = None
        self.admitted: int = 0
        """Calls handed to workers so far."""
        self._rate = 0.0
        self._rate_mark: tuple[float, int] | None = None  # (when, admitted) of the rate's last look
        self._class(NO_SESSION).opens = 1  # always known

    @property
    def queued(self) -> int:
        """Calls waiting for a slot, over all classes."""
        return self._queued

    def add(self, worker: W) -> None:
        """A worker became ready: its free slots go to waiting calls first."""
        self._workers[worker] = next(self._ticks)
        self._hand_over()

    def remove(self, worker: W) -> None:
        """A worker stopped serving (died, recycled, shutting down). Calls waiting for it
        specifically are re-queued for any worker."""
        self._workers.pop(worker, None)
        for queue in list(self._classes.values()):
            if queue.unbind(worker) and queue.parked_on:
                self._unpark(queue)
        self._wake_all(worker)
        self._hand_over()

    def has(self, worker: W) -> bool:
        return worker in self._workers

    def configure(self, key: str, *, weight: float = 1.0, max_in_flight: int | None = None, opened: bool = True) -> None:
        """A session block opened: its class's weight and ``max_in_flight`` (the latest block's
        win); the class is kept until as many :meth:`forget` calls and it is idle. ``opened=False``:
        no block opened, a block still open has them again (a later one ended)."""
        queue = self._class(key)
        if opened:
            queue.opens += 1
        self._rotation.reweigh(queue, weight)
        queue.max_in_flight = max_in_flight
        if queue.parked_on:  # it may have parked for its nested calls only, under the old cap
            self._unpark(queue)
        self._settle(queue)
        self._hand_over()

    def forget(self, key: str) -> None:
        """A session block ended: its class goes once no block has it open and it is idle."""
        queue = self._classes.get(key)
        if queue is not None and key != NO_SESSION:
            queue.opens = max(0, queue.opens - 1)
            self._settle(queue)

    def sessions(self) -> dict[str, SessionQueueStatistics]:
        """Each known class's figures, by session id (``""``: calls without a session)."""
        return {key: queue.statistics() for key, queue in list(self._classes.items())}

    async def acquire(
        self, worker: W | None = None, affinity: Affinity = "prefer", key: str = NO_SESSION,
        *, nested: bool = False, readmitted: bool = False,
    ) -> W:
        """Take a slot, waiting in the queue of class ``key`` if none is free to it.

        Args:
            worker: the worker this call has affinity to (a session's worker), if any.
            affinity: ``"prefer"``, ``"strict"`` or ``"strict_fail_fast"`` (see the module doc).
            key: the call's class: its session's id, ``""`` for none.
            nested: the call is made from inside a call on a worker (a host tool's, a routed
                one), which holds its slot until this one ends: it is not held back by the
                class's ``max_in_flight`` (it still counts in it), and waits at the front of
                its class's queue.
            readmitted: the call was admitted before and a draining worker gave it back: it
                is not refused by ``max_queue``, takes none of its places (it gave back the
                slot it held) and waits at the front of its class's queue.

        Raises:
            PoolSaturatedError: the queue is full.
            PoolClosedError: the pool is closing.
            WorkerBusyError: ``strict_fail_fast`` and ``worker`` has no free slot, or the class
                has ``max_in_flight`` calls on workers.
        """
        if self._closed is not None:
            raise PoolClosedError(self._closed)
        if worker is not None and (worker not in self._workers or not worker.lifecycle.accepting):
            worker = None  # it left the pool, or is leaving it (it never accepts again): any worker will do
        queue = self._class(key)
        urgent = nested or readmitted
        capped = queue.capped and not nested
        try:
            if not capped:
                if worker is not None and self._free(worker):
                    return self._start(queue, worker, 0.0)
                if worker is None or affinity == "prefer":
                    free = None if queue.count and not urgent else self._pick()
                    if free is not None:
                        return self._start(queue, free, 0.0)
            if worker is not None and affinity == "strict_fail_fast":
                why = f"its class has {queue.in_flight} call(s) in flight (max_in_flight)" if capped else "it is busy"
                raise WorkerBusyError(f"the session's worker {worker!r} cannot take the call: {why} (affinity 'strict_fail_fast')")
            if self._queued - self._readmitted >= self.max_queue and not readmitted:
                raise PoolSaturatedError(
                    f"all workers are busy and {self._queued - self._readmitted} call(s) are already queued "
                    f"(max_queue={self.max_queue}); retry later or enlarge the pool"
                )
        except BaseException:
            self._settle(queue)  # a class made for a refused call goes again
            raise
        seq = next(self._urgent_arrivals if urgent else self._arrivals)
        waiter: _Waiter[W] = _Waiter(seq, trio.current_time(), worker if affinity == "strict" else None, nested, readmitted)
        queue.push(waiter)
        self._queued += 1
        self._readmitted += readmitted
        if queue.parked_on:
            self._unpark(queue)  # a free slot may take this one: the rotation decides
        self._settle(queue)
        self._hand_over()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.worker is not None:  # handed a slot just as we were cancelled
                self.release(waiter.worker, key)
            elif waiter.error is None:
                self._dequeue(queue, waiter)
                if queue.parked_on and not queue.strict:
                    self._unpark(queue)
                self._settle(queue)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.worker is not None
        return waiter.worker

    def release(self, worker: W, key: str = NO_SESSION) -> None:
        """Give back a slot that :meth:`acquire` took for class ``key``."""
        worker.lifecycle.busy -= 1
        queue = self._classes.get(key)
        if not self._queued:  # nobody waits (so no class is in the rotation or parked): nothing to hand over
            if queue is not None:
                queue.in_flight -= 1
                if not queue.in_flight and not queue.opens:
                    self._settle(queue)  # an idle, forgotten class goes
            return
        if queue is not None:
            was_capped = queue.capped
            queue.in_flight -= 1
            if was_capped and not queue.capped and queue.parked_on:  # it parked for its nested calls: all its calls may go now
                self._unpark(queue)
            self._settle(queue)
        self._wake(worker)
        self._hand_over()

    def close(self, reason: str) -> None:
        """Refuse new calls and fail the queued ones with :class:`PoolClosedError`."""
        self._closed = reason
        self._rotation.clear()
        self._parked.clear()
        for queue in list(self._classes.values()):
            waiters = [*queue.any, *(w for q in queue.strict.values() for w in q)]
            queue.any.clear()
            queue.strict.clear()
            queue.count = queue.nested = 0
            queue.parked_on = []
            for waiter in waiters:
                waiter.error = PoolClosedError(reason)
                waiter.event.set()
            self._settle(queue)
        self._queued = self._readmitted = 0

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

    def _class(self, key: str) -> _ClassQueue[W]:
        queue = self._classes.get(key)
        if queue is None:
            queue = self._classes[key] = _ClassQueue(key)
        return queue

    def _start(self, queue: _ClassQueue[W], worker: W, waited: float) -> W:
        worker.lifecycle.busy += 1
        self.admitted += 1
        worker.lifecycle.admit()
        self._workers[worker] = next(self._ticks)
        queue.in_flight += 1
        queue.served(waited)
        return worker

    def _settle(self, queue: _ClassQueue[W], *, front: bool = False) -> None:
        """Put ``queue`` in the rotation, or out of it, as its state says; drop it once idle and forgotten."""
        active = queue.servable and not queue.parked_on
        if active and not queue.in_rotation:
            self._rotation.add(queue, front=front)
        elif not active and queue.in_rotation:
            self._rotation.discard(queue)
        if not queue.count:
            queue.deficit = 0.0
            if not queue.in_flight and not queue.opens and self._classes.get(queue.key) is queue:
                del self._classes[queue.key]

    def _dequeue(self, queue: _ClassQueue[W], waiter: _Waiter[W]) -> None:
        queue.discard(waiter)
        self._queued -= 1
        self._readmitted -= waiter.readmitted

    def _park(self, queue: _ClassQueue[W]) -> None:
        # At max_in_flight, only its nested calls can go: it waits for their workers.
        capped = queue.capped
        queue.parked_on = [worker for worker, calls in queue.strict.items() if not capped or _first_nested(calls)]
        for worker in queue.parked_on:
            self._parked.setdefault(worker, {})[queue] = None
        self._settle(queue)

    def _unpark(self, queue: _ClassQueue[W], *, front: bool = False) -> None:
        for worker in queue.parked_on:
            parked = self._parked.get(worker)
            if parked is not None:
                parked.pop(queue, None)
                if not parked:
                    del self._parked[worker]
        queue.parked_on = []
        self._settle(queue, front=front)

    def _wake(self, worker: W) -> None:
        """``worker`` freed a slot: the classes parked on it go to the front of the rotation, the
        longest parked first, so that a stream of other calls cannot keep them waiting for ever
        -- one at a time, until one takes the slot (the others stay parked, in their order): O(1)
        amortized per release, however many classes wait for ``worker``."""
        parked = self._parked.get(worker)
        while parked and self._free(worker):
            self._unpark(next(iter(parked)), front=True)
            self._hand_over()  # serves it, or another class takes the slot, or it parks elsewhere
            parked = self._parked.get(worker)

    def _wake_all(self, worker: W) -> None:
        """``worker`` left: no class stays parked on it."""
        for queue in reversed(list(self._parked.get(worker, {}))):
            self._unpark(queue, front=True)

    def _hand_over(self) -> None:
        rotation = self._rotation
        while rotation:
            any_free = self._pick()
            if any_free is None:
                return
            queue = rotation.head()
            if queue.deficit < 1:
                rotation.pass_turn()
                continue
            found = queue.next_call(any_free, self._free)
            if found is None:
                self._park(queue)  # all its calls wait for busy workers
                continue
            waiter, worker = found
            self._dequeue(queue, waiter)
            queue.deficit -= 1
            self._start(queue, worker, trio.current_time() - waiter.queued_at)
            waiter.worker = worker
            waiter.event.set()
            self._settle(queue)
