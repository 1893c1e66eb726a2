"""Which worker serves a call: session affinity, a session moving off a dead worker, and the
session's life on the workers (InitializeSession before its first call there, CleanupSession
when it ends). Slots and the queue themselves are the :class:`Dispatcher`'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from trio_bridge._errors import WorkerCrashedError
from trio_bridge._host._dispatch import NO_SESSION, Affinity, Dispatcher
from trio_bridge._host._worker import Worker
from trio_bridge._state.backend import StateBackend
from trio_bridge._wire.codec import encode

_logger = logging.getLogger("trio_bridge")
_CLEANUP_TIMEOUT = 5.0  # seconds a worker gets to run a session's cleanup


@dataclass(eq=False)
class Route:
    """Where a session's calls go: its affinity and its home worker (once a call has run)."""

    session_id: str
    affinity: Affinity
    home: Worker | None = None
    moves: int = 0
    """How many times it moved to another worker because its worker died."""
    pinned: dict[str, Worker] = field(default_factory=dict)
    """Objects a worker keeps for the session (``PythonAdapter``): name -> that worker."""


class Router:
    def __init__(self, dispatcher: Dispatcher[Worker], state: StateBackend) -> None:
        self._dispatcher = dispatcher
        self._state = state
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where session cleanups run (the pool's nursery)."""
        self._nursery = nursery

    async def acquire(
        self, route: Route | None, affinity: Affinity | None = None, *, nested: bool = False, readmitted: bool = False,
    ) -> Worker:
        """A slot on the worker this call should use (see :meth:`Dispatcher.acquire` for
        ``nested``, ``readmitted`` and the errors)."""
        if route is None:
            return await self._dispatcher.acquire(nested=nested, readmitted=readmitted)
        home = route.home
        worker = await self._dispatcher.acquire(
            home, affinity or route.affinity, key=route.session_id, nested=nested, readmitted=readmitted,
        )
        # Its worker is gone once it stops accepting (it died), even before the supervisor removed it.
        if home is None or (home is not worker and not (self._dispatcher.has(home) and home.lifecycle.accepting)):
            if home is not None:
                route.moves += 1
                _logger.warning(
                    "session %s moved from worker %s, which is gone (exit code %s), to worker %s",
                    route.session_id, home.id, home.lifecycle.exit_code, worker.id,
                )
            route.home = worker
        return worker

    def release(self, worker: Worker, route: Route | None) -> None:
        """Give back the slot :meth:`acquire` took for a call along ``route``."""
        self._dispatcher.release(worker, route.session_id if route is not None else NO_SESSION)

    async def enter_session(self, worker: Worker, route: Route | None) -> None:
        """Before a session's first call on a worker: InitializeSession, with its metadata.

        Raises:
            WorkerCrashedError: the worker died meanwhile.
        """
        if route is None or route.session_id in worker.sessions:
            return
        info = await self._state.get_session(route.session_id)
        await worker.begin_session(route.session_id, encode(dict(info.metadata), path="session metadata"))
        worker.sessions.add(route.session_id)

    def session_ended(self, session_id: str, workers: list[Worker]) -> None:
        """Tell the workers that served it, in the background (they drop its objects and caches)."""
        if self._nursery is None:
            return
        for handle in workers:
            if session_id in handle.sessions:
                handle.sessions.discard(session_id)
                if handle.lifecycle.alive:
                    self._nursery.start_soon(_cleanup_on, handle, session_id)


async def _cleanup_on(handle: Worker, session_id: str) -> None:
    with trio.move_on_after(_CLEANUP_TIMEOUT):
        try:
            await handle.end_session(session_id)
        except WorkerCrashedError:
            pass
