"""Pool statistics, with one owner: every call's outcome is counted here, once.

A call made through ``Pool.execute``/``Pool.stream``/``Session`` ends in exactly one outcome, so
``calls_completed + calls_failed + calls_crashed + calls_cancelled + calls_cancelled_queued +
calls_refused + calls_replayed`` is the number of calls made (see :class:`PoolStatistics` for what
each one means).
"""

from __future__ import annotations

import bisect
import collections
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import final

from trio_bridge._util import public_module

_LATENCY_WINDOW = 4096  # answered calls kept for the latency percentiles
_WORKER_LATENCY_WINDOW = 1024  # answered calls kept per worker for its latency percentiles
_RECENT_ERRORS = 20     # failed calls kept for the live view


class Outcome(enum.Enum):
    # Members are singletons: hashed by identity (in C) rather than Enum's hash of the name in
    # Python, as they key the per-call counters.
    __hash__: Callable[[object], int] = object.__hash__

    COMPLETED = "completed"
    FAILED = "failed"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    CANCELLED_QUEUED = "cancelled_queued"
    REFUSED = "refused"
    REPLAYED = "replayed"


@final
@public_module
@dataclass(frozen=True)
class SessionQueueStatistics:
    """One session's share of the pool's workers, in :attr:`PoolStatistics.sessions` (see the
    README's "Fair sessions").

    Attributes:
        queued: its calls waiting for a worker slot now.
        in_flight: its calls on workers now (slots it holds).
        calls: its calls handed to a worker so far (while the dispatcher knew the session: the
            figures start again once a session that ended is used again).
        wait_mean, wait_max: seconds its calls waited for a slot, mean and longest, over
            ``calls`` (0 before the first).
        weight: its weight (``Pool.session(weight=)``; 1 for calls without a session).
        max_in_flight: its bound on calls on workers at once, or ``None``.
    """

    queued: int
    in_flight: int
    calls: int
    wait_mean: float
    wait_max: float
    weight: float
    max_in_flight: int | None


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
            wrong (an unencodable argument, an ended session, a malformed idempotency key or one
            used for another call: ``IdempotencyConflictError``).
        calls_replayed: calls with an idempotency key answered from the record of an earlier
            call with that key (its result, or its ``ToolError``), without running; such a call
            is counted here only, not as completed or failed again.
        restarts: workers replaced after they died (or the pool killed them: a failed health
            check, a cancelled call not freed within ``cancel_grace``).
        recycles: workers replaced because they passed a recycling limit, by kind of limit
            (``"calls"``, ``"age"``, ``"memory"``; see :class:`~trio_bridge.Recycling`), or by
            :meth:`Pool.reload` (``"reload"``).
        latency_p50, latency_p90, latency_p99: seconds from taking a worker slot to the answer
            (a stream: to its end), over the last 4,096 completed or failed calls; ``None``
            before the first.
        sessions: the wait queue of each session known to the dispatcher, by session id: one
            with a block open (``Pool.session``) or with calls waiting or on workers; ``""`` is
            the calls made without a session (see :class:`SessionQueueStatistics`).
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
    calls_replayed: int
    restarts: int
    recycles: Mapping[str, int]
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    sessions: Mapping[str, SessionQueueStatistics] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """Calls made: the sum of the seven outcomes."""
        return (
            self.calls_completed + self.calls_failed + self.calls_crashed + self.calls_cancelled
            + self.calls_cancelled_queued + self.calls_refused + self.calls_replayed
        )


#: upper bounds (seconds) of the latency histograms' buckets: 100 us to 60 s
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class Histogram:
    """Observations counted into :data:`LATENCY_BUCKETS` (not cumulative), with their sum:
    what a Prometheus histogram exports, kept without a lock (one thread writes)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


#: The ``tool`` label of calls of a tool that does not exist: callers' names would grow the
#: metrics without bound.
UNKNOWN_TOOL = "(unknown)"


class Metrics:
    """The pool's counters. Written from the Trio thread only; a metrics scrape reads them from
    another thread (each read is of a whole number or list, so it sees a recent value).

    Attributes:
        counts: calls by outcome (what :class:`PoolStatistics` shows).
        by_tool: calls by ``(tool, outcome value)``.
        queue_wait: seconds calls waited for a worker slot (calls that got one).
        service_time: seconds from taking a slot to the answer, by tool (answered calls).
        restarts: workers replaced after they died.
        host_tool_calls: workers' calls of host tools by ``(tool, outcome)``.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[Outcome] = collections.Counter()
        self.by_tool: collections.Counter[tuple[str, str]] = collections.Counter()
        self.queue_wait: Histogram = Histogram()
        self.service_time: dict[str, Histogram] = collections.defaultdict(Histogram)
        self.restarts: int = 0
        self.host_tool_calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.recent_errors: collections.deque[dict[str, object]] = collections.deque(maxlen=_RECENT_ERRORS)
        """The last failed or crashed calls: ``{"time" (Unix seconds), "tool", "outcome", "error"}``."""
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)

    def error(self, tool: str, outcome: Outcome, exc: BaseException) -> None:
        """A call failed (``outcome``) with ``exc``: kept among :attr:`recent_errors`."""
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]  # a ToolError's remote traceback follows
        self.recent_errors.append({"time": time.time(), "tool": tool, "outcome": outcome.value, "error": text[:500]})

    def host_tool_call(self, tool: str, outcome: str) -> None:
        """A worker's call of a host tool ended (``outcome``: ``completed``, ``failed``,
        ``refused``, ``cancelled`` or ``deadline_exceeded``)."""
        self.host_tool_calls[tool, outcome] += 1

    def record(self, outcome: Outcome, latency: float | None = None, *, tool: str = "", queued: float | None = None) -> None:
        """Count one call of ``tool`` by its outcome; ``latency`` (seconds) for answered calls,
        ``queued``: seconds it waited for a worker slot, if it got one."""
        self.counts[outcome] += 1
        self.by_tool[tool, outcome.value] += 1
        if queued is not None:
            self.queue_wait.observe(queued)
        if latency is not None and outcome in (Outcome.COMPLETED, Outcome.FAILED):
            self._latencies.append(latency)
            self.service_time[tool].observe(latency)

    def snapshot(
        self, *, size: int, workers_ready: int, queued: int, in_flight: int, recycles: Mapping[str, int],
        sessions: Mapping[str, SessionQueueStatistics] | None = None,
    ) -> PoolStatistics:
        ordered = sorted(self._latencies)
        c = self.counts
        return PoolStatistics(
            size=size, workers_ready=workers_ready, queued=queued, in_flight=in_flight,
            calls_completed=c[Outcome.COMPLETED], calls_failed=c[Outcome.FAILED], calls_crashed=c[Outcome.CRASHED],
            calls_cancelled=c[Outcome.CANCELLED], calls_cancelled_queued=c[Outcome.CANCELLED_QUEUED],
            calls_refused=c[Outcome.REFUSED], calls_replayed=c[Outcome.REPLAYED], restarts=self.restarts, recycles=dict(recycles),
            latency_p50=_percentile(ordered, 0.50), latency_p90=_percentile(ordered, 0.90),
            latency_p99=_percentile(ordered, 0.99), sessions=dict(sessions or {}),
        )


class WorkerFigures:
    """One worker's statistics (what :class:`~trio_bridge.WorkerInfo` shows of them), kept by
    the pool's calls (:meth:`answered`, :meth:`crashed`), its heartbeat (:meth:`report`) and
    its supervisor (``last_recycle_reason``).

    Attributes:
        calls_served: calls it answered (a result or an error of the call's own).
        calls_failed: calls that ended with an error (answered with one, or lost with it).
        rss: its resident set size (bytes), as its heartbeat said or the pool sampled.
        cpu_seconds: CPU seconds its process used so far, as its heartbeat said.
        calls_reported: calls it served, as its heartbeat said (a remote worker counts every host's).
        last_recycle_reason: why its slot's worker was last recycled (see ``WorkerInfo``).
    """

    def __init__(self) -> None:
        self.calls_served: int = 0
        self.calls_failed: int = 0
        self.rss: int | None = None
        self.cpu_seconds: float | None = None
        self.calls_reported: int | None = None
        self.last_recycle_reason: str | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=_WORKER_LATENCY_WINDOW)

    def answered(self, *, failed: bool, seconds: float | None = None) -> None:
        """It answered a call (``failed``: with an error); ``seconds`` from taking its slot to
        the answer, for its percentiles (unary calls)."""
        self.calls_served += 1
        self.calls_failed += failed
        if seconds is not None:
            self._latencies.append(seconds)

    def crashed(self) -> None:
        """A call on it ended because it died (or its connection failed)."""
        self.calls_failed += 1

    def report(self, *, rss: int, cpu_seconds: float, calls_served: int) -> None:
        """What the worker said of itself in its heartbeat (0: it did not say)."""
        if rss:
            self.rss = rss
        if cpu_seconds:
            self.cpu_seconds = cpu_seconds
        self.calls_reported = calls_served

    def latency_percentiles(self) -> tuple[float | None, float | None]:
        """Its latencies' 50th and 99th percentiles (seconds; ``None`` before an answer)."""
        ordered = sorted(self._latencies)
        return _percentile(ordered, 0.5), _percentile(ordered, 0.99)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
