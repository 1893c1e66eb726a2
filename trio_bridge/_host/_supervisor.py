"""Supervision: keep ``size`` workers running -- start them, restart the dead, recycle the
worn, ping, shut down.

Each slot is owned by one task (:meth:`Supervisor._supervise`) in the pool's nursery: it runs
the slot's :class:`~trio_bridge._host._worker.Worker` (any kind: it knows them only through that
protocol) and, when the worker dies, logs why (once) and starts a
replacement after a backoff that doubles on each failure in a row (reset once a worker has
lived ``_STABLE_AFTER`` seconds). A worker that fails its health check is killed (and so
replaced). A worker past one of the limits of its :class:`Recycling` is *recycled* without failing a call
or lowering capacity: its replacement starts first and takes its place, then the old worker
finishes its calls (up to ``shutdown_timeout``) and exits -- as Gunicorn's ``max_requests`` and
Celery's ``max_tasks_per_child`` / ``max_memory_per_child`` do, minus their gap in capacity.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from trio_bridge._errors import PoolClosedError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._dispatch import Dispatcher
from trio_bridge._host._metrics import Metrics
from trio_bridge._host._options import Lifecycle, Recycling
from trio_bridge._host._tools import ToolRegistry
from trio_bridge._host._worker import Worker, WorkerFactory, WorkerInfo, WorkerState
from trio_bridge._wire import buffers
from trio_bridge._wire.shared_memory import SharedMemoryPlane

_logger = logging.getLogger("trio_bridge")
_STABLE_AFTER = 10.0    # seconds a worker must live before its slot's restart backoff resets
_SWEEP_INTERVAL = 60.0  # seconds between sweeps of shared-memory segments left by dead processes
_MEMORY_POLL = 1.0      # seconds between RSS samples of each worker (Recycling.max_memory)
_RATE_POLL = 0.02  # seconds between looks at the call rate, for a worker nearing max_calls
_AHEAD = 2  # workers a slot may have started ahead of its own (calls faster than starts)
_DRAIN_POLL = 0.01      # seconds between looks at a recycled worker's calls
_REQUESTED = "requested"  # a slot asked to replace its worker now (Supervisor.recycle_now)


def _past_limit(limits: Recycling, handle: Worker, now: float) -> tuple[str, str] | None:
    """``(kind, why)`` if ``handle`` is past a limit of ``limits``, kind being ``"calls"``,
    ``"age"`` or ``"memory"``; else ``None``. Samples its memory when there is a memory limit."""
    life = handle.lifecycle
    if life.calls_exhausted.is_set():  # given its own limit (see _max_calls)
        return "calls", f"it was given {life.calls_given} calls (Recycling.max_calls={limits.max_calls})"
    if limits.max_age is not None and life.started_at is not None and now - life.started_at >= limits.max_age:
        return "age", f"it ran {now - life.started_at:.1f} s (Recycling.max_age={limits.max_age:g})"
    if limits.max_memory is not None:
        rss = handle.sample_memory()
        if rss is not None and rss >= limits.max_memory:
            return "memory", f"its RSS is {rss / 2**20:.0f} MiB (Recycling.max_memory={limits.max_memory / 2**20:.0f} MiB)"
    return None


def _max_calls(limits: Recycling, slot: int, initial: int, first_of_slot: bool) -> int | None:
    """The calls a slot's new worker may be given (``Recycling.max_calls`` holds exactly:
    calls are counted as the dispatcher hands them out, and a worker given its last call
    takes no other while its replacement starts); ``initial``: the slots the pool started with.

    What it costs in capacity: the replacement starts ahead (see :meth:`Supervisor._start` and
    :func:`_start_due`: at half the limit until a start under load has been timed, then
    from the call rate and the latest start's duration, with a margin of two; up to
    :data:`_AHEAD` of them when calls are faster than starts); if one is not ready in time,
    that slot has no worker taking calls until it is. The first worker of slot ``i`` of
    ``n`` gets ``i/n`` fewer calls, so that the slots (which the dispatcher loads evenly)
    reach their limits one after the other, never all at once. The price of that stagger: ``(size - 1) / 2`` extra starts, once."""
    limit = limits.max_calls
    if limit is None or not first_of_slot or slot >= initial:
        return limit
    return max(1, limit - slot * limit // initial)


def _start_due(worker: Worker, calls_per_second: float, start_seconds: float | None) -> bool:
    """Whether ``worker``, at the slot's present call rate, would be given its last call
    before a replacement started now was ready (with a margin of two): calls faster than
    the first estimate of :meth:`Supervisor._start` (a start under load is slower)."""
    life = worker.lifecycle
    if life.max_calls is None or start_seconds is None:
        return False
    return life.max_calls - life.calls_given <= 2 * calls_per_second * start_seconds


class Supervisor:
    """Owns the pool's workers, one per slot (and the replacements and recycled ones).

    Args:
        new_worker: makes a slot's next worker, ``new_worker(worker_id, slot)``; the
            composition root passes the real one (gRPC workers), ``trio_bridge.testing`` fakes.
    """

    def __init__(
        self,
        *,
        new_worker: WorkerFactory,
        size: int,
        dispatcher: Dispatcher[Worker],
        metrics: Metrics,
        tools: ToolRegistry,
        lifecycle: Lifecycle,
        plane: SharedMemoryPlane | None,
        recycling: Recycling | None = None,
    ) -> None:
        self.size: int = size
        """Slots now: the start's, plus those added (remote workers found or joined), less those
        removed (whose workers may still be finishing their calls)."""
        self.handles: dict[int, Worker] = {}
        self.closing: bool = False
        self.last_start_error: WorkerStartError | None = None
        """The latest failure to start a replacement; cleared when a worker starts."""
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._tools = tools
        self._health_check_interval = lifecycle.health_check_interval
        self._restart_backoff = lifecycle.restart_backoff
        self._shutdown_timeout = lifecycle.shutdown_timeout
        self.plane: SharedMemoryPlane | None = plane
        self._new_worker = new_worker
        self._slot_workers: dict[int, WorkerFactory] = {}  # the factories of added slots
        self._gone: dict[int, Callable[[str], None]] = {}  # added slots that leave when their worker is gone
        self._initial = size  # slots 0..size-1 start with the pool; their first workers are staggered
        self._next_slot = size
        self._pending: list[int] = []  # added before start()
        self._leaving: dict[int, str] = {}  # removed (and why): their workers drain, then the slot ends
        self._worker_ids = itertools.count(size)  # w0..w{size-1} are the first workers of the slots
        self._nursery: trio.Nursery | None = None
        self._recycle = recycling if recycling is not None else Recycling()
        self.retiring: set[Worker] = set()
        """Recycled workers finishing their calls (no longer in :attr:`handles`)."""
        self._successors: set[Worker] = set()  # replacements of workers due for recycling, starting
        # calls a slot was given while the latest replacement started (None: none started under load yet)
        self._start_lead: int | None = None
        self._start_seconds: float | None = None  # how long the latest start took
        self.recycles: collections.Counter[str] = collections.Counter()
        """Workers recycled, by kind of limit (``"calls"``, ``"age"``, ``"memory"``) or of
        request (``"reload"``: :meth:`recycle_now`)."""
        self._due: dict[int, _Due] = {}  # slots asked to replace their worker now (recycle_now)
        self._wakes: dict[int, trio.Event] = {}  # set when a slot's worker is asked for (its task waits)

    # ---- what others read ----
    def workers(self) -> list[WorkerInfo]:
        """One per slot; then the replacements started ahead of a recycle (they take calls
        already); then the recycled workers still finishing their calls."""
        serving = [self.handles[slot].info() for slot in sorted(self.handles)]
        ahead = [h.info() for h in sorted(self._successors, key=lambda h: h.slot)]
        return serving + ahead + [h.info() for h in sorted(self.retiring, key=lambda h: h.slot)]

    @property
    def ready(self) -> int:
        """Slots with a worker taking calls (the slot's own, or a replacement started ahead of
        a recycle that stands in for it while it drains)."""
        return len({h.slot for h in (*self.handles.values(), *self._successors) if h.lifecycle.accepting})

    @property
    def any_ready(self) -> bool:
        """Some worker takes calls (``ready > 0``), found without counting (asked per call)."""
        for handle in self.handles.values():
            if handle.lifecycle.accepting:
                return True
        return any(h.lifecycle.accepting for h in self._successors)

    @property
    def capacity(self) -> int:
        """Calls the ready workers can serve at once."""
        return sum(h.lifecycle.concurrency for h in self.handles.values() if h.lifecycle.accepting)

    @property
    def in_flight(self) -> int:
        return sum(h.lifecycle.busy for h in self._all())

    def live_handles(self) -> list[Worker]:
        return [h for h in self._all() if h.lifecycle.alive]

    def _all(self) -> list[Worker]:
        return [*self.handles.values(), *self.retiring, *self._successors]

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
            for slot in range(self._initial):
                starters.start_soon(start_one, slot)
        if errors:
            if len(errors) > 1:
                errors[0].add_note(f"({len(errors)} of {self._initial} workers failed to start)")
            raise errors[0]
        for slot in self._pending:
            nursery.start_soon(partial(self._supervise, slot, must_start=False))
        self._pending.clear()
        nursery.start_soon(HealthCheck(self._health_check_interval, lambda: [] if self.closing else self.live_handles()).run)
        if self.plane is not None:
            nursery.start_soon(_sweep_shared_memory, self.plane)
        nursery.start_soon(_release_idle_buffers)

    def add_slot(self, new_worker: WorkerFactory | None = None, *, on_gone: Callable[[str], None] | None = None) -> int:
        """One more slot (a remote worker found or joined), whose workers ``new_worker`` makes
        (default: the pool's factory); its worker starts now (or with the pool, before
        :meth:`start`), and a failed start is retried like a restart. Returns the slot.

        ``on_gone``: the slot is not restarted: once its worker is gone (or could not start),
        the slot leaves and ``on_gone(why)`` is called (a joined worker joins again by itself)."""
        slot = self._next_slot
        self._next_slot += 1
        self.size += 1
        if new_worker is not None:
            self._slot_workers[slot] = new_worker
        if on_gone is not None:
            self._gone[slot] = on_gone
        if self._nursery is None:
            self._pending.append(slot)
        else:
            self._nursery.start_soon(partial(self._supervise, slot, must_start=False))
        return slot

    def remove_slot(self, slot: int, why: str) -> None:
        """The slot leaves (``why``: its remote worker's address is gone): its worker takes no
        new call, finishes those it has (up to ``shutdown_timeout``), and is not replaced."""
        if slot in self._leaving or (slot not in self.handles and slot not in self._pending):
            return
        self._leaving[slot] = why
        self.size -= 1
        if slot in self._pending:
            self._pending.remove(slot)
            self._forget(slot)
            return
        for handle in [self.handles[slot], *(h for h in self._successors if h.slot == slot)]:
            _logger.info("worker %s (slot %d) leaves the pool: %s", handle.id, slot, why)
            self._leave(handle, why)

    def _leave(self, handle: Worker, why: str) -> None:
        """A worker of a slot that leaves: it takes no new call and drains; one still starting
        is stopped (one that becomes ready all the same is retired by its slot's task)."""
        assert self._nursery is not None
        if handle.lifecycle.accepting:
            handle.lifecycle.retire()
            self._dispatcher.remove(handle)
            handle.figures.last_recycle_reason = why
            self._nursery.start_soon(_drain, handle, self._shutdown_timeout)
        else:
            handle.kill(why)

    def _forget(self, slot: int) -> None:
        self.handles.pop(slot, None)
        self._slot_workers.pop(slot, None)
        self._gone.pop(slot, None)
        self._leaving.pop(slot, None)

    def _make(self, worker_id: str, slot: int) -> Worker:
        return self._slot_workers.get(slot, self._new_worker)(worker_id, slot)

    async def _supervise(
        self, slot: int, *, must_start: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the workers of one slot: start one, restart it with backoff when it dies, and
        replace it when it is past a recycling limit. ``must_start``: its first failed start
        raises (the pool's start fails) instead.

        Each worker runs in a task of its own in ``lives``, so that a recycled one can finish
        its calls while its replacement already serves."""
        failed_first: WorkerStartError | None = None
        try:
            async with trio.open_nursery() as lives:
                failed_first = await self._keep_filled(lives, slot, must_start, task_status)
        finally:
            due = self._due.pop(slot, None)
            if due is not None:  # nothing more to replace: it left (False), or the pool closes
                due.settle(error=None if slot in self._leaving else _closed())
            self._wakes.pop(slot, None)
            if slot in self._leaving:
                self._forget(slot)
                _logger.info("slot %d left the pool", slot)
        if failed_first is not None:
            raise failed_first  # out of the nursery, not in a group

    async def _keep_filled(
        self, lives: trio.Nursery, slot: int, must_start: bool, task_status: trio.TaskStatus[None],
    ) -> WorkerStartError | None:
        """:meth:`_supervise`'s loop, until the pool closes or the slot leaves; returns why the
        slot's first worker could not start, where that must fail the pool's start."""
        failures = 0
        first = must_start
        reported = False
        first_of_slot = True
        while not self.closing and slot not in self._leaving:
            # the first worker of an initial slot is named after it (they start in any order)
            worker_id = f"w{slot}" if first else f"w{next(self._worker_ids)}"
            handle = self._make(worker_id, slot)
            self.handles[slot] = handle
            lived_from = trio.current_time()
            due = self._due.get(slot)  # asked for before this start: this worker answers it
            failed = await self._start(lives, handle, first_of_slot=first_of_slot)
            first_of_slot = False
            if due is not None and self._due.get(slot) is due:
                del self._due[slot]
                due.settle(replaced=failed is None, error=_closed() if failed is not None and self.closing else failed)
            if failed is not None:
                if first:
                    return failed
                if slot in self._leaving:
                    return None
                self.last_start_error = failed
                _logger.warning("worker %s (slot %d) could not start: %s", handle.id, slot, failed)
            else:
                if not reported:
                    task_status.started()
                    reported = True
                first = False
                handle = await self._serve_and_recycle(lives, slot, handle)
                if self.closing or slot in self._leaving:
                    return None
                _logger.warning(
                    "worker %s (slot %d, pid %s) is gone: %s (exit code %s); %s",
                    handle.id, slot, handle.pid, handle.lifecycle.death_reason or "it exited by itself",
                    handle.lifecycle.exit_code, "its slot leaves" if slot in self._gone else "restarting the slot",
                )
                started_at = handle.lifecycle.started_at
                lived_from = started_at if started_at is not None else lived_from
            if self.closing:
                return None
            on_gone = self._gone.get(slot)
            if on_gone is not None:  # not restarted: it leaves (its worker offers itself again once back)
                why = f"its worker is gone ({failed})" if failed is not None else "its worker is gone"
                self._leaving[slot] = why
                self.size -= 1
                _logger.info("slot %d leaves the pool: %s", slot, why)
                on_gone(why)
                return None
            self._metrics.restarts += 1
            failures = 1 if trio.current_time() - lived_from > _STABLE_AFTER else failures + 1
            if failures > 1:  # a slot that keeps failing backs off; a first crash restarts at once
                await trio.sleep(_backoff(self._restart_backoff, failures))
        return None

    async def _start(self, lives: trio.Nursery, handle: Worker, *, first_of_slot: bool = False) -> WorkerStartError | None:
        """Start ``handle`` in a task of ``lives``; once it is ready it takes calls. Returns why
        it could not start, if it could not."""
        handle.lifecycle.max_calls = limit = _max_calls(self._recycle, handle.slot, self._initial, first_of_slot)
        if limit is not None:
            # Not yet known how many calls a start takes: start at half the limit, so that a
            # start slower than the calls (1,000 calls/s against 0.1 s) still finds a replacement ready.
            lead = limit // 2 if self._start_lead is None else max(1, limit // 10, 2 * self._start_lead)
            handle.lifecycle.replace_at = max(0, limit - lead)
        given_before = self._dispatcher.admitted
        failed: WorkerStartError | None = None
        began = trio.current_time()
        try:
            await lives.start(self._live, handle)
        except* WorkerStartError as group:
            failed = _first(group)
        if failed is not None:
            return failed
        self._start_seconds = trio.current_time() - began
        if self._dispatcher.admitted > given_before:  # it started while the pool served: learn the lead
            self._start_lead = (self._dispatcher.admitted - given_before) // max(1, self.size)
        self._tools.worker_tools = handle.tools
        self.last_start_error = None
        self._dispatcher.add(handle)
        return None

    async def _live(self, handle: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One worker's life: ready (``task_status.started()``) to exit, then out of every list."""
        try:
            await handle.run(task_status=task_status)
        finally:
            self._dispatcher.remove(handle)
            self.retiring.discard(handle)
            self._successors.discard(handle)  # a replacement started ahead that died: no longer listed

    async def _serve_and_recycle(self, lives: trio.Nursery, slot: int, handle: Worker) -> Worker:
        """Let the slot's worker serve; each time it passes a recycling limit, put a ready
        replacement in its place and let the old one drain. A replacement starts ahead, when
        the worker nears ``max_calls`` (see :meth:`_start`), or when another limit is passed;
        it takes calls as soon as it is ready. When calls are faster than a start, the
        replacement itself nears its limit before it takes the slot: then the next one starts
        too (at most :data:`_AHEAD` ahead), so the slot is never left waiting for a start.
        Returns the slot's worker once it is gone (died, killed, or the pool closes)."""
        failures = 0
        ahead: list[Worker] = []  # started ahead, taking calls, not yet in the slot (in order)
        while True:
            if slot in self._leaving:  # no replacement for it, nor for one that became ready meanwhile
                for worker in (handle, *ahead):
                    if worker.lifecycle.accepting:
                        self._leave(worker, self._leaving[slot])
                await handle.lifecycle.exited.wait()
                return handle
            last = ahead[-1] if ahead else handle
            passed = await self._until_gone_or_past_a_limit(handle, nearing=last if len(ahead) < _AHEAD else None)
            if self.closing:
                return handle
            if slot in self._leaving:
                continue
            for gone in [w for w in ahead if not w.lifecycle.alive]:
                ahead.remove(gone)
            if passed is None and not handle.lifecycle.alive:  # it died: a replacement already running takes the slot
                if not ahead:
                    return handle
                successor = ahead.pop(0)
                _logger.warning(
                    "worker %s (slot %d, pid %s) is gone: %s (exit code %s); %s, started to replace it, took its place",
                    handle.id, slot, handle.pid, handle.lifecycle.death_reason or "it exited by itself", handle.lifecycle.exit_code,
                    successor.id,
                )
                self._successors.discard(successor)
                self._metrics.restarts += 1
                self.handles[slot] = handle = successor
                continue
            if passed is None:  # one started ahead died: look again
                continue
            kind, why = passed
            if kind == _REQUESTED:
                handle = await self._replace_as_requested(lives, slot, handle, ahead)
                continue
            if kind == "soon" or not ahead:
                successor = self._make(f"w{next(self._worker_ids)}", slot)
                self._successors.add(successor)  # known to the pool (its heartbeat asks) and killed with it
                failed = await self._start(lives, successor)
                if failed is not None:  # the old worker keeps serving; try again after a backoff
                    self._successors.discard(successor)
                    if self.closing:  # stopped as it started, by the pool's close: nothing to say
                        return handle
                    failures += 1
                    self.last_start_error = failed
                    _logger.warning(
                        "worker %s (slot %d) is due for recycling (%s), but its replacement could not start: %s",
                        handle.id, slot, why, failed,
                    )
                    await _wait_gone(handle, _backoff(self._restart_backoff, failures + 1))
                    continue
                failures = 0
                ahead.append(successor)
                if kind == "soon":
                    continue  # it takes calls too; it takes the slot once the limit is passed
            successor = ahead.pop(0)
            self._successors.discard(successor)
            self._take_slot(lives, successor, [handle], kind, why)
            handle = successor

    def _take_slot(self, lives: trio.Nursery, successor: Worker, old: list[Worker], kind: str, why: str) -> None:
        """``successor`` (ready) takes its slot; the ``old`` workers of the slot take no new call,
        finish theirs and exit. Counted in :attr:`recycles` as ``kind``, once per slot."""
        successor.figures.last_recycle_reason = why
        self.handles[successor.slot] = successor
        counted = False
        for handle in old:
            self._dispatcher.remove(handle)
            self._successors.discard(handle)
            if not handle.lifecycle.alive:  # (one that died meanwhile has had its leftovers done: nothing to list)
                continue
            self.retiring.add(handle)
            handle.figures.last_recycle_reason = why
            handle.lifecycle.retire()
            if not counted:
                self.recycles[kind] += 1
                counted = True
            _logger.info(
                "worker %s (slot %d, pid %s) recycled: %s; %s (pid %s) took its place",
                handle.id, handle.slot, handle.pid, why, successor.id, successor.pid,
            )
            lives.start_soon(_drain, handle, self._shutdown_timeout)

    async def recycle_now(self, slot: int, kind: str, why: str) -> bool:
        """Replace slot ``slot``'s worker now, as a recycle does: a new worker starts; once it is
        ready it takes the slot, and the old one -- with any started ahead of it for
        :class:`Recycling` -- finishes its calls and exits. A worker of the slot that starts
        after this call (the slot's worker died meanwhile) is its replacement too.

        Args:
            kind: what :attr:`recycles` counts it as (``"reload"``).
            why: the workers' ``last_recycle_reason``.

        Cancelled before the slot's task has taken the request (it waits for a restart, say),
        the request is withdrawn: nothing is replaced for it later.

        Returns:
            ``True`` once the new worker serves; ``False`` when there was nothing to replace
            (no such slot, or it left).

        Raises:
            WorkerStartError: the new worker could not start (the old one serves on).
            PoolClosedError: the pool closes (before the new worker served).
        """
        if self.closing:
            raise _closed()
        if slot in self._leaving or slot not in self.handles:
            return False
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = _Due(kind, why)
            wake = self._wakes.pop(slot, None)
            if wake is not None:
                wake.set()
        due.waiting += 1
        try:
            await due.done.wait()
        finally:
            due.waiting -= 1
            if not due.waiting and self._due.get(slot) is due:  # cancelled, still untaken: withdrawn
                del self._due[slot]
        if due.error is not None:
            raise due.error
        return due.replaced

    async def _replace_as_requested(self, lives: trio.Nursery, slot: int, handle: Worker, ahead: list[Worker]) -> Worker:
        """Answer :meth:`recycle_now` for ``slot``, whose worker is ``handle`` (``ahead``: those
        started ahead of it, which were made before the request: they drain too). Returns the
        slot's worker. The request is answered however this ends (cancelled: the pool closes)."""
        due = self._due.pop(slot)
        successor = self._make(f"w{next(self._worker_ids)}", slot)
        self._successors.add(successor)  # known to the pool (its heartbeat asks) and killed with it
        try:
            failed = await self._start(lives, successor)
        except BaseException:
            due.settle(error=_closed())
            raise
        finally:
            self._successors.discard(successor)
        if failed is not None or self.closing:
            due.settle(error=_closed() if self.closing else failed)
            return handle
        self._take_slot(lives, successor, [handle, *ahead], due.kind, due.why)
        ahead.clear()
        due.settle(replaced=True)
        return successor

    async def _until_gone_or_past_a_limit(self, handle: Worker, *, nearing: Worker | None) -> tuple[str, str] | None:
        """Wait until ``handle`` has exited (``None``), its slot is due for :meth:`recycle_now`
        (:data:`_REQUESTED`), or it is past a recycling limit (its kind and why); with
        ``nearing`` (``handle`` or the last worker started ahead of it), also until that one
        nears ``max_calls`` (``"soon"``) or dies (``None``)."""
        limits = self._recycle
        life = handle.lifecycle
        while life.alive:
            if handle.slot in self._due:
                return _REQUESTED, self._due[handle.slot].why
            now = trio.current_time()
            # (a worker given its last call has stopped accepting: it is past its limit)
            passed = _past_limit(limits, handle, now) if limits and (life.accepting or life.calls_exhausted.is_set()) else None
            if passed is not None:
                return passed
            if nearing is not None and not nearing.lifecycle.alive:
                return None
            if nearing is not None and (nearing.lifecycle.calls_nearly_exhausted.is_set() or _start_due(nearing, self._dispatcher.admission_rate() / max(1, self.size), self._start_seconds)):
                return "soon", "it nears Recycling.max_calls"
            timeout = float("inf")
            if nearing is not None and nearing.lifecycle.max_calls is not None and self._start_seconds is not None:
                timeout = _RATE_POLL
            if limits.max_memory is not None:
                timeout = _MEMORY_POLL
            if limits.max_age is not None and life.started_at is not None:
                timeout = min(timeout, life.started_at + limits.max_age - now)
            waits: list[Callable[[], Awaitable[object]]] = [life.exited.wait, self._wakes.setdefault(handle.slot, trio.Event()).wait]
            if limits.max_calls is not None:
                waits.append(life.calls_exhausted.wait)
                if nearing is not None:
                    waits.append(nearing.lifecycle.calls_nearly_exhausted.wait)
            if nearing is not None and nearing is not handle:
                waits.append(nearing.lifecycle.exited.wait)
            await _first_of(waits, timeout)
        return None

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
            for handle in self._all():
                nursery.start_soon(handle.shutdown, self._shutdown_timeout)


class _Due:
    """A slot asked to replace its worker now (:meth:`Supervisor.recycle_now`), and how it ended."""

    def __init__(self, kind: str, why: str) -> None:
        self.kind = kind
        self.why = why
        self.done = trio.Event()
        self.waiting = 0  # recycle_now calls waiting for it (the last one cancelled withdraws it)
        self.replaced = False
        self.error: WorkerStartError | PoolClosedError | None = None

    def settle(self, *, replaced: bool = False, error: WorkerStartError | PoolClosedError | None = None) -> None:
        self.replaced = replaced
        self.error = error
        self.done.set()


def _closed() -> PoolClosedError:
    return PoolClosedError("the pool closed before the slot's new worker served")


class HealthCheck:
    """Every ``interval`` seconds, pings each of ``workers()`` that is ready, or draining with
    calls left (retired, or its slot leaving: a hung drain would never end; one that has
    finished them is being asked to exit); one that does not answer within ``interval`` is
    killed (and so replaced). ``interval`` 0: none."""

    def __init__(self, interval: float, workers: Callable[[], list[Worker]]) -> None:
        self._interval = interval
        self._workers = workers

    async def run(self) -> None:
        if self._interval <= 0:
            return
        async with trio.open_nursery() as pings:
            while True:
                await trio.sleep(self._interval)
                for handle in self._workers():
                    life = handle.lifecycle
                    if life.state is WorkerState.READY or (life.state is WorkerState.DRAINING and life.busy):
                        pings.start_soon(self._ping, handle)

    async def _ping(self, handle: Worker) -> None:
        try:
            with trio.fail_after(self._interval):
                await handle.active_calls()
        except (trio.TooSlowError, WorkerCrashedError):
            handle.kill("it failed its health check")


class HeartbeatReport(Protocol):
    """What a worker's heartbeat says of it (the host service's message has these fields)."""

    worker_id: str
    rss_bytes: int
    cpu_seconds: float
    calls_served: int


def heartbeat(supervisor: Supervisor, message: HeartbeatReport) -> bool:
    """A worker's heartbeat: keep the figures it reports (see :meth:`WorkerFigures.report`);
    whether ``supervisor``'s pool knows it. (A function, not a method: it stays off Supervisor's
    public surface, which the public Pool reaches.)"""
    handle = next((h for h in supervisor.live_handles() if h.id == message.worker_id), None)
    if handle is None:
        return False
    handle.figures.report(rss=message.rss_bytes, cpu_seconds=message.cpu_seconds, calls_served=message.calls_served)
    return True


async def _first_of(waits: list[Callable[[], Awaitable[object]]], timeout: float) -> None:
    """Return when the first of ``waits`` returns, or after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        if len(waits) == 1:
            await waits[0]()
            return
        async with trio.open_nursery() as nursery:

            async def one(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            for wait in waits:
                nursery.start_soon(one, wait)


def _backoff(restart_backoff: tuple[float, float], failures: int) -> float:
    """Seconds to wait before a slot's next start after ``failures`` in a row (``Lifecycle.restart_backoff``)."""
    low, high = restart_backoff
    return min(low * 2 ** (failures - 2), high)


async def _drain(handle: Worker, shutdown_timeout: float) -> None:
    """A recycled worker (or one whose slot leaves): let its calls end, however long they
    take (a hung worker is the health check's business; the pool's close bounds it by
    ``shutdown_timeout``), then stop it."""
    while handle.lifecycle.busy and handle.lifecycle.alive:
        await trio.sleep(_DRAIN_POLL)
    await handle.shutdown(shutdown_timeout)
    if handle.lifecycle.alive:
        handle.kill(f"it was retired ({handle.figures.last_recycle_reason}) and did not exit in time")


async def _wait_gone(handle: Worker, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await handle.lifecycle.exited.wait()


async def _sweep_shared_memory(plane: SharedMemoryPlane) -> None:
    """Segments of processes that are gone (a tool's child that wrote some) must not pile up;
    a worker's own are removed as it exits."""
    while True:
        await trio.sleep(_SWEEP_INTERVAL)
        plane.sweep()


async def _release_idle_buffers() -> None:
    """Big messages the host receives land in reused buffers (buffers.py); its call streams run
    in Trio's thread, where no asyncio timer releases the idle ones: this does."""
    while True:
        await trio.sleep(max(buffers.IDLE_S / 2, 0.01))
        buffers.trim_idle()


def _first(group: BaseExceptionGroup[WorkerStartError]) -> WorkerStartError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, WorkerStartError)
    return exc
