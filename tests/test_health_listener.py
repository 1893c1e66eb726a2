"""The health-only listener an orchestrator probes (Kubernetes' native ``grpc:`` probe: plain
TCP, no token): ``trio-bridge worker --health`` and ``Monitoring(health_address=...)``. Service
``""`` says the process is alive and not draining, ``"ready"`` that it can serve; the port
serves nothing else. Checked with a real gRPC client (grpclib's, our generated stubs)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from tests.health_adapters import GATE_ENV
from tests.helpers import require
from trio_bridge import InvalidArgumentError, Lifecycle, LocalWorkers, Monitoring, open_pool
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.codec import encode
from trio_bridge._wire.generated.grpc.health.v1 import HealthCheckRequest, HealthStub
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge.testing import Certificates, free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "a-token-for-the-tests-0123456789"
ADAPTER = "tests.health_adapters:Gated"
WAIT = 30.0  # seconds a status may take to flip (it takes well under one)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").removeprefix("//").rpartition(":")
    return host, int(port)


async def _health(address: str, service: str) -> str:
    """The status ``address`` reports for ``service``, or the gRPC status of the refusal, or
    ``"UNREACHABLE"``."""
    channel = Channel(*_split(address))
    try:
        reply = await HealthStub(channel).check(HealthCheckRequest(service=service), timeout=5)
        return reply.status.name
    except GRPCError as exc:
        return exc.status.name
    except OSError:
        return "UNREACHABLE"
    finally:
        channel.close()


def _other_rpcs(address: str) -> list[str]:
    """What the health port answers (grpcio's client: grpclib's reads a trailers-only refusal as
    UNKNOWN) to a worker's Ping with the token, to reflection, and to a host's Join."""
    grpc = require("grpc")
    paths = (
        "/trio_bridge.v1.WorkerService/Ping", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/trio_bridge.v1.HostService/Join",
    )
    seen = []
    with grpc.insecure_channel(address.removeprefix("tcp:")) as channel:
        for path in paths:
            try:
                channel.unary_unary(path)(b"", timeout=5, metadata=[(SECRET_METADATA, TOKEN)])
                seen.append("OK")
            except grpc.RpcError as exc:
                seen.append(exc.code().name)
    return seen


def _wait_health(address: str, service: str, expected: str) -> None:
    deadline = time.monotonic() + WAIT
    while (seen := asyncio.run(_health(address, service))) != expected:
        assert time.monotonic() < deadline, f"health {service!r} at {address}: {seen}, not {expected} after {WAIT} s"
        time.sleep(0.05)


async def _call(address: str, tool: str, arguments: dict, certs: Certificates) -> str:
    """Call ``tool`` on a standalone worker directly, over its TLS listener; the outcome's kind."""
    channel = Channel(*_split(address), ssl=certs.tls("host").client_context())
    try:
        stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: TOKEN})
        request = pb.ExecuteToolRequest(tool_name=tool, arguments=encode(arguments), call_id=f"c-{time.monotonic_ns()}")
        try:
            await stub.execute_tool(request, timeout=WAIT)
            return "OK"
        except GRPCError as exc:
            return exc.status.name
    finally:
        channel.close()


async def _active_calls(address: str, certs: Certificates) -> list[str]:
    channel = Channel(*_split(address), ssl=certs.tls("host").client_context())
    try:
        stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: TOKEN})
        return list((await stub.ping(pb.PingRequest(), timeout=WAIT)).active_calls)
    finally:
        channel.close()


@pytest.mark.real_process
def test_a_worker_s_health_port_says_alive_ready_and_draining_and_serves_nothing_else(tmp_path):
    certs = Certificates.create(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    gate, call_gate = tmp_path / "set-up", tmp_path / "call-may-end"
    listen, health = f"tcp:127.0.0.2:{free_port('127.0.0.2')}", f"tcp:127.0.0.2:{free_port('127.0.0.2')}"  # the certificate's
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_bridge", "worker", ADAPTER, "--listen", f"tcp://{listen[4:]}", "--health",
         f"tcp://{health[4:]}", "--token-file", str(token_file), *certs.worker_options(), "--drain-timeout", "30"],
        cwd=ROOT, env={**os.environ, GATE_ENV: str(gate)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_health(health, "", "SERVING")  # alive while setup() runs...
        assert asyncio.run(_health(health, "ready")) == "NOT_SERVING"  # ...but not ready
        assert asyncio.run(_health(health, "trio_bridge.v1.WorkerService")) == "NOT_FOUND"
        assert _other_rpcs(health) == ["UNIMPLEMENTED"] * 3
        gate.touch()
        _wait_health(health, "ready", "SERVING")

        async def drain() -> list[str]:
            call = asyncio.create_task(_call(listen, "wait_for_file", {"path": str(call_gate)}, certs))
            deadline = time.monotonic() + WAIT
            while not await _active_calls(listen, certs):  # running, before the SIGTERM
                assert time.monotonic() < deadline and not call.done(), "the call never started"
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            seen = []
            for service in ("", "ready"):
                deadline = time.monotonic() + WAIT
                while (status := await _health(health, service)) != "NOT_SERVING" and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                seen.append(status)
            seen.append(await _call(listen, "wait_for_file", {"path": str(call_gate)}, certs))  # a new call: refused
            call_gate.touch()
            seen.append(await call)  # the running call finishes
            return seen

        seen = asyncio.run(drain())
        assert seen[:2] == ["NOT_SERVING", "NOT_SERVING"]
        assert seen[2] != "OK"
        assert seen[3] == "OK"
        assert process.wait(WAIT) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


@pytest.mark.real_process
async def test_a_head_s_health_port_says_open_and_ready_while_a_worker_is_and_serves_nothing_else(tmp_path):
    gate = tmp_path / "set-up"
    gate.touch()
    options = {
        "size": 1, "local": LocalWorkers(env={GATE_ENV: str(gate)}),
        "lifecycle": Lifecycle(shutdown_timeout=WAIT),  # the drain outlasts the look at it
        "monitoring": Monitoring(health_address="127.0.0.1:0"),
    }

    async def ask(address: str, service: str) -> str:
        return await trio.to_thread.run_sync(asyncio.run, _health(address, service))

    async def wait_health(address: str, service: str, expected: str) -> None:
        with trio.fail_after(WAIT):
            while await ask(address, service) != expected:
                await trio.sleep(0.05)

    seen_closing: list[str] = []
    async with trio.open_nursery() as nursery:
        async with open_pool(ADAPTER, **options) as pool:
            address = pool.health_address
            assert address is not None and address.startswith("tcp:127.0.0.1:")
            await wait_health(address, "", "SERVING")
            await wait_health(address, "ready", "SERVING")
            assert await trio.to_thread.run_sync(_other_rpcs, address) == ["UNIMPLEMENTED"] * 3
            # its only worker gone, and its replacement stuck in setup(): not ready, still alive
            gate.unlink()
            (worker,) = pool.workers()
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            await wait_health(address, "ready", "NOT_SERVING")
            assert await ask(address, "") == "SERVING"
            gate.touch()
            await wait_health(address, "ready", "SERVING")
            # closing with a call running: NOT_SERVING while it drains
            call_gate = tmp_path / "call-may-end"
            nursery.start_soon(pool.execute, "wait_for_file", {"path": str(call_gate)})
            with trio.fail_after(WAIT):
                while pool.statistics().in_flight == 0:
                    await trio.sleep(0.02)

            async def watch_close() -> None:
                with trio.fail_after(WAIT):
                    while (status := await ask(address, "")) == "SERVING":
                        await trio.sleep(0.05)
                seen_closing.append(status)
                seen_closing.append(await ask(address, "ready"))
                call_gate.touch()

            nursery.start_soon(watch_close)
    assert seen_closing == ["NOT_SERVING", "NOT_SERVING"]
    assert await ask(address, "") == "UNREACHABLE"  # closed with the pool


def test_health_address_is_checked_and_off_by_default():
    assert Monitoring().health_address is None
    with pytest.raises(InvalidArgumentError, match="health_address"):
        Monitoring(health_address="no port")
