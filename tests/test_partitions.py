"""Many machines on one: a head (this process) and worker, Redis and head hosts in network
namespaces of a test bed (tests/netbed.py), whose links are cut silently and healed under live
calls, streams, watches and state writes; workers found through the bed's DNS server.

Each test prints its figures (detection time, calls served meanwhile, recovery time, writes
lost): ``pytest -s tests/test_partitions.py`` shows them. The bounds asserted are the documented
ones plus a margin for a loaded CI machine: detection within the health check's interval plus
its timeout (2 s + 2 s), a rejoin within ``connect_timeout`` + the longest backoff (3 s + 5 s).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import trio

import trio_bridge
from tests.netbed import HEAD, ROOT, NetBed
from trio_bridge import (
    Lifecycle,
    RedisBackend,
    RemoteWorkers,
    StateUnavailableError,
    TrioBridgeError,
    WorkerCrashedError,
)

pytestmark = [pytest.mark.netbed, pytest.mark.real_process]

ADAPTER = "tests.partition_adapters:Partitioned"
NAME = "workers.bed.test"
PORT = 7000
DETECTION = 4.0 + 2.0  # seconds: health check interval + its timeout, + a margin
REJOIN = 3.0 + 5.0 + 2.0  # seconds: connect_timeout + the longest restart backoff, + a margin


def _remote(bed: NetBed, **overrides) -> RemoteWorkers:
    """The head's RemoteWorkers: every worker of ``NAME``, resolved by the bed's DNS server."""
    return RemoteWorkers(**{
        "addresses": [f"dns://{NAME}:{PORT}"], "token": bed.token, "tls": bed.tls(HEAD),
        "nameservers": [f"{bed.dns.address}:{bed.dns.port}"], "resolve_interval": 0.5,
    } | overrides)


def _address(bed: NetBed, host: str) -> str:
    return f"tcp:{bed.address(host)}:{PORT}"


def _ready_at(pool: trio_bridge.Pool, address: str) -> bool:
    return any(w.address == address and w.state == "ready" for w in pool.workers())


async def _until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held (polled every 50 ms); fails after ``timeout``."""
    began = trio.current_time()
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
    return trio.current_time() - began


class Traffic:
    """Calls of ``echo`` made back to back by ``tasks`` tasks until stopped: what succeeded and
    what failed (each failure kept)."""

    def __init__(self, pool: trio_bridge.Pool) -> None:
        self.pool = pool
        self.served = 0
        self.failures: list[BaseException] = []

    async def run(self, tasks: int = 4) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.pool.execute("echo", {"value": 1})
                except TrioBridgeError as exc:
                    self.failures.append(exc)
                    await trio.sleep(0.05)
                else:
                    self.served += 1

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(loop)


@pytest.mark.parametrize("partition", [3.0, 12.0])
async def test_a_partition_mid_call_fails_the_cut_workers_call_and_after_the_heal_the_slot_serves_again_free(tmp_path, partition):
    with NetBed(["w1", "w2"], tmp_path) as bed:
        w1 = bed.start_worker("w1", ADAPTER, names=[NAME])
        bed.start_worker("w2", ADAPTER, names=[NAME])
        bed.dns.set(NAME, [bed.address("w1")])
        async with trio_bridge.open_pool(ADAPTER, size=0, remote=_remote(bed)) as pool:
            await _until(lambda: _ready_at(pool, _address(bed, "w1")), 10)
            outcome: dict[str, object] = {}

            async def long_call() -> None:  # on w1: the only worker yet
                try:
                    await pool.execute("cooperative_sleep", {"seconds": 60})
                except TrioBridgeError as exc:
                    outcome["error"], outcome["at"] = exc, trio.current_time()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_call)
                await _until(lambda: pool.statistics().in_flight == 1, 5)
                bed.dns.set(NAME, [bed.address("w1"), bed.address("w2")])
                await _until(lambda: _ready_at(pool, _address(bed, "w2")), 10)
                traffic = Traffic(pool)
                nursery.start_soon(traffic.run)
                await trio.sleep(0.5)
                cut_at, served_before = trio.current_time(), traffic.served
                bed.cut("w1")
                await _until(lambda: "error" in outcome, DETECTION)
                await trio.sleep(max(0.0, cut_at + partition - trio.current_time()))
                served_meanwhile = traffic.served - served_before
                bed.heal("w1")
                recovery = await _until(lambda: _ready_at(pool, _address(bed, "w1")), REJOIN)
                nursery.cancel_scope.cancel()

            error = outcome["error"]
            detection = float(outcome["at"]) - cut_at  # type: ignore[arg-type]
            assert isinstance(error, WorkerCrashedError) and _address(bed, "w1") in str(error)
            assert served_meanwhile > 0  # w2 served on while w1 was cut off
            # only calls that were on w1 failed, each saying so
            assert all(isinstance(e, WorkerCrashedError) and _address(bed, "w1") in str(e) for e in traffic.failures)
            # The rejoined worker is free: its abandoned call was cancelled (it has one thread),
            # so a call that reaches it is answered at once.
            w1_pid = next(w.pid for w in pool.workers() if w.address == _address(bed, "w1"))
            pids: set[int] = set()
            with trio.fail_after(5):
                while w1_pid not in pids:
                    async with trio.open_nursery() as nursery:
                        for _ in range(2):
                            nursery.start_soon(_collect_pid, pool, pids)
            print(
                f"\npartition {partition:g} s mid-call: detected in {detection:.2f} s; {served_meanwhile} calls served on "
                f"w2 meanwhile, {len(traffic.failures)} failed (on w1); w1 ready again {recovery:.2f} s after the heal"
            )
        assert "cancelled 1" in w1.log.read_text()  # the worker cancelled the call the head gave up on


async def _collect_pid(pool: trio_bridge.Pool, pids: set[int]) -> None:
    pids.add(await pool.execute("pid"))


async def test_a_partition_mid_stream_fails_it_and_a_watch_through_a_short_one_loses_no_update(tmp_path):
    with NetBed(["w1", "db"], tmp_path) as bed:
        bed.start_worker("w1", ADAPTER, names=[NAME])
        bed.dns.set(NAME, [bed.address("w1")])
        state = RedisBackend(bed.redis("db"), timeout=2.0)
        remote = _remote(bed, listen=f"tcp://{bed.head.address}:0")  # where w1 calls the head back (its watch)
        async with trio_bridge.open_pool(ADAPTER, size=0, remote=remote, state=state) as pool:
            await _until(lambda: _ready_at(pool, _address(bed, "w1")), 10)
            # a stream: it fails, clearly, within the detection bound
            chunks = 0
            with pytest.raises(WorkerCrashedError, match="lost connection to worker at"):
                async with pool.stream("count", {"n": 10_000, "delay": 0.05}) as stream:
                    async for _ in stream:
                        chunks += 1
                        if chunks == 5:
                            cut_at = trio.current_time()
                            bed.cut("w1")
            detection = trio.current_time() - cut_at
            assert detection < DETECTION
            bed.heal("w1")
            recovery = await _until(lambda: _ready_at(pool, _address(bed, "w1")), REJOIN)
            # a watch on w1 through a cut shorter than the health check: every update arrives, in order
            async with pool.session() as session:
                await session.register_variable("x", "integer", 0)
                seen: list = []

                async def watch() -> None:
                    seen.extend(await session.execute("watch", {"name": "x", "count": 41}))

                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch)
                        await trio.sleep(0.5)
                        for value in range(1, 41):
                            await session.set_variable("x", value)
                            if value == 10:
                                bed.cut("w1")
                            if value == 20:
                                bed.heal("w1")
                            await trio.sleep(0.05)
                assert seen == [["initial", 0], *(["change", v] for v in range(1, 41))]
        print(f"\nmid-stream: failed {detection:.2f} s after the cut; w1 ready {recovery:.2f} s after the heal; "
              f"a watch through a 1 s cut saw all 40 updates")


async def test_redis_cut_off_from_one_head_of_two_fails_that_heads_state_calls_and_loses_no_write(tmp_path):
    with NetBed(["db", "hb"], tmp_path) as bed:
        url = bed.redis("db")
        state = RedisBackend(url, timeout=1.0, history_limit=1000)
        head = RemoteWorkers(listen="tcp://127.0.0.1:0", token="a-token-for-the-partition-tests-0123")
        async with trio_bridge.open_pool("tests.adapters:Echo", size=0, remote=head, state=state) as pool:
            async with pool.session("shared") as session:
                await session.register_variable("a", "integer", 0)
                await session.register_variable("b", "integer", 0)
                other = bed.popen(
                    "hb", [sys.executable, "-m", "tests.partition_head", url, "shared", "b", "6"],
                    stdout=subprocess.PIPE, cwd=str(ROOT),
                )
                acked: list[int] = []
                errors: list[tuple[float, BaseException]] = []
                value = 0
                await trio.sleep(1.0)
                cut_at, cut_clock = trio.current_time(), time.monotonic()
                bed.cut(HEAD)
                healed_at = None
                recovered_at = None
                while trio.current_time() - cut_at < 4.0 or recovered_at is None:
                    value += 1
                    began = trio.current_time()
                    try:
                        await session.set_variable("a", value)
                    except StateUnavailableError as exc:
                        errors.append((trio.current_time() - began, exc))
                    else:
                        acked.append(value)
                        if healed_at is not None and recovered_at is None:
                            recovered_at = trio.current_time()
                    if healed_at is None and trio.current_time() - cut_at >= 2.5:
                        bed.heal(HEAD)
                        healed_at, healed_clock = trio.current_time(), time.monotonic()
                    await trio.sleep(0.05)
                lines = [json.loads(line) for line in (await trio.to_thread.run_sync(other.communicate))[0].splitlines()]
                b_writes = [line for line in lines if "value" in line]
                final_b = next(line["final"] for line in lines if "final" in line)
                assert other.returncode == 0
                # while cut off, this head's state calls failed within the timeout (+ a margin); the other head wrote on
                assert errors and all(seconds < 1.0 + 1.0 for seconds, _ in errors)
                b_acked = [w["value"] for w in b_writes if w["ok"]]
                b_during_cut = [w for w in b_writes if w["ok"] and cut_clock <= w["at"] <= healed_clock]
                assert len(b_acked) == len(b_writes) and b_during_cut
                # no write lost, and both heads read the same values
                mine = await session.get_variables(["a", "b"])
                assert mine == final_b
                assert mine["a"] == acked[-1] and mine["b"] == b_acked[-1]
                history = {entry.value for entry in await session.variable_history("a")} | {mine["a"]}
                assert set(acked) <= history
                history_b = {entry.value for entry in await session.variable_history("b")} | {mine["b"]}
                assert set(b_acked) <= history_b
        print(
            f"\nRedis cut off from this head for {healed_at - cut_at:.1f} s: {len(errors)} writes failed with "
            f"StateUnavailableError, each within {max(s for s, _ in errors):.2f} s; the other head wrote "
            f"{len(b_during_cut)} meanwhile ({len(b_acked)} in all, none failed); writes work again {recovered_at - healed_at:.2f} s after the heal; "
            f"acknowledged writes lost: 0 of {len(acked) + len(b_acked)}"
        )


async def test_a_head_cut_off_from_its_workers_while_shutting_down_closes_within_its_bound(tmp_path):
    with NetBed(["w1", "w2"], tmp_path) as bed:
        for host in ("w1", "w2"):
            bed.start_worker(host, ADAPTER, names=[NAME])
        bed.dns.set(NAME, [bed.address("w1"), bed.address("w2")])
        lifecycle = Lifecycle(shutdown_timeout=2.0)
        failed: list[BaseException] = []

        async def call_from_outside(pool: trio_bridge.Pool) -> None:  # made by a task the pool's block does not own
            try:
                await pool.execute("cooperative_sleep", {"seconds": 60})
            except TrioBridgeError as exc:
                failed.append(exc)

        async with trio.open_nursery() as outside:
            async with trio_bridge.open_pool(ADAPTER, size=0, remote=_remote(bed), lifecycle=lifecycle) as pool:
                await _until(lambda: pool.statistics().workers_ready == 2, 10)
                outside.start_soon(call_from_outside, pool)
                await _until(lambda: pool.statistics().in_flight == 1, 5)
                bed.cut(HEAD)
                began = trio.current_time()
            # the pool closed (drained: the call runs on, unanswered) with its workers out of reach
        closed_in = trio.current_time() - began
        assert closed_in < lifecycle.shutdown_timeout + 3.0
        assert len(failed) == 1 and isinstance(failed[0], TrioBridgeError)
        print(f"\na head cut off from its workers closed in {closed_in:.2f} s (shutdown_timeout 2 s); the call in flight "
              f"failed with {type(failed[0]).__name__}: {failed[0]}")


async def test_a_head_with_no_local_workers_follows_its_workers_in_dns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "trio_bridge")
    with NetBed(["w1", "w2", "w3", "w4"], tmp_path) as bed:
        for host in ("w1", "w2", "w3"):
            bed.start_worker(host, ADAPTER, names=[NAME])
        bed.start_worker("w4", ADAPTER)  # its certificate does not carry NAME: refused
        pids = {}
        bed.dns.set(NAME, [bed.address("w1"), bed.address("w2")])
        async with trio_bridge.open_pool(ADAPTER, size=0, remote=_remote(bed)) as pool:
            assert await pool.execute("echo", {"value": "first"}) == "first"  # waits for a first worker
            await _until(lambda: pool.statistics().workers_ready == 2, 10)
            assert pool.size == 2
            bed.dns.set(NAME, [bed.address(h) for h in ("w1", "w2", "w3")])
            appeared = await _until(lambda: _ready_at(pool, _address(bed, "w3")), 10)
            async with trio.open_nursery() as nursery:
                for _ in range(30):
                    nursery.start_soon(_collect_pid, pool, pids.setdefault("all", set()))
            assert len(pids["all"]) == 3  # all three served
            bed.dns.set(NAME, [bed.address(h) for h in ("w2", "w3")])
            left = await _until(lambda: pool.size == 2 and not any(w.address == _address(bed, "w1") for w in pool.workers()), 10)
            bed.dns.answering = False  # a resolver outage keeps the last known set
            await trio.sleep(3.0)
            assert pool.size == 2 and pool.statistics().workers_ready == 2
            bed.dns.answering = True
            bed.dns.set(NAME, [bed.address(h) for h in ("w2", "w3", "w4")])
            await trio.sleep(2.0)
            assert not _ready_at(pool, _address(bed, "w4")) and pool.statistics().workers_ready == 2
            assert any(_address(bed, "w4") in r.getMessage() and "CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)
            bed.dns.remove(NAME)  # NXDOMAIN: no workers
            await _until(lambda: pool.size == 0, 10)
        print(f"\nDNS: a third worker served {appeared:.2f} s after it appeared; a slot left {left:.2f} s after its "
              "address went; an outage of 3 s kept both; a worker whose certificate lacks the name was refused")
