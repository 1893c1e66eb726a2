"""Pool statistics, with one owner: every call's outcome is counted here, once.

A call made through ``Pool.execute``/``Pool.stream``/``Session`` ends in exactly one outcome, so
``calls_completed + calls_failed + calls_crashed + calls_cancelled + calls_refused`` is the number
of calls made (see :class:`PoolStatistics` for what each one means).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import final

from trio_bridge._util import public_module

_LATENCY_WINDOW = 4096  # answered calls kept for the latency percentiles


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    CANCELLED_QUEUED = "cancelled_queued"
    REFUSED = "refused"


@final
@public_module
@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot from :meth:`Pool.statistics`.

    Attributes:
        size: worker slots the pool keeps filled.
        workers_ready: workers ready to take calls now.
        queued: calls waiting for a free worker slot now.
        in_flight: worker slots taken now, including cancelled calls whose worker has not yet
            let go of them.
        calls_completed: calls that returned a result (a stream: that ran to its end).
        calls_failed: calls a worker answered with an error: the tool raised (``ToolError``),
            the worker refused the arguments or could not encode the result, or the call's
            deadline passed in the worker.
        calls_crashed: calls whose worker died during the call (``WorkerCrashedError``).
        calls_cancelled: calls cancelled by their caller (or its deadline) while a worker ran
            them, or whose stream the caller left early.
        calls_cancelled_queued: calls cancelled, or timed out, while waiting for a worker slot.
        calls_refused: calls refused before any worker ran them: the queue was full
            (``PoolSaturatedError``), the pool was closing, the session's worker was busy under
            ``strict_fail_fast``, no worker could start, or the host found the call itself
            wrong (an unencodable argument, an ended session).
        restarts: workers replaced after they died (or the pool killed them: a failed health
            check, a cancelled call not freed within ``cancel_grace``).
        recycles: workers replaced because they passed a recycling limit, by kind of limit
            (``"calls"``, ``"age"``, ``"memory"``; see ``open_pool``'s ``max_calls_per_worker``).
        latency_p50, latency_p90, latency_p99: seconds from taking a worker slot to the answer
            (a stream: to its end), over the last 4,096 completed or failed calls; ``None``
            before the first.
    """

    size: int
    workers_ready: int
    queued: int
    in_flight: int
    calls_completed: int
    calls_failed: int
    calls_crashed: int
    calls_cancelled: int
    calls_cancelled_queued: int
    calls_refused: int
    restarts: int
    recycles: Mapping[str, int]
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None

    @property
    def calls(self) -> int:
        """Calls made: the sum of the six outcomes."""
        return (
            self.calls_completed + self.calls_failed + self.calls_crashed + self.calls_cancelled
            + self.calls_cancelled_queued + self.calls_refused
        )


class Metrics:
    """The pool's counters. Not thread-safe: touched from the Trio thread only."""

    def __init__(self) -> None:
        self.counts: collections.Counter[Outcome] = collections.Counter()
        self.restarts: int = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)

    def record(self, outcome: Outcome, latency: float | None = None) -> None:
        """Count one call's outcome; ``latency`` (seconds) for answered calls."""
        self.counts[outcome] += 1
        if latency is not None and outcome in (Outcome.COMPLETED, Outcome.FAILED):
            self._latencies.append(latency)

    def snapshot(self, *, size: int, workers_ready: int, queued: int, in_flight: int, recycles: Mapping[str, int]) -> PoolStatistics:
        ordered = sorted(self._latencies)
        c = self.counts
        return PoolStatistics(
            size=size, workers_ready=workers_ready, queued=queued, in_flight=in_flight,
            calls_completed=c[Outcome.COMPLETED], calls_failed=c[Outcome.FAILED], calls_crashed=c[Outcome.CRASHED],
            calls_cancelled=c[Outcome.CANCELLED], calls_cancelled_queued=c[Outcome.CANCELLED_QUEUED],
            calls_refused=c[Outcome.REFUSED], restarts=self.restarts, recycles=dict(recycles),
            latency_p50=_percentile(ordered, 0.50), latency_p90=_percentile(ordered, 0.90),
            latency_p99=_percentile(ordered, 0.99),
        )


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
