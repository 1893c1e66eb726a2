"""The one place where host code touches asyncio (grpclib runs on the trio-asyncio loop).

Everything else on the host is plain Trio. Each call crosses the boundary once (a unary call)
or once per message (a stream, whose messages carry batches of chunks): crossing costs tens of
microseconds, so never cross per item in a hot loop. grpclib and OS errors are translated here
into :class:`TransportError`, which callers turn into the public error that fits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpclib.client
import grpclib.exceptions
import grpclib.server
import h2.exceptions
import trio
import trio_asyncio

from trio_bridge._wire.auth import SECRET_METADATA, require_secret
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import open_channel

T = TypeVar("T")


class TransportError(Exception):
    """The connection to a peer failed (refused, reset, closed, or a gRPC status we did not expect)."""


_TRANSPORT_ERRORS = (
    OSError,
    EOFError,
    asyncio.IncompleteReadError,
    grpclib.exceptions.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    grpclib.exceptions.ProtocolError,
    h2.exceptions.ProtocolError,
)


class Boundary:
    """Runs asyncio coroutines (grpclib) from Trio on a trio-asyncio loop."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self.loop = loop

    async def run(self, coro: Awaitable[T]) -> T:
        """Await an asyncio coroutine from Trio. Trio cancellation cancels it.

        Raises:
            TransportError: for grpclib and OS-level errors.
        """
        try:
            return await self.loop.run_aio_coroutine(coro)
        except _TRANSPORT_ERRORS as exc:
            raise TransportError(_describe(exc)) from exc

    def worker_stub(self, address: str, secret: str) -> tuple[grpclib.client.Channel, pb.WorkerServiceStub]:
        channel = open_channel(address)
        return channel, pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: secret})

    async def call_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio code (a HostService handler): run a Trio async function and await it."""
        return await trio_asyncio.trio_as_aio(fn, loop=self.loop)(*args)

    @staticmethod
    def close_channel(channel: grpclib.client.Channel) -> None:
        channel.close()

    @asynccontextmanager
    async def open_stream(self, start: Callable[[], Any]) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
        """Open a server stream (``start()`` returns the stub's async generator) and yield a
        function that receives the next message (``StopAsyncIteration`` at the end). Leaving the
        block closes the stream, which cancels it on the server if it has not finished."""
        agen = start()

        async def receive() -> Any:
            return await self.run(agen.__anext__())

        try:
            yield receive
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.loop.run_aio_coroutine(agen.aclose())
                except _TRANSPORT_ERRORS:
                    pass

    @asynccontextmanager
    async def serve(self, services: list[Any], path: str, secret: str) -> AsyncIterator[None]:
        """Serve grpclib ``services`` on a Unix socket at ``path`` for the block's duration."""
        server = grpclib.server.Server(services)
        require_secret(server, secret)
        await self.loop.run_aio_coroutine(server.start(path=path))
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                server.close()
                with trio.move_on_after(2):
                    await self.loop.run_aio_coroutine(server.wait_closed())


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return f"gRPC {exc.status.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


open_loop = trio_asyncio.open_loop
