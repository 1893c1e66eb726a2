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
one, as joblib's explicit ``inner_max_num_threads`` does). A variable whose library would read
one the user set in its place (:data:`FALLBACKS`) gets that value: ``OMP_NUM_THREADS=1`` alone
still gives OpenBLAS, MKL, BLIS and numexpr one thread. A spawned worker reads them as it
starts; a forked one has them in its ``os.environ`` before its adapter's ``setup()``, and its
OpenBLAS (held at one thread while the fork server imported) is set from them after the fork
(:mod:`trio_bridge.worker._threads`).
The fork server imports with the pool's values (a slot's ``slot_env`` is not in it), so that a
library it loads (an OpenMP runtime reads ``OMP_NUM_THREADS`` as it loads) has a spawned worker's
settings; what a library read as the fork server loaded it, a worker's ``slot_env`` does not
change (OpenBLAS's threads excepted). Remote workers are not touched: their own machine's
environment applies.

Usable CPUs: :func:`trio_bridge._host._cpus.usable_cpus` (at most a container's CPU quota).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from trio_bridge._host._cpus import usable_cpus

#: the variables that set native libraries' thread counts, as joblib lists them
#: (``ParallelBackendBase.MAX_NUM_THREADS_VARS``): OpenMP (and MKL, BLIS on it), OpenBLAS, MKL,
#: BLIS, Apple's Accelerate, numba, numexpr
VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS",
)


#: what a library reads when its own variable is not set: OpenBLAS ``GOTO_NUM_THREADS``, then
#: ``OMP_NUM_THREADS``; MKL, BLIS and numexpr ``OMP_NUM_THREADS``
FALLBACKS: dict[str, tuple[str, ...]] = {
    "OPENBLAS_NUM_THREADS": ("GOTO_NUM_THREADS", "OMP_NUM_THREADS"), "MKL_NUM_THREADS": ("OMP_NUM_THREADS",),
    "BLIS_NUM_THREADS": ("OMP_NUM_THREADS",), "NUMEXPR_NUM_THREADS": ("OMP_NUM_THREADS",),
}


def threads_per_worker(library_threads: int | None, local_workers: int) -> int:
    """Threads each local worker's libraries get: ``library_threads`` where it is given (0: the
    libraries' own default, nothing set), else ``max(1, usable CPUs // local_workers)``."""
    if library_threads is not None:
        return library_threads
    return max(1, usable_cpus() // max(1, local_workers))


def library_thread_environment(
    library_threads: int | None, local_workers: int, *, given: Iterable[Mapping[str, str]],
) -> dict[str, str]:
    """The variables of :data:`VARIABLES` that the local workers get: none that the user's
    mappings ``given`` set (the host's environment, the pool's ``env``, a slot's ``slot_env``, in
    the order they apply); one whose library would read a variable the user set in its place
    (:data:`FALLBACKS`) set to that value, so that no other value of the host's environment
    comes first; every other one set to :func:`threads_per_worker`. An empty value counts as
    unset, as the libraries read it. ``{}`` for ``library_threads=0`` or a pool without local
    workers."""
    threads = threads_per_worker(library_threads, local_workers)
    if threads == 0 or local_workers == 0:
        return {}
    users: dict[str, str] = {}
    for env in given:
        users.update(env)
    chosen: dict[str, str] = {}
    for name in VARIABLES:
        if users.get(name):
            continue  # the user's own
        stand_in = next((users[other] for other in FALLBACKS.get(name, ()) if users.get(other)), None)
        chosen[name] = stand_in if stand_in is not None else str(threads)
    return chosen


def with_library_threads(
    library_threads: int | None, local_workers: int, *, host: Mapping[str, str], env: Mapping[str, str],
    slot_envs: Sequence[Mapping[str, str]],
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The pool's variables (:func:`library_thread_environment`; for the fork server's imports),
    and each slot's ``slot_envs`` with its own variables beneath it (its ``slot_env`` counted as
    the user's). The host's environment ``host`` counts as the user's only when
    ``library_threads`` is ``None``."""
    given = (env,) if library_threads is not None else (host, env)
    pool = library_thread_environment(library_threads, local_workers, given=given)
    slots = [{**library_thread_environment(library_threads, local_workers, given=(*given, own)), **own} for own in slot_envs]
    return pool, slots
