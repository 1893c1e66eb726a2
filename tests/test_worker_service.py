"""The worker's service in process (grpclib's in-memory ChannelFor): the contract as a
third-party client sees it, without starting processes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from tests.adapters import Echo
from tests.helpers import rpc_refusal
from trio_bridge._wire import errors as wire_errors
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import WIRE_VERSION, __version__
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import new_server
from trio_bridge.worker import tool
from trio_bridge.worker._server import WorkerService


def _request(tool: str, call_id: str, **arguments: object) -> pb.ExecuteToolRequest:
    return pb.ExecuteToolRequest(tool_name=tool, arguments=encode(arguments), call_id=call_id)


def _run(coro):
    """A plain asyncio loop, as in a worker."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)


async def _service() -> WorkerService:
    adapter = Echo()
    adapter.setup()
    return WorkerService("tests.adapters:Echo", adapter, concurrency=4)


def test_empty_and_running_call_ids_are_refused_and_shutdown_waits_for_the_running_call():
    async def scenario() -> None:
        service = await _service()
        async with ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec()) as channel:
            stub = pb.WorkerServiceStub(channel)
            status, info = await rpc_refusal(stub.execute_tool(_request("add", "", a=1)))
            assert (status, info.kind) == (Status.INVALID_ARGUMENT, wire_errors.INVALID_ARGUMENT)
            assert "call_id is empty" in info.message

            started = time.monotonic()
            first = asyncio.create_task(stub.execute_tool(_request("async_sleep", "c1", seconds=0.5)))
            while "c1" not in service.active:
                await asyncio.sleep(0.01)
            status, info = await rpc_refusal(stub.execute_tool(_request("add", "c1", a=1)))
            assert (status, info.kind) == (Status.INVALID_ARGUMENT, wire_errors.INVALID_ARGUMENT)
            assert "already running" in info.message

            # The refused duplicate must not have displaced the running call: the drain waits for it.
            await stub.shutdown(pb.ShutdownRequest(grace_seconds=5))
            await asyncio.wait_for(service.stopped.wait(), 5)
            assert time.monotonic() - started >= 0.45  # stopped only once the running call was over
            assert decode((await asyncio.wait_for(first, 5)).result) == 0.5

    _run(scenario())


class _RawCodec(ProtoCodec):
    """A client codec that sends bytes as they are (a broken or hostile client)."""

    def encode(self, message, message_type):
        return message if isinstance(message, bytes) else super().encode(message, message_type)


def test_malformed_requests_get_invalid_argument_and_one_short_log_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge.wire")

    async def scenario() -> list[GRPCError]:
        service = await _service()
        server, _ = new_server([service], "")
        path = str(tmp_path / "w.sock")
        await server.start(path=path)
        channel = Channel(path=path, codec=_RawCodec())
        errors = []
        try:
            for _ in range(20):
                try:
                    async with channel.request(
                        "/trio_bridge.v1.WorkerService/ExecuteTool", Cardinality.UNARY_UNARY, bytes, pb.ExecuteToolResponse
                    ) as stream:
                        await stream.send_message(b"\x08" + b"\xff" * 12, end=True)
                        await stream.recv_message()
                except GRPCError as exc:
                    errors.append(exc)
            ok = await pb.WorkerServiceStub(Channel(path=path)).execute_tool(_request("add", "c1", a=1))
            assert decode(ok.result) == 3  # the worker is unharmed
        finally:
            channel.close()
            server.close()
        return errors

    errors = _run(scenario())
    assert len(errors) == 20 and all(e.status is Status.INVALID_ARGUMENT for e in errors)
    assert "malformed ExecuteToolRequest" in str(errors[0].message)
    lines = [r for r in caplog.records if r.name == "trio_bridge.wire"]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()


class _Gated(Echo):
    """Echo, with a sync tool that holds its thread until the test opens the gate."""

    def setup(self) -> None:
        super().setup()
        self.started, self.gate = threading.Event(), threading.Event()

    @tool
    def gated(self) -> None:
        self.started.set()
        self.gate.wait(30)

    @tool
    def recorded(self):
        """A sync generator that says when its code runs."""
        self.ran = True
        yield 1


def test_a_sync_call_cancelled_before_its_thread_started_frees_its_slot():
    """The host cancels a call (the Calls stream's ``cancel``) while its sync tool still waits for
    a pool thread: the tool never runs, so nothing in a thread frees its slot; the worker must
    (else the host, pinging for it, recycles the worker). A cancelled sync call that did start keeps
    its slot until its thread returns."""

    async def scenario() -> None:
        adapter = _Gated()
        adapter.setup()
        service = WorkerService("tests.adapters:Echo", adapter, concurrency=1)
        loop = asyncio.get_running_loop()

        async def until(condition) -> None:
            while not condition():
                await asyncio.sleep(0.001)

        async with ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec()) as channel:
            async with channel.request(
                "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult,
            ) as stream:
                await stream.send_request()
                # The only pool thread is busy: c1's tool waits for it.
                busy = threading.Event()
                occupied = loop.run_in_executor(service.executor, busy.wait)
                await stream.send_message(pb.CallMessage(execute=_request("echo", "c1", value=1)))
                await until(lambda: "c1" in service.active)
                ctx = service.active["c1"]
                await stream.send_message(pb.CallMessage(cancel="c1"))
                await until(lambda: ctx.cancelled)
                busy.set()
                await occupied
                await loop.run_in_executor(service.executor, lambda: None)  # the thread is free again
                assert "c1" not in service.active  # freed, and echo never ran

                # A started sync tool keeps its slot, cancelled, until its thread returns.
                await stream.send_message(pb.CallMessage(execute=_request("gated", "c2")))
                await until(adapter.started.is_set)
                ctx = service.active["c2"]
                await stream.send_message(pb.CallMessage(cancel="c2"))
                await until(lambda: ctx.cancelled)
                await asyncio.sleep(0.05)
                assert "c2" in service.active
                adapter.gate.set()
                await asyncio.wait_for(until(lambda: "c2" not in service.active), 10)
                await stream.end()

    _run(scenario())


def test_a_sync_generator_cancelled_before_its_thread_started_never_runs():
    """A streaming call whose client went away while its sync generator waited for a pool thread:
    the generator's code never runs (its side effects with it), and the call frees its slot."""

    async def scenario() -> None:
        adapter = _Gated()
        adapter.setup()
        adapter.ran = False
        service = WorkerService("tests.adapters:Echo", adapter, concurrency=1)
        loop = asyncio.get_running_loop()
        busy = threading.Event()
        occupied = loop.run_in_executor(service.executor, busy.wait)  # the only pool thread
        async with ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec()) as channel:
            async with channel.request(
                "/trio_bridge.v1.WorkerService/ExecuteStreamingTool", Cardinality.UNARY_STREAM,
                pb.ExecuteToolRequest, pb.ToolChunkBatch,
            ) as stream:
                await stream.send_message(_request("recorded", "g1"), end=True)
                while "g1" not in service.active:
                    await asyncio.sleep(0.001)
                ctx = service.active["g1"]
                await stream.cancel()
            while not ctx.cancelled:  # set in the same step as the handler closes its source
                await asyncio.sleep(0.001)
            busy.set()
            await occupied
            while "g1" in service.active:  # freed once the queued job ends, without running the tool
                await asyncio.sleep(0.001)
            await loop.run_in_executor(service.executor, lambda: None)  # every queued job has run
            assert adapter.ran is False

    _run(scenario())


def test_describe_cancels_the_calls_a_host_lost_the_connection_of_and_no_others(capfd):
    """A host that lost the connection its calls came over names them in ``Describe``'s
    ``cancel_calls`` when it reaches the worker again: each runs no more (a sync tool that checks
    ``ctx.cancelled`` returns, an async tool is cancelled, whether it came on the call stream or
    as a unary RPC), so its slot is free when the host sees it gone from ``Ping``. Unknown ids are
    ignored; calls not named run on. A sync tool that ignores cancellation keeps its slot (and its
    place in ``Ping``) until it returns."""

    async def scenario() -> None:
        adapter = _Gated()
        adapter.setup()
        service = WorkerService("tests.adapters:Echo", adapter, concurrency=8)

        async def active() -> set[str]:
            return set((await stub.ping(pb.PingRequest())).active_calls)

        async def until_active(expected: set[str]) -> None:
            async def poll() -> None:
                while await active() != expected:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(poll(), 10)

        async with ChannelFor([service], status_details_codec=wire_errors.StatusDetailsCodec()) as channel:
            stub = pb.WorkerServiceStub(channel)
            async with channel.request(
                "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult,
            ) as stream:
                await stream.send_request()
                for message in (
                    _request("cooperative_sleep", "sync", seconds=30),
                    _request("async_sleep", "async", seconds=30),
                    _request("async_sleep", "kept", seconds=30),
                    _request("gated", "stubborn"),
                ):
                    await stream.send_message(pb.CallMessage(execute=message))
                unary = asyncio.create_task(stub.execute_tool(_request("async_sleep", "unary", seconds=30)))
                await until_active({"sync", "async", "kept", "stubborn", "unary"})
                await asyncio.wait_for(asyncio.to_thread(adapter.started.wait, 10), 15)

                capfd.readouterr()
                lost = ["sync", "async", "unary", "stubborn", "not-running"]
                await stub.describe(pb.DescribeRequest(
                    trio_bridge_version=__version__, wire_version=WIRE_VERSION, cancel_calls=lost,
                ))
                assert "cancelled 4 call(s) of the 5" in capfd.readouterr().err
                await until_active({"kept", "stubborn"})  # the stubborn thread still holds its slot
                adapter.gate.set()
                await until_active({"kept"})
                assert service.active.keys() == {"kept"}

                # "kept" still runs and answers: a cancel of its own ends it as before.
                await stream.send_message(pb.CallMessage(cancel="kept"))
                await until_active(set())
                await stream.end()
            unary.cancel()  # its RPC ends with no answer: its host has given its connection up
            await asyncio.gather(unary, return_exceptions=True)

    _run(scenario())
