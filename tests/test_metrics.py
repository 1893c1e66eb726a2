"""Prometheus metrics: what a scrape shows agrees with ``Pool.statistics()``; each pool has its
``pool`` label; nothing stays registered, listening or running after the pool closes. Then a
real pool's HTTP endpoint, with the workers' own figures from their heartbeats and host-tool
calls; and who may read its ``/status`` (beyond loopback: the pool's token, or an explicit
``status_public``), while ``/metrics`` stays open to Prometheus."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from functools import partial

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_for
from trio_bridge import InvalidArgumentError, Lifecycle, Monitoring, Recycling, ToolError, ToolNotFoundError, open_pool
from trio_bridge._top import fetch_status
from trio_bridge.testing import open_fake_pool


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition (parsed by prometheus_client's own parser)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[name, tuple(sorted(labels.items()))]


def fail(message: str) -> None:
    raise ValueError(message)


def add(a: int, b: int = 2) -> int:
    return a + b


async def test_a_scrape_agrees_with_statistics(autojump_clock):
    registry = CollectorRegistry()
    async with open_fake_pool({"add": add, "fail": fail}, size=2, monitoring=Monitoring(registry=registry)) as fake:
        pool = fake.pool
        for i in range(5):
            assert await pool.execute("add", {"a": i}) == i + 2
        for _ in range(2):
            with pytest.raises(ToolError):
                await pool.execute("fail", {"message": "no"})
        with pytest.raises(InvalidArgumentError):
            await pool.execute("add", {"a": "one"})  # the worker refuses the arguments: failed
        for name in ("nope", "nope-2"):
            with pytest.raises(ToolNotFoundError):
                await pool.execute(name)  # refused by the worker: nothing ran
        scraped = samples(generate_latest(registry).decode())
        stats = pool.statistics()
        label = "trio_bridge.testing:FakeWorker"
        tools = {dict(labels)["tool"] for (name, labels) in scraped if name == "trio_bridge_calls_total"}
        assert tools == {"add", "fail", "(unknown)"}  # names that are no tool do not grow the labels
        assert value(scraped, "trio_bridge_calls_total", pool=label, tool="add", outcome="completed") == stats.calls_completed == 5
        assert value(scraped, "trio_bridge_calls_total", pool=label, tool="fail", outcome="failed") == 2
        by_outcome: dict[str, float] = {}
        for (name, labels), v in scraped.items():
            if name == "trio_bridge_calls_total":
                outcome = dict(labels)["outcome"]
                by_outcome[outcome] = by_outcome.get(outcome, 0) + v
        assert by_outcome == {
            outcome: getattr(stats, f"calls_{outcome}")
            for outcome in ("completed", "failed", "crashed", "cancelled", "cancelled_queued", "refused")
            if getattr(stats, f"calls_{outcome}")
        }
        assert sum(by_outcome.values()) == stats.calls == 10
        answered = stats.calls_completed + stats.calls_failed
        service = sum(v for (name, _), v in scraped.items() if name == "trio_bridge_call_service_seconds_count")
        assert service == answered
        assert value(scraped, "trio_bridge_call_queue_wait_seconds_count", pool=label) == answered
        assert value(scraped, "trio_bridge_workers", pool=label, state="ready") == 2
        assert value(scraped, "trio_bridge_queue_length", pool=label) == 0
        assert value(scraped, "trio_bridge_worker_restarts_total", pool=label) == stats.restarts == 0
        async with pool.session() as session:
            await session.register_variable("t", "float", 1.0)
            async with session.watch_variables(["t"]):
                scraped = samples(generate_latest(registry).decode())
                assert value(scraped, "trio_bridge_sessions", pool=label) == 1
                assert value(scraped, "trio_bridge_variables", pool=label) == 1
                assert value(scraped, "trio_bridge_watchers", pool=label) == 1
    assert b"trio_bridge_" not in generate_latest(registry)  # unregistered with the pool


async def test_pools_of_one_adapter_are_told_apart_and_recycles_are_counted(autojump_clock):
    registry = CollectorRegistry()
    async with (
        open_fake_pool({"add": add}, monitoring=Monitoring(registry=registry), recycling=Recycling(max_calls=2)) as first,
        open_fake_pool({"add": add}, monitoring=Monitoring(registry=registry)) as second,
    ):
        for _ in range(4):
            await first.pool.execute("add", {"a": 1})
        await second.pool.execute("add", {"a": 1})
        await trio.sleep(1)
        scraped = samples(generate_latest(registry).decode())
        label = "trio_bridge.testing:FakeWorker"
        assert value(scraped, "trio_bridge_calls_total", pool=label, tool="add", outcome="completed") == 4
        assert value(scraped, "trio_bridge_calls_total", pool=label + "#2", tool="add", outcome="completed") == 1
        recycles = value(scraped, "trio_bridge_worker_recycles_total", pool=label, reason="calls")
        assert recycles == first.pool.statistics().recycles["calls"] >= 1


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:port", ":99999", 9464])
async def test_a_bad_metrics_address_is_refused_before_anything_starts(address):
    with pytest.raises(InvalidArgumentError, match=r"Monitoring\.address"):
        async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address=address)):
            pytest.fail("the pool opened")


async def test_a_metrics_address_in_use_is_refused_clearly(autojump_clock):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidArgumentError, match="cannot listen there"):
            async with open_fake_pool({"add": add}, monitoring=Monitoring(address=f"127.0.0.1:{port}", registry=CollectorRegistry())):
                pytest.fail("the pool opened")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


@pytest.mark.real_process
async def test_a_real_pool_serves_its_metrics_with_the_workers_own_figures():
    registry = CollectorRegistry()
    async with open_pool(
        "tests.tool_adapters:Agent", size=2, lifecycle=Lifecycle(heartbeat_interval=0.2), monitoring=Monitoring(registry=registry, address="127.0.0.1:0"),
    ) as pool:
        assert pool.metrics_address is not None
        url = f"http://{pool.metrics_address}/metrics"

        @pool.host_tool
        def lookup(word: str) -> int:
            return len(word)

        assert await pool.execute("ask_host", {"name": "lookup", "arguments": {"word": "abc"}}) == 3
        await wait_for(lambda: all(w.cpu_seconds for w in pool.workers()), timeout=10)
        scraped = samples(await trio.to_thread.run_sync(get, url))
        label = "tests.tool_adapters:Agent"
        assert value(scraped, "trio_bridge_calls_total", pool=label, tool="ask_host", outcome="completed") == 1
        assert value(scraped, "trio_bridge_host_tool_calls_total", pool=label, tool="lookup", outcome="completed") == 1
        for worker in pool.workers():
            assert value(scraped, "trio_bridge_worker_resident_memory_bytes", pool=label, worker=worker.id) > 10 * 2**20
            assert value(scraped, "trio_bridge_worker_cpu_seconds_total", pool=label, worker=worker.id) > 0
        assert value(scraped, "trio_bridge_workers", pool=label, state="ready") == 2

        async def served() -> float:  # as the workers' heartbeats report it
            scraped = samples(await trio.to_thread.run_sync(get, url))
            return sum(value(scraped, "trio_bridge_worker_calls_total", pool=label, worker=w.id) for w in pool.workers())

        await wait_for(lambda: served(), timeout=10)
        assert await served() == 1  # the one ask_host call
        with pytest.raises(urllib.error.HTTPError) as missing:
            await trio.to_thread.run_sync(get, f"http://{pool.metrics_address}/nope")
        assert missing.value.code == 404
    with pytest.raises(OSError):  # the server is gone with the pool
        await trio.to_thread.run_sync(get, url)


TOKEN = "a-pool-token-of-32-characters-00"


def ask(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """``GET url`` (with ``token`` as a bearer): the status code, headers and body, errors included."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


async def test_status_beyond_loopback_answers_only_the_pools_token():
    # bound on every interface, so not loopback, though the test reaches it through 127.0.0.1
    async with open_fake_pool(
        {"add": add, "fail": fail}, monitoring=Monitoring(address="0.0.0.0:0", registry=CollectorRegistry(), token=TOKEN),
    ) as fake:
        with pytest.raises(ToolError):
            await fake.pool.execute("fail", {"message": "the password is hunter2"})
        assert fake.pool.metrics_address is not None and fake.pool.metrics_address.startswith("0.0.0.0:")
        here = f"127.0.0.1:{fake.pool.metrics_address.rpartition(':')[2]}"
        for token in (None, "a-wrong-token-of-32-characters-0", TOKEN[:-1]):
            code, headers, body = await trio.to_thread.run_sync(ask, f"http://{here}/status", token)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            assert b"hunter2" not in body and b"Authorization: Bearer" in body
        code, _, body = await trio.to_thread.run_sync(ask, f"http://{here}/status", TOKEN)
        assert code == 200
        assert "hunter2" in json.loads(body)["recent_errors"][0]["error"]
        code, _, body = await trio.to_thread.run_sync(ask, f"http://{here}/metrics")  # Prometheus needs no token
        assert code == 200 and b"trio_bridge_calls_total" in body
        # what trio-bridge top reads with
        assert (await trio.to_thread.run_sync(partial(fetch_status, here, token=TOKEN)))["adapter"]
        with pytest.raises(PermissionError, match=r"401 Unauthorized.*--token-file"):
            await trio.to_thread.run_sync(fetch_status, here)
        with pytest.raises(PermissionError, match="refused this token"):
            await trio.to_thread.run_sync(partial(fetch_status, here, token="a-wrong-token-of-32-characters-0"))


async def test_status_on_loopback_or_made_public_needs_no_token(monkeypatch):
    async with (
        open_fake_pool({"add": add}, monitoring=Monitoring(address="127.0.0.1:0", registry=CollectorRegistry(), token=TOKEN)) as local,
        open_fake_pool({"add": add}, monitoring=Monitoring(address="0.0.0.0:0", status_public=True, registry=CollectorRegistry())) as public,
    ):
        for fake in (local, public):
            assert fake.pool.metrics_address is not None
            code, _, body = await trio.to_thread.run_sync(
                ask, f"http://127.0.0.1:{fake.pool.metrics_address.rpartition(':')[2]}/status",
            )
            assert code == 200 and json.loads(body)["workers"]
    monkeypatch.setenv("TRIO_BRIDGE_STATUS_PUBLIC", "1")  # a deployment opts out without touching the program
    open_pool("tests.adapters:Echo", monitoring=Monitoring(address="0.0.0.0:9464"))  # checked at once; not entered
    monkeypatch.setenv("TRIO_BRIDGE_STATUS_PUBLIC", "maybe")
    with pytest.raises(InvalidArgumentError, match="TRIO_BRIDGE_STATUS_PUBLIC='maybe'"):
        open_pool("tests.adapters:Echo", monitoring=Monitoring(address="0.0.0.0:9464"))


@pytest.mark.parametrize("address", ["0.0.0.0:9464", ":::9464", "192.0.2.7:9464", "metrics.example.com:9464"])
async def test_status_beyond_loopback_without_a_token_is_refused_saying_how_to_fix_it(address, monkeypatch):
    monkeypatch.delenv("TRIO_BRIDGE_STATUS_PUBLIC", raising=False)
    with pytest.raises(InvalidArgumentError) as refused:
        async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address=address)):
            pytest.fail("the pool opened")
    message = str(refused.value)
    assert "not loopback" in message and "token=" in message and "127.0.0.1" in message and "status_public=True" in message
    with pytest.raises(InvalidArgumentError, match="at least 16 characters"):
        async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address=address, token="short")):
            pytest.fail("the pool opened")
    with pytest.raises(InvalidArgumentError, match="status_public must be True or False"):
        async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address=address, status_public="yes")):  # type: ignore[arg-type]
            pytest.fail("the pool opened")
