"""Prometheus metrics of open pools: one collector per registry, reading each pool's parts when
scraped (nothing is counted twice: calls come from the same counters as ``Pool.statistics()``).
``_endpoint`` serves them.

Every metric has a ``pool`` label (the adapter's ``module:Class``; ``#2``, ``#3`` ... for more
pools of one adapter open at once on the same registry). A scrape runs in the HTTP server's
thread: it reads counters the Trio thread writes, each read whole under the GIL.

The per-session metrics (``session`` label: the session id, ``(none)`` for calls without one)
cover only the ``Monitoring.session_metrics`` sessions with the most calls queued, then in
flight, at that scrape: their series come and go with the ranking, and their number stays bounded.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from trio_bridge._host._metrics import LATENCY_BUCKETS, Histogram, Metrics

if TYPE_CHECKING:
    from trio_bridge._host._dispatch import Dispatcher
    from trio_bridge._host._supervisor import Supervisor
    from trio_bridge._host._worker import Worker
    from trio_bridge._state.backend import StateBackend
    from trio_bridge._wire.shared_memory import SharedMemoryPlane

_WORKER_STATES = ("starting", "ready", "draining", "dead")
NO_SESSION_LABEL = "(none)"  # the ``session`` label of calls without a session (no session id has parentheses)


@dataclass(frozen=True)
class PoolSource:
    """What a pool's metrics are read from."""

    metrics: Metrics
    supervisor: Supervisor
    dispatcher: Dispatcher[Worker]
    state: StateBackend
    plane: SharedMemoryPlane | None
    session_metrics: int = 10
    """How many sessions get series of their own (``Monitoring.session_metrics``)."""


class PoolsCollector(Collector):
    """The open pools registered on one registry; see the module doc for the metrics."""

    _by_registry: ClassVar[dict[int, PoolsCollector]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._pools: dict[str, PoolSource] = {}

    @classmethod
    @contextlib.contextmanager
    def registered(cls, registry: CollectorRegistry, adapter: str, source: PoolSource) -> Iterator[str]:
        """Show ``source`` on ``registry`` while the block runs; yields its ``pool`` label."""
        with cls._lock:
            collector = cls._by_registry.get(id(registry))
            if collector is None:
                collector = cls._by_registry[id(registry)] = cls()
                registry.register(collector)
            label, n = adapter, 1
            while label in collector._pools:
                n += 1
                label = f"{adapter}#{n}"
            collector._pools[label] = source
        try:
            yield label
        finally:
            with cls._lock:
                del collector._pools[label]
                if not collector._pools:
                    registry.unregister(collector)
                    del cls._by_registry[id(registry)]

    def describe(self) -> list[Metric]:
        return []  # names vary with the pools open; the registry need not check them

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            pools = list(self._pools.items())
        families = _Families()
        for label, source in pools:
            families.add(label, source)
        yield from families.all()


class _Families:
    def __init__(self) -> None:
        p = "trio_bridge_"
        self.calls = CounterMetricFamily(p + "calls", "Calls by tool and outcome (as Pool.statistics() counts them; replayed: answered from an idempotency key's record)", labels=["pool", "tool", "outcome"])
        self.queue_wait = HistogramMetricFamily(p + "call_queue_wait_seconds", "Seconds calls waited for a worker slot", labels=["pool"])
        self.service = HistogramMetricFamily(p + "call_service_seconds", "Seconds from taking a worker slot to the answer, answered calls", labels=["pool", "tool"])
        self.queued = GaugeMetricFamily(p + "queue_length", "Calls waiting for a worker slot", labels=["pool"])
        self.in_flight = GaugeMetricFamily(p + "calls_in_flight", "Worker slots taken", labels=["pool"])
        self.workers = GaugeMetricFamily(p + "workers", "Workers by state", labels=["pool", "state"])
        self.restarts = CounterMetricFamily(p + "worker_restarts", "Workers replaced after they died", labels=["pool"])
        self.recycles = CounterMetricFamily(p + "worker_recycles", "Workers recycled, by limit (or reload)", labels=["pool", "reason"])
        self.sessions = GaugeMetricFamily(p + "sessions", "Sessions in the pool's state backend", labels=["pool"])
        self.variables = GaugeMetricFamily(p + "variables", "Variables in the pool's state backend", labels=["pool"])
        self.watchers = GaugeMetricFamily(p + "watchers", "Variable watchers in this process", labels=["pool"])
        self.host_tools = CounterMetricFamily(p + "host_tool_calls", "Workers' calls of host tools by tool and outcome", labels=["pool", "tool", "outcome"])
        self.shm = GaugeMetricFamily(p + "shared_memory_bytes", "Bytes of shared-memory segments of the pool's processes", labels=["pool"])
        self.rss = GaugeMetricFamily(p + "worker_resident_memory_bytes", "Each worker's RSS, as its heartbeat said", labels=["pool", "worker"])
        self.cpu = CounterMetricFamily(p + "worker_cpu_seconds", "Each worker's CPU time, as its heartbeat said", labels=["pool", "worker"])
        self.served = CounterMetricFamily(p + "worker_calls", "Calls each worker served, as its heartbeat said", labels=["pool", "worker"])
        top = "(the Monitoring.session_metrics sessions with most calls queued, then in flight)"
        self.session_queued = GaugeMetricFamily(p + "session_queue_length", f"A session's calls waiting for a worker slot {top}", labels=["pool", "session"])
        self.session_in_flight = GaugeMetricFamily(p + "session_calls_in_flight", f"A session's calls on workers {top}", labels=["pool", "session"])
        self.session_wait = SummaryMetricFamily(p + "session_queue_wait_seconds", f"Seconds a session's calls waited for a worker slot {top}", labels=["pool", "session"])

    def add(self, label: str, source: PoolSource) -> None:
        metrics, supervisor = source.metrics, source.supervisor
        for (tool, outcome), count in list(metrics.by_tool.items()):
            self.calls.add_metric([label, tool, outcome], count)
        _histogram(self.queue_wait, [label], metrics.queue_wait)
        for tool, histogram in list(metrics.service_time.items()):
            _histogram(self.service, [label, tool], histogram)
        self.queued.add_metric([label], source.dispatcher.queued)
        self.in_flight.add_metric([label], supervisor.in_flight)
        handles = supervisor.live_handles()
        for state in _WORKER_STATES:
            self.workers.add_metric([label, state], sum(h.lifecycle.state.value == state for h in handles))
        self.restarts.add_metric([label], metrics.restarts)
        for reason, count in list(supervisor.recycles.items()):
            self.recycles.add_metric([label, reason], count)
        gauges = source.state.gauges()
        for family, key in ((self.sessions, "sessions"), (self.variables, "variables"), (self.watchers, "watchers")):
            if key in gauges:
                family.add_metric([label], gauges[key])
        for (tool, outcome), count in list(metrics.host_tool_calls.items()):
            self.host_tools.add_metric([label, tool, outcome], count)
        if source.plane is not None:
            self.shm.add_metric([label], source.plane.bytes_on_disk())
        for h in handles:
            figures = h.figures
            if figures.rss is not None:
                self.rss.add_metric([label, h.id], figures.rss)
            if figures.cpu_seconds is not None:
                self.cpu.add_metric([label, h.id], figures.cpu_seconds)
            if figures.calls_reported is not None:
                self.served.add_metric([label, h.id], figures.calls_reported)
        ranked = heapq.nlargest(
            source.session_metrics, source.dispatcher.sessions().items(), key=lambda kv: (kv[1].queued, kv[1].in_flight)
        )
        for session, figures in ranked:
            labels = [label, session or NO_SESSION_LABEL]
            self.session_queued.add_metric(labels, figures.queued)
            self.session_in_flight.add_metric(labels, figures.in_flight)
            self.session_wait.add_metric(labels, figures.calls, figures.wait_mean * figures.calls)

    def all(self) -> list[Metric]:
        return [
            self.calls, self.queue_wait, self.service, self.queued, self.in_flight, self.workers, self.restarts,
            self.recycles, self.sessions, self.variables, self.watchers, self.host_tools, self.shm, self.rss, self.cpu,
            self.served, self.session_queued, self.session_in_flight, self.session_wait,
        ]


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    counts = list(histogram.counts)
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric(labels, buckets, histogram.total)


def default_registry() -> CollectorRegistry:
    return REGISTRY
