"""The worker's side of a host connection's call stream (``WorkerService.Calls``).

Each ``execute`` message runs as its own task, exactly as a unary ``ExecuteTool`` would (its
failure comes back in-band, in the CallResult: the stream's own status is the connection's); a
``cancel`` message cancels that task (what resetting a unary call's HTTP/2 stream does). Results
go back as calls finish, one message each. When the host ends its side, the calls still running
finish and are answered; when the stream is reset or the connection lost, they are cancelled.
Once the worker drains, the stream carries a notice (a CallResult with call id ``""`` and an error
of kind ``draining``), so that the host sends it no more calls.

Where the wire's ``worker_calls`` fast path is on, the messages go through a
:class:`~trio_bridge._wire.direct_stream.DirectStream`: each call starts as its message is parsed,
and a result is written at once, without grpclib's per-message machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import betterproto2

from trio_bridge._wire import errors as wire_errors
from trio_bridge._wire.direct_stream import DirectStream
from trio_bridge._wire.generated.trio_bridge import v1 as pb

Execute = Callable[[pb.ExecuteToolRequest], Awaitable[pb.ExecuteToolResponse]]


async def serve_calls(
    stream: Any, execute: Execute, reply_pending: Callable[[], AbstractContextManager[None]], draining: asyncio.Event,
    asked: set[str], stopped: asyncio.Event,
) -> None:
    """Serve one call stream (a grpclib server stream of CallMessage -> CallResult) until the
    host ends it; cancelling this coroutine cancels every call it runs. Each call is inside
    ``reply_pending()`` until its result is written (a drain waits for that). Once ``draining``
    is set, the host is sent the drain notice. ``asked``: the ids of the calls the worker
    cancelled on purpose (a ``cancel`` message adds its call's): they get no answer, nor do the
    calls cancelled as the stream ends or the worker stops (``stopped``); a call cancelled
    otherwise (its tool cancelled its own task) is answered with that failure."""
    running: dict[str, asyncio.Task[None]] = {}
    closing = False  # the stream ends: its calls are cancelled
    sending = asyncio.Lock()  # one message at a time: concurrent writes would interleave frames

    def received(message: pb.CallMessage) -> None:
        kind, value = betterproto2.which_one_of(message, "kind")
        if kind == "execute" and isinstance(value, pb.ExecuteToolRequest):
            running[value.call_id] = asyncio.create_task(run(value))
        elif kind == "cancel" and isinstance(value, str):
            task = running.get(value)
            if task is not None:
                asked.add(value)
                task.cancel()

    direct = DirectStream.of(stream, received)
    send = stream.send_message if direct is None else direct.send_message

    async def notify() -> None:
        await draining.wait()
        notice = wire_errors.draining_notice()
        async with sending:
            with contextlib.suppress(Exception):  # the stream is gone: nobody to tell
                await send(pb.CallResult(call_id="", response=pb.ExecuteToolResponse(error=notice)))

    async def run(request: pb.ExecuteToolRequest) -> None:
        with reply_pending():
            try:
                response = await execute(request)
            except asyncio.CancelledError as exc:
                if closing or stopped.is_set() or request.call_id in asked:
                    return  # cancelled by the host (or the stream is gone): nobody waits for an answer
                # by no cancel of the host's (its tool cancelled its own task): the caller must still hear
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                response = pb.ExecuteToolResponse(error=wire_errors.tool_failure(exc))
            except Exception as exc:  # a fault of ours, not the tool's: the caller must still hear
                response = pb.ExecuteToolResponse(error=wire_errors.error_info(exc, kind=wire_errors.INTERNAL))
            finally:
                running.pop(request.call_id, None)
                asked.discard(request.call_id)
            async with sending:
                await send(pb.CallResult(call_id=request.call_id, response=response))

    notifier = asyncio.create_task(notify())
    try:
        if direct is not None:
            await direct.receive()
        else:
            async for message in stream:
                received(message)
        await asyncio.gather(*running.values(), return_exceptions=True)
    finally:
        closing = True
        tasks = [notifier, *running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
