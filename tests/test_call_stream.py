"""The host's side of a worker's call stream, spoken from Trio with h2 (``_host/_call_stream.py``),
against a real worker process over plain TCP: calls, big in-band values both ways, a caller's
cancellation reaching the worker, a refused secret, and the worker's death."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import numpy as np
import pytest
import trio

from trio_bridge._aio import TransportError
from trio_bridge._host._call_stream import H2CallStream
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge.testing import RemoteWorkerProcess, free_port, write_token_file

pytestmark = pytest.mark.real_process


def _request(tool: str, call_id: str, **arguments: object) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(tool_name=tool, call_id=call_id, arguments=encode(arguments, path="arguments", plane=None))


@pytest.fixture
def worker(tmp_path) -> Iterator[tuple[RemoteWorkerProcess, str]]:
    token = secrets.token_hex(16)
    write_token_file(tmp_path / "token", token)
    process = RemoteWorkerProcess("tests.adapters:Echo", f"tcp://127.0.0.1:{free_port('127.0.0.1')}", tmp_path / "token")
    process.start()
    try:
        yield process, token
    finally:
        process.kill()


async def test_calls_big_values_and_a_cancelled_call_reach_the_worker(worker):
    process, token = worker
    big = np.random.default_rng(2).standard_normal(5 << 18).astype(np.float32)  # 5 MiB: big frames, owned buffer
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, token)
        await nursery.start(calls.run)
        reply = await calls.execute(_request("add", "c1", a=1))
        assert reply.error is None and decode(reply.result, plane=None) == 3
        for i, value in enumerate((big, big[::-1] + 1)):  # in-band, both ways, in order
            reply = await calls.execute(_request("echo", f"e{i}", value=value))
            echoed = decode(reply.result, plane=None)
            assert echoed.dtype == value.dtype and np.array_equal(echoed, value)
        with trio.move_on_after(0.3) as scope:
            await calls.execute(_request("async_sleep", "s1", seconds=60))
        assert scope.cancelled_caught
        with trio.fail_after(10):  # the worker took the cancellation: its slot is free
            reply = await calls.execute(_request("add", "c2", a=5))
        assert decode(reply.result, plane=None) == 7 and not calls.ended
        nursery.cancel_scope.cancel()
    assert calls.ended


async def test_a_wrong_secret_fails_the_calls_with_the_workers_refusal(worker):
    process, _ = worker
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, "not-the-token")
        await nursery.start(calls.run)
        with trio.fail_after(10), pytest.raises(TransportError, match="refused the call stream: gRPC UNAUTHENTICATED"):
            await calls.execute(_request("add", "c1", a=1))
        assert calls.ended
        with pytest.raises(TransportError):  # and every later call, at once
            await calls.execute(_request("add", "c2", a=1))


async def test_the_workers_death_fails_every_waiting_call(worker):
    process, token = worker
    failures: list[BaseException] = []

    async def waiting(call_id: str) -> None:
        try:
            await calls.execute(_request("async_sleep", call_id, seconds=60))
        except TransportError as exc:
            failures.append(exc)

    calls = H2CallStream(process.address, token)
    async with trio.open_nursery() as nursery:
        await nursery.start(calls.run)
        with trio.fail_after(10):
            async with trio.open_nursery() as callers:
                for call_id in ("a", "b"):
                    callers.start_soon(waiting, call_id)
                await trio.sleep(0.3)
                process.kill()
        assert len(failures) == 2 and calls.ended
    with pytest.raises(TransportError):
        await calls.execute(_request("add", "c", a=1))


async def test_an_unreachable_worker_fails_the_start():
    calls = H2CallStream(f"tcp:127.0.0.1:{free_port('127.0.0.1')}", "secret")
    async with trio.open_nursery() as nursery:
        with pytest.raises(TransportError, match="cannot open the call stream"):
            await nursery.start(calls.run)


async def test_many_answers_under_the_batch_size_keep_the_window_open(worker):
    """Requests and answers of 40 KiB, smaller than the acknowledgement batch, 24 MiB in all
    (more than the stream's 16 MiB window): the worker's sends never stall, calls in flight
    together come back, and the first requests, sent before the worker's SETTINGS raise the
    frame size from HTTP/2's 16 KiB, go in several frames."""
    process, token = worker
    value = "x" * (40 * 1024)
    async with trio.open_nursery() as nursery:
        calls = H2CallStream(process.address, token)
        await nursery.start(calls.run)

        async def echo(i: int) -> None:
            reply = await calls.execute(_request("echo", f"w{i}", value=value))
            assert decode(reply.result, plane=None) == value

        with trio.fail_after(60):
            for batch in range(0, 600, 4):
                async with trio.open_nursery() as inner:
                    for i in range(batch, batch + 4):
                        inner.start_soon(echo, i)
        nursery.cancel_scope.cancel()
