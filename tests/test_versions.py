"""What must hold on every supported Python: import order, prompt closing, the version handshake."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import grpclib.const
import pytest
import trio
from grpclib.exceptions import GRPCError

import trio_bridge
from trio_bridge import LocalWorkers, WorkerStartError
from trio_bridge._wire.contract import WIRE_VERSION, __version__, incompatibility
from trio_bridge._wire.generated.trio_bridge import v1 as pb

ECHO = "tests.adapters:Echo"


@pytest.mark.real_process
def test_grpclib_and_betterproto2_imported_before_trio_bridge(tmp_path):
    # A fresh interpreter: the user's program has used grpclib (and betterproto2's gRPC support)
    # before it imports trio_bridge (with trio-asyncio, grpclib then held a current_task that did
    # not see its loop on 3.12+; the host's loop is now a plain asyncio loop in its own thread).
    program = textwrap.dedent("""
        import grpclib.client, grpclib.server, grpclib.utils, betterproto2
        import trio
        import trio_bridge

        async def main():
            async with trio_bridge.open_pool("tests.adapters:Echo", size=1) as pool:
                print(await pool.execute("add", {"a": 1}))
                async with pool.stream("count", {"n": 3}) as chunks:
                    print([c async for c in chunks])

        trio.run(main)
    """)
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["3", "[0, 1, 2]"]


@pytest.mark.real_process
async def test_idle_workers_exit_by_themselves_promptly_with_code_0():
    async with trio_bridge.open_pool(ECHO, size=2) as pool:
        assert await pool.execute("add", {"a": 1}) == 3
        closing = trio.current_time()
    took = trio.current_time() - closing
    assert [w.exit_code for w in pool.workers()] == [0, 0], pool.workers()  # never terminated
    assert took < 2.0  # well under a second on an idle machine; loose for a slow one


def test_incompatibility_names_both_sides_versions():
    assert incompatibility(local_release="0.2.0", local_wire=1, peer="worker w1", peer_release="0.3.1", peer_wire=1) is None
    problem = incompatibility(local_release="0.2.0", local_wire=1, peer="worker w1", peer_release="0.9.0", peer_wire=2)
    assert problem is not None
    assert "worker w1 runs trio-bridge 0.9.0, wire contract 2" in problem
    assert "this side runs trio-bridge 0.2.0, wire contract 1" in problem
    old = incompatibility(local_release="0.2.0", local_wire=1, peer="host", peer_release="", peer_wire=0)
    assert old is not None and "no version sent" in old


def test_a_worker_refuses_a_host_of_another_wire_contract():
    from tests.adapters import Echo
    from trio_bridge.worker._server import WorkerService

    async def describe(request: pb.DescribeRequest) -> pb.DescribeResponse:
        return await WorkerService(ECHO, Echo(), 1).describe(request)

    fits = asyncio.run(describe(pb.DescribeRequest(trio_bridge_version=__version__, wire_version=WIRE_VERSION)))
    assert (fits.trio_bridge_version, fits.wire_version) == (__version__, WIRE_VERSION)
    with pytest.raises(GRPCError) as refused:
        asyncio.run(describe(pb.DescribeRequest(trio_bridge_version="9.0.0", wire_version=WIRE_VERSION + 1)))
    assert refused.value.status is grpclib.const.Status.FAILED_PRECONDITION
    assert "trio-bridge 9.0.0" in str(refused.value.message) and f"trio-bridge {__version__}" in str(refused.value.message)


@pytest.mark.real_process
async def test_a_host_refuses_a_worker_of_another_wire_contract(tmp_path):
    # The worker's interpreter loads this sitecustomize first: it runs "another release".
    (tmp_path / "sitecustomize.py").write_text(
        "import trio_bridge._wire.contract as c, trio_bridge._version as v\n"
        "c.WIRE_VERSION = 99\nc.__version__ = v.__version__ = '9.9.9'\n"
    )
    with pytest.raises(WorkerStartError) as refused:
        async with trio_bridge.open_pool(ECHO, size=1, local=LocalWorkers(env={"PYTHONPATH": str(tmp_path)})):
            pass
    message = str(refused.value)
    assert "trio-bridge 9.9.9, wire contract 99" in message, message
    assert f"trio-bridge {__version__}, wire contract {WIRE_VERSION}" in message
