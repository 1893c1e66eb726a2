"""A host that starts calls on a worker and then falls silent: ``python -m tests.silent_host
ADDRESS TOKEN CERT KEY CA SECONDS TOOL:CALL_ID...`` opens a call stream to the worker at ADDRESS
(TCP over mutual TLS), sends the call CALL_ID of TOOL(seconds=SECONDS) for each pair, prints
``started`` once the worker runs them all, and waits. A test then stops it (SIGSTOP): its kernel still
acknowledges TCP, but nothing answers the worker's HTTP/2 pings, as with a host whose machine
died or whose link was cut."""

from __future__ import annotations

import asyncio
import sys

from grpclib.const import Cardinality

from trio_bridge._wire.codec import encode
from trio_bridge._wire.contract import SECRET_METADATA
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tls import TLSConfig
from trio_bridge._wire.transport import open_channel


async def main(address: str, token: str, cert: str, key: str, ca: str, seconds: str, *calls: str) -> None:
    channel = open_channel(address, TLSConfig(cert, key, ca).client_context())
    stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: token})
    async with channel.request(
        "/trio_bridge.v1.WorkerService/Calls", Cardinality.STREAM_STREAM, pb.CallMessage, pb.CallResult,
        metadata={SECRET_METADATA: token},
    ) as stream:
        await stream.send_request()
        call_ids = []
        for call in calls:
            tool, _, call_id = call.partition(":")
            request = pb.ExecuteToolRequest(tool_name=tool, arguments=encode({"seconds": float(seconds)}), call_id=call_id)
            await stream.send_message(pb.CallMessage(execute=request))
            call_ids.append(call_id)
        while not set(call_ids) <= set((await stub.ping(pb.PingRequest())).active_calls):
            await asyncio.sleep(0.01)
        print("started", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
