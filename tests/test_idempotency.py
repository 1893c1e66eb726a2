"""Idempotent calls (``idempotency_key=``): for a key at most one execution completes; later
calls get its result, or its ToolError, from the record; the same key for another call is
refused; a crash or a cancellation records nothing, so a retry runs again; records expire; and
across hosts on one Redis, racing calls run once per key."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from functools import partial

import numpy as np
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import (
    IdempotencyConflictError,
    InvalidArgumentError,
    Lifecycle,
    MemoryBackend,
    Monitoring,
    PoolClosedError,
    QuotaExceededError,
    RedisBackend,
    StateLimits,
    StateUnavailableError,
    ToolError,
    WorkerCrashedError,
)
from trio_bridge.testing import open_fake_pool, open_pool_in_threads

ONCE = "tests.idempotency_adapters:Once"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---- the checks, with worker processes ----

@pytest.mark.real_process
async def test_five_concurrent_calls_and_a_sixth_run_once_and_get_one_result(tmp_path):
    effects = tmp_path / "effects"
    arguments = {"path": str(effects), "value": "v", "seconds": 1.0}
    async with trio_bridge.open_pool(ONCE, size=2) as pool:
        results = []

        async def call() -> None:
            results.append(await pool.execute("run", arguments, idempotency_key="order-17"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(call)
        await call()  # the sixth, after the first finished
        assert len(results) == 6 and all(r == results[0] for r in results)
        assert len(_lines(effects)) == 1  # the side effect happened once

        with pytest.raises(IdempotencyConflictError, match="'order-17' was used for a call with other arguments") as conflict:
            await pool.execute("run", {**arguments, "value": "w"}, idempotency_key="order-17")
        assert conflict.value.key == "order-17"
        with pytest.raises(IdempotencyConflictError, match="tool 'run', not 'fail'"):
            await pool.execute("fail", {"path": str(effects), "message": "x"}, idempotency_key="order-17")
        async with pool.session() as session:
            with pytest.raises(IdempotencyConflictError, match="no session, not session"):
                await session.execute("run", arguments, idempotency_key="order-17")
        assert len(_lines(effects)) == 1  # the refused calls ran nothing
        stats = pool.statistics()
        assert (stats.calls_completed, stats.calls_replayed, stats.calls_refused) == (1, 5, 3)


@pytest.mark.real_process
async def test_a_tool_error_is_recorded_and_a_crash_is_not(tmp_path):
    effects = tmp_path / "effects"
    async with trio_bridge.open_pool(ONCE, size=1, lifecycle=Lifecycle(restart_backoff=(0.05, 0.1))) as pool:
        raised = []
        for _ in range(2):
            with pytest.raises(ToolError) as error:
                await pool.execute("fail", {"path": str(effects), "message": "boom"}, idempotency_key="pay-1")
            raised.append(error.value)
        assert [(e.remote_type, e.remote_message) for e in raised] == [("ValueError", "boom")] * 2
        assert raised[1].remote_traceback == raised[0].remote_traceback
        assert len(_lines(effects)) == 1  # the retry did not run again

        crash = tmp_path / "crash"
        arguments = {"path": str(crash), "value": "c", "seconds": 60.0}
        async with trio.open_nursery() as nursery:
            async def first() -> None:
                with pytest.raises(WorkerCrashedError):
                    await pool.execute("run", arguments, idempotency_key="pay-2")

            nursery.start_soon(first)
            await wait_for(lambda: len(_lines(crash)) == 1, timeout=30)
            os.kill(pool.workers()[0].pid, signal.SIGKILL)
        with trio.fail_after(60):
            await pool.wait_for_workers(1)
            retried = await pool.execute("run", {**arguments, "seconds": 0.0}, idempotency_key="pay-2")
        assert retried["value"] == "c" and len(_lines(crash)) == 2  # the crash recorded nothing: it ran again
        assert (await pool.execute("run", {**arguments, "seconds": 0.0}, idempotency_key="pay-2")) == retried
        stats = pool.statistics()
        assert (stats.calls_failed, stats.calls_crashed, stats.calls_completed, stats.calls_replayed) == (1, 1, 1, 2)


# ---- the rules, on fake workers and the Trio clock ----

def _counted(counter: list[int]):
    async def work(x: int = 0, seconds: float = 0.0) -> dict:
        counter.append(x)
        await trio.sleep(seconds)
        return {"x": x, "run": len(counter), "array": np.arange(3, dtype=np.int16)}

    return work


async def test_records_expire_after_the_ttl(autojump_clock):
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}, state_limits=StateLimits(idempotency_ttl=10)) as fake:
        pool = fake.pool
        first = await pool.execute("work", {"x": 1}, idempotency_key="k")
        await trio.sleep(9)
        second = await pool.execute("work", {"x": 1}, idempotency_key="k")
        assert second["run"] == first["run"] == 1 and np.array_equal(second["array"], np.arange(3))
        await trio.sleep(10.5)  # 10 s after the record was written: gone
        assert (await pool.execute("work", {"x": 1}, idempotency_key="k"))["run"] == 2
        assert pool.statistics().calls_replayed == 1


async def test_bad_keys_are_refused_and_run_nothing(autojump_clock):
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}) as fake:
        for key in ("", "k" * 201, 17, b"key"):
            with pytest.raises(InvalidArgumentError, match="idempotency_key must be a str of 1-200 characters"):
                await fake.pool.execute("work", idempotency_key=key)  # type: ignore[arg-type]
        assert await fake.pool.execute("work", idempotency_key="k" * 200)
        assert runs == [0] and fake.pool.statistics().calls_refused == 4


async def test_argument_order_does_not_matter_and_arrays_compare_by_dtype_shape_and_bytes(autojump_clock):
    runs: list[int] = []

    def echo(value: object = None, other: object = None) -> int:
        runs.append(1)
        return len(runs)

    async with open_fake_pool({"echo": echo}) as fake:
        pool = fake.pool
        value = {"b": [1, {"y": 2, "x": 1}], "a": np.zeros((2, 2), np.float32)}
        assert await pool.execute("echo", {"value": value, "other": 1}, idempotency_key="a") == 1
        reordered = {"a": np.zeros((2, 2), np.float32), "b": [1, {"x": 1, "y": 2}]}
        assert await pool.execute("echo", {"other": 1, "value": reordered}, idempotency_key="a") == 1
        for changed in (np.zeros((2, 2), np.float64), np.zeros((4,), np.float32), np.ones((2, 2), np.float32)):
            with pytest.raises(IdempotencyConflictError, match="other arguments"):
                await pool.execute("echo", {"value": {**reordered, "a": changed}, "other": 1}, idempotency_key="a")
        assert runs == [1]


async def test_cancelling_the_first_caller_releases_the_key_to_a_waiter(autojump_clock):
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}, size=2) as fake:
        pool = fake.pool
        got = []
        async with trio.open_nursery() as nursery:
            async def first() -> None:
                with trio.move_on_after(1):
                    await pool.execute("work", {"seconds": 5}, idempotency_key="k")
                got.append("first")

            async def waiter() -> None:
                await trio.sleep(0.5)
                result = await pool.execute("work", {"seconds": 5}, idempotency_key="k")
                got.append(f"waiter ran it: run {result['run']}")

            nursery.start_soon(first)
            nursery.start_soon(waiter)
        assert got == ["first", "waiter ran it: run 2"] and len(runs) == 2
        stats = pool.statistics()
        assert (stats.calls_cancelled, stats.calls_completed, stats.calls_replayed) == (1, 1, 0)
        # a waiter's own cancel scope bounds its wait
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(pool.execute, "work", {"seconds": 5}, idempotency_key="j"))
            await trio.sleep(0.1)
            with trio.move_on_after(1) as waited:
                await pool.execute("work", {"seconds": 5}, idempotency_key="j")
        assert waited.cancelled_caught and pool.statistics().calls_cancelled_queued == 1


async def test_a_call_longer_than_its_lease_keeps_the_key_by_renewing_it(autojump_clock):
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}, size=2) as fake:
        pool = fake.pool
        results = []
        async with trio.open_nursery() as nursery:
            for delay in (0, 15, 40):  # the lease is 10 s: the later callers come after several renewals
                async def call(delay: float = delay) -> None:
                    await trio.sleep(delay)
                    results.append(await pool.execute("work", {"seconds": 60}, idempotency_key="long"))

                nursery.start_soon(call)
        assert len(runs) == 1 and [r["run"] for r in results] == [1, 1, 1]
        assert trio.current_time() == pytest.approx(60, abs=1)


async def test_a_result_over_max_value_bytes_is_returned_once_then_refused(autojump_clock):
    def big() -> bytes:
        return b"x" * 5000

    async with open_fake_pool({"big": big}, state_limits=StateLimits(max_value_bytes=1000)) as fake:
        assert await fake.pool.execute("big", idempotency_key="k") == b"x" * 5000
        with pytest.raises(QuotaExceededError, match=r"'k' returned a result of 5,\d+ bytes, over .* max_value_bytes \(1,000\)"):
            await fake.pool.execute("big", idempotency_key="k")


async def test_replays_are_counted_in_prometheus(autojump_clock):
    registry = CollectorRegistry()
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}, monitoring=Monitoring(registry=registry)) as fake:
        for _ in range(3):
            await fake.pool.execute("work", idempotency_key="k")
        text = generate_latest(registry).decode()
    calls = {
        s.labels["outcome"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == "trio_bridge_calls_total" and s.labels["tool"] == "work"
    }
    assert calls == {"completed": 1, "replayed": 2}


async def test_a_lapsed_lease_is_taken_over_and_its_holder_cannot_finish(autojump_clock):
    backend = MemoryBackend(idempotency_ttl=60)
    claim = await backend.claim_call("k", "f", 3.0)
    assert claim.state == "claimed"
    await trio.sleep(2)
    assert await backend.renew_call("k", claim.token, 3.0)
    await trio.sleep(2.5)
    assert (await backend.claim_call("k", "f", 3.0)).state == "running"  # renewed: still held
    with trio.fail_after(1):
        await backend.wait_call("k", 0.01)  # returns when the lease lapses
    taken = await backend.claim_call("k", "f", 3.0)
    assert taken.state == "claimed" and taken.token != claim.token
    assert not await backend.finish_call("k", claim.token, b"late")
    assert await backend.finish_call("k", taken.token, b"r")
    done = await backend.claim_call("k", "f", 3.0)
    assert (done.state, done.record) == ("done", b"r")
    assert (await backend.claim_call("k", "g", 3.0)).state == "conflict"
    short = MemoryBackend(idempotency_ttl=1)  # a held claim lives as long as its lease, past the TTL
    held = await short.claim_call("h", "f", 3.0)
    await trio.sleep(2)
    assert (await short.claim_call("h", "f", 3.0)).state == "running"
    assert await short.finish_call("h", held.token, b"r")
    await trio.sleep(1.5)
    assert (await short.claim_call("h", "f", 3.0)).state == "claimed"  # the record lived 1 s


async def test_pool_call_and_session_call_take_the_key_keyword_only():
    async with open_pool_in_threads("trio_bridge.adapters:PythonAdapter", size=1, adapter_options={"allow": ["numpy"]}) as pool:
        first = await pool.call("numpy.random.rand", 3, idempotency_key="draw")
        assert np.array_equal(await pool.call("numpy.random.rand", 3, idempotency_key="draw"), first)
        with pytest.raises(IdempotencyConflictError, match="other arguments"):
            await pool.call("numpy.random.rand", 4, idempotency_key="draw")
        async with pool.session() as session:
            drawn = await session.call("numpy.random.rand", 2, idempotency_key="in-session")
            assert np.array_equal(await session.call("numpy.random.rand", 2, idempotency_key="in-session"), drawn)
        assert pool.statistics().calls_replayed == 2


class _SlowRenewals(MemoryBackend):
    """Its second renewal is slow: it fails after ``seconds`` (a Redis command timing out), or,
    with ``seconds=None``, never answers."""

    def __init__(self, seconds: float | None, command_timeout: float | None = None) -> None:
        super().__init__()
        self.seconds, self._timeout = seconds, command_timeout
        self.renewals = 0
        self.leases: list[float] = []

    @property
    def command_timeout(self) -> float | None:
        return self._timeout

    async def claim_call(self, key, fingerprint, lease):
        self.leases.append(lease)
        return await super().claim_call(key, fingerprint, lease)

    async def renew_call(self, key, token, lease):
        self.renewals += 1
        if self.renewals == 2:
            if self.seconds is None:
                await trio.sleep_forever()
            await trio.sleep(self.seconds)
            raise StateUnavailableError("Redis did not answer within 5 s")
        return await super().renew_call(key, token, lease)


@pytest.mark.parametrize("seconds", [5.0, None], ids=["times-out", "hangs"])
async def test_a_slow_renewal_is_retried_before_the_claim_lapses(autojump_clock, seconds):
    # The lease is 10 s: renewed at 3.3 s, the next renewal (6.7 s) is slow; a retry must come
    # before 13.3 s, when the claim would lapse and a second caller would run the tool again.
    runs: list[int] = []
    state = _SlowRenewals(seconds)
    async with open_fake_pool({"work": _counted(runs)}, size=2, state=state) as fake:
        results = []
        async with trio.open_nursery() as nursery:
            for delay in (0, 14):
                async def call(delay: float = delay) -> None:
                    await trio.sleep(delay)
                    results.append(await fake.pool.execute("work", {"seconds": 20}, idempotency_key="k"))

                nursery.start_soon(call)
        assert len(runs) == 1 and [r["run"] for r in results] == [1, 1] and state.renewals > 3
    # a backend whose commands may take 5 s gets a lease of three of them
    slow = _SlowRenewals(0.0, command_timeout=5.0)
    async with open_fake_pool({"work": _counted(runs)}, state=slow) as fake:
        await fake.pool.execute("work", idempotency_key="k")
    assert slow.leases == [15.0]
    assert RedisBackend("redis://localhost:1", timeout=7).command_timeout == 7 and MemoryBackend().command_timeout is None


async def test_a_keyed_call_on_a_closed_pool_is_refused(autojump_clock):
    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}) as fake:
        pool = fake.pool
        await pool.execute("work", idempotency_key="a")
    for key in (None, "a", "b"):
        with pytest.raises(PoolClosedError, match="the pool is closed"):
            await pool.execute("work", idempotency_key=key)
    assert runs == [0] and pool.statistics().calls_refused == 3


async def test_a_fault_of_trio_bridge_is_not_recorded_as_the_tools_error(autojump_clock):
    from trio_bridge._wire.errors import exception_from
    from trio_bridge._wire.generated.trio_bridge.v1 import ErrorInfo

    for kind, internal in (("tool_error", False), ("internal", True), ("state", True), ("a-later-kind", True)):
        error = exception_from(ErrorInfo(kind=kind, type="FutureError", message="m"), "t")
        assert isinstance(error, ToolError) and error.internal is internal
    runs: list[int] = []

    def broken(internal: bool = True) -> None:
        runs.append(1)
        raise ToolError("broken", "RuntimeError", "a fault in the worker", internal=internal)

    async with open_fake_pool({"broken": broken}) as fake:
        for _ in range(2):
            with pytest.raises(ToolError, match="a fault in the worker") as raised:
                await fake.pool.execute("broken", idempotency_key="k")
            assert raised.value.internal
        assert len(runs) == 2  # not recorded: the retry ran again
        for _ in range(2):
            with pytest.raises(ToolError) as raised:
                await fake.pool.execute("broken", {"internal": False}, idempotency_key="j")
            assert not raised.value.internal
        assert len(runs) == 3  # the tool's own error is recorded


async def test_the_memory_backend_keeps_at_most_max_idempotency_records_keys(autojump_clock):
    backend = MemoryBackend(max_idempotency_records=3)
    done = []
    for key in ("a", "b"):
        claim = await backend.claim_call(key, "f", 10)
        assert await backend.finish_call(key, claim.token, key.encode())
        done.append(claim)
    running = await backend.claim_call("r", "f", 10)
    assert (await backend.claim_call("c", "f", 10)).state == "claimed"  # "a", the oldest record, made room
    assert (await backend.claim_call("b", "f", 10)).state == "done"
    assert (await backend.claim_call("a", "f", 10)).state == "claimed"  # new again; "b" made room
    assert len(backend.calls) == 3
    with pytest.raises(QuotaExceededError, match=r"3 idempotent calls are running.*max_idempotency_records=3"):
        await backend.claim_call("d", "f", 10)  # "r", "c" and "a": all running calls' claims
    assert await backend.renew_call("r", running.token, 10)
    await trio.sleep(5)
    assert await backend.renew_call("r", running.token, 10)
    await trio.sleep(6)  # the other claims lapsed, "r" did not
    assert (await backend.claim_call("d", "f", 10)).state == "claimed"  # a lapsed claim made room
    assert (await backend.claim_call("r", "f", 10)).state == "running"

    runs: list[int] = []
    async with open_fake_pool({"work": _counted(runs)}, size=2, state_limits=StateLimits(max_idempotency_records=2)) as fake:
        pool = fake.pool
        for key in ("a", "b", "c", "b", "a"):
            await pool.execute("work", idempotency_key=key)
        assert len(runs) == 4  # "a" was dropped for "c", and ran again
        async with trio.open_nursery() as nursery:
            for key in ("x", "y"):
                nursery.start_soon(partial(pool.execute, "work", {"seconds": 5}, idempotency_key=key))
            await trio.sleep(1)
            with pytest.raises(QuotaExceededError, match=r"StateLimits\.max_idempotency_records"):
                await pool.execute("work", idempotency_key="z")
        assert len(runs) == 6


async def test_session_call_refuses_an_idempotency_key_with_store_as():
    async with open_pool_in_threads("trio_bridge.adapters:PythonAdapter", size=1, adapter_options={"allow": ["collections"]}) as pool:
        async with pool.session() as session:
            with pytest.raises(InvalidArgumentError, match=r"store_as='d'.*cannot take an idempotency_key.*one worker's memory"):
                await session.call("collections.OrderedDict", store_as="d", idempotency_key="k")
            assert await session.list_stored() == {}
            assert pool.statistics().calls_completed == 1  # list_stored: the refused call ran nothing


def test_idempotency_ttl_is_checked():
    with pytest.raises(InvalidArgumentError, match=r"StateLimits\.idempotency_ttl"):
        StateLimits(idempotency_ttl=0)
    with pytest.raises(InvalidArgumentError, match="idempotency_ttl"):
        MemoryBackend(idempotency_ttl=float("inf"))
    with pytest.raises(InvalidArgumentError, match=r"StateLimits\.max_idempotency_records"):
        StateLimits(max_idempotency_records=0)
    for bad in (0, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="max_idempotency_records must be a whole number >= 1"):
            MemoryBackend(max_idempotency_records=bad)  # type: ignore[arg-type]


# ---- Redis: across hosts ----

def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def test_redis_claims_leases_records_and_their_ttl(nursery, redis_server):
    prefix = _prefix()
    a, b = RedisBackend(redis_server.url, prefix=prefix), RedisBackend(redis_server.url, prefix=prefix, idempotency_ttl=1)
    for host in (a, b):
        await nursery.start(host.run)
    claim = await a.claim_call("k", "f", 0.3)
    assert claim.state == "claimed"
    assert (await b.claim_call("k", "f", 0.3)).state == "running"
    assert (await b.claim_call("k", "g", 0.3)).state == "conflict"
    await trio.sleep(0.5)  # a stopped renewing: its lease lapsed
    taken = await b.claim_call("k", "f", 0.3)
    assert taken.state == "claimed"
    assert not await a.finish_call("k", claim.token, b"late") and not await a.release_call("k", claim.token)
    assert await b.renew_call("k", taken.token, 5.0)
    await trio.sleep(0.5)
    assert (await a.claim_call("k", "f", 0.3)).state == "running"  # renewed
    assert await b.finish_call("k", taken.token, b"\x00record")
    done = await a.claim_call("k", "f", 0.3)
    assert (done.state, done.record) == ("done", b"\x00record")
    await trio.sleep(1.5)  # b wrote it with idempotency_ttl=1
    assert (await a.claim_call("k", "f", 0.3)).state == "claimed"
    released = await a.claim_call("r", "f", 10)
    assert await a.release_call("r", released.token)
    assert (await b.claim_call("r", "f", 10)).state == "claimed"


@pytest.mark.real_process
async def test_two_host_processes_racing_on_one_redis_run_each_key_once(tmp_path, redis_server):
    effects, prefix = tmp_path / "effects", _prefix()
    command = [sys.executable, "-m", "tests.idempotency_host", redis_server.url, prefix, str(effects), "100", "20"]
    outputs: list[dict] = []

    async def host() -> None:
        done = await trio.run_process(command, capture_stdout=True, cwd=ROOT)
        outputs.append(json.loads(done.stdout.decode().splitlines()[-1]))

    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(host)
            await wait_for(lambda: len(list(tmp_path.glob("effects.ready-*"))) == 2, timeout=120)
            (tmp_path / "effects.go").touch()  # both hosts' pools are open: they start together
    lines = _lines(effects)
    per_host = [(o["statistics"]["calls_completed"], o["statistics"]["calls_replayed"]) for o in outputs]
    print(f"executions: {len(lines)}; (completed, replayed) per host: {per_host}")
    assert [o["errors"] for o in outputs] == [[], []]
    assert sorted(line.split()[0] for line in lines) == sorted(f"key-{i}" for i in range(20))  # 20 executions
    for key in (f"key-{i}" for i in range(20)):
        tokens = {token for o in outputs for token in o["results"][key]}
        assert len(tokens) == 1  # all 200 calls of the key, on both hosts, got the one result
    completed = sum(o["statistics"]["calls_completed"] for o in outputs)
    replayed = sum(o["statistics"]["calls_replayed"] for o in outputs)
    assert (completed, replayed) == (20, 180)
