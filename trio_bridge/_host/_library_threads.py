"""How many threads each local worker's native libraries (BLAS, OpenMP, ...) start:
``LocalWorkers(library_threads=...)``.

Each such library starts one thread per CPU by default, so N workers computing at once on M
CPUs would run N x M threads, and the first threaded call of each pays for starting threads that
then spin, idle, on CPUs its siblings need. As joblib's loky backend does
(``joblib/_parallel_backends.py``: ``ParallelBackendBase.MAX_NUM_THREADS_VARS`` and
``_prepare_worker_env``, which give each worker ``max(cpu_count() // n_jobs, 1)`` threads unless
the parent's environment sets the variable) and Dask's nanny does (its
``distributed.nanny.pre-spawn-environ`` sets ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` to 1 in each worker), the pool gives each local worker
``max(1, usable CPUs // the pool's local size)`` threads, through the variables those libraries
read as they load (:data:`VARIABLES`), unless the user set them.

The user's value wins, variable by variable: a variable of :data:`VARIABLES` set in
``LocalWorkers(env=...)`` or in a slot's ``slot_env`` is left as it is, and so is one the host's
environment sets, unless ``library_threads`` was given (the explicit value wins over the ambient
one, as joblib's explicit ``inner_max_num_threads`` does). A spawned
worker reads them as it starts; a forked one has them in its ``os.environ`` before its adapter's
``setup()``, and its OpenBLAS (held at one thread while the fork server imported) is set from them
after the fork (:mod:`trio_bridge.worker._threads`), so both start the same threads. The fork
server imports with them too, so that a library it loads (an OpenMP runtime reads
``OMP_NUM_THREADS`` as it loads) has a spawned worker's settings. Remote workers are not touched:
their own machine's environment applies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

#: the variables that set native libraries' thread counts, as joblib lists them
#: (``ParallelBackendBase.MAX_NUM_THREADS_VARS``): OpenMP (and MKL, BLIS on it), OpenBLAS, MKL,
#: BLIS, Apple's Accelerate, numba, numexpr
VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS",
)


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where
    that is missing), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(library_threads: int | None, local_workers: int) -> int:
    """Threads each local worker's libraries get: ``library_threads`` where it is given (0: the
    libraries' own default, nothing set), else ``max(1, usable CPUs // local_workers)``."""
    if library_threads is not None:
        return library_threads
    return max(1, usable_cpus() // max(1, local_workers))


def library_thread_environment(
    library_threads: int | None, local_workers: int, *, given: Iterable[Mapping[str, str]],
) -> dict[str, str]:
    """The variables of :data:`VARIABLES` that the local workers get, each set to
    :func:`threads_per_worker`, except those that a mapping of ``given`` sets (the host's
    environment, the pool's ``env``): the user's value wins. ``{}`` for ``library_threads=0``
    or a pool without local workers."""
    threads = threads_per_worker(library_threads, local_workers)
    if threads == 0 or local_workers == 0:
        return {}
    taken = {name for env in given for name in VARIABLES if name in env}
    return {name: str(threads) for name in VARIABLES if name not in taken}
