"""OpenBLAS's thread pool in a forked worker: held at one thread while the fork server imports, set
after the fork to what a spawned worker would have had.

OpenBLAS (numpy's and scipy's BLAS in their wheels) starts its thread pool when it is loaded; a
fork server with those threads cannot fork safely (:mod:`trio_bridge.worker._forkserver`). So
the fork server sets ``OPENBLAS_NUM_THREADS`` to ``"1"`` before it imports anything
(:func:`hold_at_one`), whatever its environment (the host's, and the pool's ``env``) said: each
OpenBLAS its imports load starts no thread. Each forked worker then sets every such OpenBLAS's
threads, with threadpoolctl's public API (:class:`ThreadPools`), to what OpenBLAS would have
taken from the worker's own environment had the worker been spawned (:func:`wanted_threads`):
``OPENBLAS_NUM_THREADS``, else ``GOTO_NUM_THREADS``, else ``OMP_NUM_THREADS``, else -- and at
most -- the CPUs the worker may run on (``os.sched_getaffinity``). The pool puts
``OPENBLAS_NUM_THREADS`` in a worker's environment unless the user set it or
``library_threads=0`` (:mod:`trio_bridge._host._library_threads`: the pool's share of the CPUs,
``LocalWorkers(library_threads=...)``, or the value of a variable OpenBLAS reads in its place);
forked and spawned workers read the same one.

Nothing else is held. An OpenMP runtime (and MKL or BLIS on it) starts no thread before its first
parallel region, and OpenMP's limit, set after the fork, would reach only the thread that set it
(a sync tool runs in another). A library that starts threads as it loads otherwise still makes the
pool spawn. Libraries a worker loads after the fork (in ``setup()`` or a tool) are loaded with the
worker's own environment, which holds nothing: they start as in a spawned worker, and a worker's
own threads are no concern of the fork server's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

#: the variable the fork server holds at "1" while it imports (each worker's own value applies after the fork)
HELD = "OPENBLAS_NUM_THREADS"
#: what OpenBLAS reads for its thread count, the first one set (a positive whole number) wins
SOURCES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def hold_at_one(environ: MutableMapping[str, str]) -> None:
    """Set ``OPENBLAS_NUM_THREADS`` to ``"1"`` in ``environ``, whatever it was. Called by the fork
    server before it imports anything (OpenBLAS reads it as it loads); each forked worker then
    sets its threads from its own environment (:meth:`ThreadPools.set_for`), the user's value
    included."""
    environ[HELD] = "1"


def wanted_threads(env: Mapping[str, str], cpus: int) -> int:
    """Threads OpenBLAS starts with in a process with environment ``env`` that may run on ``cpus``
    CPUs: the first of :data:`SOURCES` that ``env`` sets to a positive whole number (of a list such
    as ``OMP_NUM_THREADS="4,2"``, the first), at most ``cpus``; else ``cpus``."""
    for name in SOURCES:
        first = env.get(name, "").split(",")[0].strip()
        if first.isdigit() and int(first) > 0:
            return min(int(first), cpus)
    return cpus


class ThreadPools:
    """The OpenBLAS libraries loaded in this process (threadpoolctl's controller, made once in the
    fork server after its imports, so that no worker pays for finding them), whose threads each
    forked worker sets (:meth:`set_for`).

    Raises:
        RuntimeError: an OpenBLAS is loaded and threadpoolctl cannot set its threads (it does not
            find it: an older threadpoolctl; it is missing; it raised where it cannot inspect this
            process): the fork server then does not fork (its workers would keep one BLAS thread).
            Without a loaded OpenBLAS, there is nothing to set, so nothing is raised.
    """

    def __init__(self) -> None:
        self._openblas: Any = ()
        if not _mapped("openblas"):
            return  # nothing held at one that a worker must set: threadpoolctl (~30 ms) is not needed
        try:
            import threadpoolctl

            self._openblas = threadpoolctl.ThreadpoolController().select(internal_api="openblas")
        except Exception as exc:
            raise RuntimeError(f"an OpenBLAS is loaded, and threadpoolctl cannot set its threads: {exc!r}") from exc
        if not len(self._openblas):
            raise RuntimeError(f"an OpenBLAS is loaded that threadpoolctl {threadpoolctl.__version__} does not find")

    def set_for(self, env: Mapping[str, str]) -> None:
        """In a forked worker, before its adapter's ``setup()``: OpenBLAS's threads as a spawned
        worker with environment ``env`` would have them (:func:`wanted_threads`)."""
        if len(self._openblas):
            self._openblas.limit(limits=wanted_threads(env, len(os.sched_getaffinity(0))))


def _mapped(name: str) -> bool:
    """Whether a file whose name holds ``name`` is mapped into this process (a loaded library)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return any(name.encode() in line.rpartition(b"/")[2] for line in maps)
    except OSError:
        return False
