"""Fair queueing between sessions with real worker processes: a session that floods the queue
does not hold up another's calls; weights and max_in_flight reach the dispatcher; the
per-session figures in statistics() and Prometheus."""

from __future__ import annotations

import pytest
import trio
from prometheus_client import CollectorRegistry

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import InvalidArgumentError, Monitoring

pytestmark = pytest.mark.real_process

ECHO = "tests.adapters:Echo"


async def test_a_flooding_session_does_not_hold_up_another():
    """The issue's check: on a pool of 2, session A queues 300 calls of 20 ms; session B's 5
    calls, sent while A's wait, finish in well under a second (first-come first-served would
    put them behind A's ~3 s of queued work)."""
    async with trio_bridge.open_pool(ECHO, size=2) as pool:
        async with pool.session() as a, pool.session() as b:
            a_done = 0

            async def call_a() -> None:
                nonlocal a_done
                await a.execute("sleep", {"seconds": 0.02})
                a_done += 1

            latencies: list[float] = []

            async def call_b() -> None:
                start = trio.current_time()
                await b.execute("sleep", {"seconds": 0.02})
                latencies.append(trio.current_time() - start)

            async with trio.open_nursery() as nursery:
                for _ in range(300):
                    nursery.start_soon(call_a)
                await wait_for(lambda: pool.statistics().sessions.get(a.id) is not None and pool.statistics().sessions[a.id].queued >= 290)
                a_before = a_done
                start = trio.current_time()
                async with trio.open_nursery() as b_calls:
                    for _ in range(5):
                        b_calls.start_soon(call_b)
                b_all = trio.current_time() - start
                a_meanwhile = a_done - a_before
                stats = pool.statistics().sessions
                a_left = stats[a.id].queued
            print(
                f"\nB's 5 calls: all done in {b_all * 1e3:.0f} ms; each {', '.join(f'{s * 1e3:.0f}' for s in sorted(latencies))} ms; "
                f"A finished {a_meanwhile} calls meanwhile and had {a_left} still queued; "
                f"B waited {stats[b.id].wait_mean * 1e3:.0f} ms on average, {stats[b.id].wait_max * 1e3:.0f} ms at most"
            )
            assert b_all < 1.0
            assert a_meanwhile <= 12  # B's 5 calls took turns with A's: about as many of A's ran meanwhile
            assert a_left >= 250
            assert stats[b.id].calls == 5 and stats[b.id].queued == 0
        assert pool.statistics().sessions.keys() == {""}  # the sessions' blocks ended: their queues are gone


async def test_max_in_flight_and_weight_of_a_session():
    registry = CollectorRegistry()
    async with trio_bridge.open_pool(ECHO, size=2, monitoring=Monitoring(registry=registry, session_metrics=1)) as pool:
        for weight in (float("nan"), float("inf"), 0, 0.001, 101, "2", True, None):
            with pytest.raises(InvalidArgumentError, match=r"weight must be a number from 0\.01 to 100"):
                pool.session(weight=weight)  # type: ignore[arg-type]
        for bound in (0, -1, 1.5, True, "3"):
            with pytest.raises(InvalidArgumentError, match="max_in_flight must be a whole number >= 1"):
                pool.session(max_in_flight=bound)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="session_metrics must be a whole number >= 0"):
            Monitoring(session_metrics=-1)
        async with pool.session(weight=3, max_in_flight=1) as capped, pool.session() as other:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(capped.execute, "sleep", {"seconds": 0.3})
                await wait_for(lambda: pool.statistics().sessions[capped.id].queued == 2)
                figures = pool.statistics().sessions[capped.id]
                assert (figures.in_flight, figures.weight, figures.max_in_flight) == (1, 3.0, 1)
                assert pool.statistics().workers_ready == 2  # a worker is free, yet the session waits
                assert await other.execute("echo", {"value": 1}) == 1  # others are not held up
                samples = {
                    (m.name, s.labels.get("session")): s.value for m in registry.collect() for s in m.samples
                    if m.name.startswith("trio_bridge_session_")
                }
                assert samples[("trio_bridge_session_queue_length", capped.id)] == 2  # the top 1 session only
                assert {session for _, session in samples} == {capped.id}
            assert pool.statistics().sessions[capped.id].calls == 3


async def test_calls_nested_in_a_call_of_a_session_at_max_in_flight_run_through():
    async with trio_bridge.open_pool("tests.tool_adapters:Agent", size=2) as pool:
        async with pool.session(max_in_flight=1) as capped:

            @pool.host_tool
            async def same_session(x: float) -> object:  # a host tool calling its caller's session
                return await capped.execute("where", {"x": x})

            with trio.fail_after(60):  # the point: no deadlock on the session's one place
                # a worker's call of another worker's tool, routed by the host in the same session
                assert (await capped.execute("relay", {"x": 2.0}))["other"]["x"] == 2.0
                async with trio.open_nursery() as nursery:  # the second outer call waits for the first
                    for x in (1.0, 3.0):
                        nursery.start_soon(capped.execute, "ask_host", {"name": "same_session", "arguments": {"x": x}})
            figures = pool.statistics().sessions[capped.id]
            assert (figures.calls, figures.in_flight, figures.queued) == (6, 0, 0)
