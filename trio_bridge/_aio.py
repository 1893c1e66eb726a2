"""The one place where host code touches asyncio (grpclib runs on the trio-asyncio loop).

Everything else on the host is plain Trio. Each call crosses the boundary once (a unary call)
or once per message (a stream, whose messages carry batches of chunks): crossing costs tens of
microseconds, so never cross per item in a hot loop. grpclib and OS errors are translated here
into :class:`TransportError`, which callers turn into the public error that fits.

Upstream behaviour worked around here (CPython 3.12+): trio-asyncio replaces
``asyncio.current_task`` on import with a version that knows its loop, because from 3.12 the
original is C code that does not see trio-asyncio's loop. grpclib keeps its own reference,
``grpclib.utils._current_task = asyncio.current_task``, taken when grpclib is first imported. If
grpclib was imported before trio_asyncio -- by this package, by the user's program, by
betterproto2 -- every grpclib call on the trio-asyncio loop raises ``RuntimeError: no running
event loop``. :func:`_rebind_grpclib_current_task` fixes that whatever the import order.

Signals (Ctrl-C) and the loop's life: Trio raises ``KeyboardInterrupt`` wherever the signal finds
unprotected code, and trio-asyncio's loop runs every asyncio callback (all of grpclib) in plain
Trio tasks. A Ctrl-C that landed there killed the loop's task: the futures of calls in flight
were never resolved, and the Trio tasks awaiting them -- ``trio_asyncio.run_aio_future`` waits
for the asyncio side even after a cancellation -- waited forever, so the pool never finished
shutting down (and trio-asyncio's own teardown, which waits for every asyncio task, hung too).
Hence, here:

* :func:`_protect_loop_from_keyboard_interrupt`: the loop's driver code is KI-protected, so Trio
  delivers the interrupt to the main task at a checkpoint, as it does for its own internals;
* :func:`open_boundary` keeps a watchdog: should the loop still stop while the block runs, it is
  restarted (calls in flight then finish or are cancelled as usual, and teardown completes);
* :class:`Boundary` refuses new calls with :class:`TransportError` once the block has ended or
  the loop is stopped or closed (never a ``RuntimeError``, never an await on a dead loop), and
  its teardown waits (closing a stream, the server) are bounded and abandon what does not end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from ssl import SSLContext
from typing import Any, NoReturn, TypeVar

import grpclib.client
import grpclib.const
import grpclib.exceptions
import grpclib.server
import grpclib.utils
import h2.exceptions
import outcome
import trio
import trio_asyncio

from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.errors import CallFailed, info_of
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import new_server, open_channel, parse_address, tcp_listener

T = TypeVar("T")


def _rebind_grpclib_current_task() -> None:
    """Point grpclib at trio-asyncio's ``asyncio.current_task`` (see the module docstring).

    Narrowest fix: one module attribute, re-bound once, here, after trio_asyncio is imported
    (this module imports it above), so the import order of the program no longer matters. The
    replacement falls back to the original on plain asyncio loops, so a worker or any other
    asyncio code in the process is unaffected.
    """
    if getattr(grpclib.utils, "_current_task", None) is not asyncio.current_task:
        grpclib.utils._current_task = asyncio.current_task  # type: ignore[attr-defined]


_rebind_grpclib_current_task()

_logger = logging.getLogger("trio_bridge")
_CLOSE_STREAM_TIMEOUT = 1.0  # seconds to close a stream we leave (it is then abandoned)
_CLOSE_SERVER_TIMEOUT = 2.0  # seconds for the host's server to close


def _protect_loop_from_keyboard_interrupt() -> None:
    """Never raise ``KeyboardInterrupt`` inside trio-asyncio's loop (see the module docstring).

    ``trio.lowlevel.enable_ki_protection`` marks a function's code object: a SIGINT that finds
    this code (or the asyncio callbacks it runs) on the stack is delivered to the main task
    instead. The names are trio-asyncio 0.16's; a missing one is skipped, and the watchdog in
    :func:`open_boundary` still keeps the loop alive.
    """
    for name in ("_main_loop", "_main_loop_one", "_main_loop_exit", "_io_task"):
        function = getattr(trio_asyncio.BaseTrioEventLoop, name, None)
        if function is not None and hasattr(function, "__code__"):
            trio.lowlevel.enable_ki_protection(function)


_protect_loop_from_keyboard_interrupt()


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


class _LoopGuard:
    """What :func:`open_boundary` knows about its loop: whether its block has ended, and a watchdog
    that restarts the loop should it stop while the block still runs."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self.loop: trio_asyncio.TrioEventLoop = loop
        self.ended: bool = False  # the open_boundary block is over: no new calls
        self.scope: trio.CancelScope = trio.CancelScope(shield=True)

    @property
    def usable(self) -> bool:
        return not self.ended and self.loop.is_running() and not self.loop.is_closed()

    async def watch(self, nursery: trio.Nursery) -> None:
        with self.scope:
            while True:
                await self.loop.wait_stopped()
                if self.ended or self.loop.is_closed():
                    return
                # Stopped under a running block (a BaseException escaped an asyncio callback):
                # run it again, or every call in flight -- and trio-asyncio's teardown -- waits forever.
                _logger.warning("the host's asyncio loop stopped while the pool was open; restarting it")
                await nursery.start(self.loop._main_loop)


@asynccontextmanager
async def open_boundary() -> AsyncIterator[Boundary]:
    """A trio-asyncio loop, watched (see the module docstring), and the :class:`Boundary` to it."""
    async with trio.open_nursery() as watchdog:
        async with trio_asyncio.open_loop() as loop:
            guard = _LoopGuard(loop)
            watchdog.start_soon(guard.watch, watchdog)
            try:
                yield Boundary(loop, guard)
            finally:
                guard.ended = True
        # trio-asyncio's teardown is over: the loop has stopped for good.
        guard.scope.cancel()


class Boundary:
    """Runs asyncio coroutines (grpclib) from Trio on a trio-asyncio loop. Made by :func:`open_boundary`."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop, guard: _LoopGuard) -> None:
        self.loop = loop
        self._guard = guard

    @property
    def usable(self) -> bool:
        """False once the loop's block has ended, or the loop is stopped or closed."""
        return self._guard.usable

    async def run(self, coro: Awaitable[T]) -> T:
        """Await an asyncio coroutine from Trio. Trio cancellation cancels it (and waits until
        the asyncio side has finished, so nothing keeps running behind the caller's back).

        Raises:
            CallFailed: the peer ended the RPC with a status carrying an ErrorInfo (the call
                failed or was refused; the connection is fine).
            TransportError: for other grpclib and OS-level errors, and at once (the coroutine
                is not started) when the loop is shut down or shutting down.
        """
        try:
            future = self._schedule(coro)
            return await _wait_future(future, abandon_on_cancel=False)
        except _TRANSPORT_ERRORS as exc:
            info = info_of(exc) if isinstance(exc, grpclib.exceptions.GRPCError) else None
            if info is not None:
                raise CallFailed(info) from None
            raise TransportError(_describe(exc)) from exc

    def _schedule(self, coro: Awaitable[T]) -> asyncio.Future[T]:
        if not self.usable:
            _close(coro)
            raise TransportError("the host's asyncio loop is shut down")
        try:
            return asyncio.ensure_future(coro, loop=self.loop)
        except RuntimeError as exc:  # closed between the check and here
            _close(coro)
            raise TransportError(f"the host's asyncio loop is shut down ({exc})") from exc

    async def _run_bounded(self, coro: Awaitable[Any], timeout: float) -> None:
        """For teardown: run ``coro`` for at most ``timeout`` seconds, shielded; errors,
        cancellation and a shut-down loop end it quietly, and what is left is abandoned."""
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            try:
                future = self._schedule(coro)
                await _wait_future(future, abandon_on_cancel=True)
            except (TransportError, asyncio.CancelledError, *_TRANSPORT_ERRORS):
                pass

    def worker_stub(
        self, address: str, secret: str, ssl: SSLContext | None = None
    ) -> tuple[grpclib.client.Channel, pb.WorkerServiceStub]:
        channel = open_channel(address, ssl)
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
        block closes the stream, which cancels it on the server if it has not finished (within
        a second; after that, or on a loop that is shut down, the stream is abandoned). On a
        loop that is shut down, ``receive()`` raises :class:`TransportError`."""
        agen = start()

        async def receive() -> Any:
            return await self.run(agen.__anext__())

        try:
            yield receive
        finally:
            await self._run_bounded(agen.aclose(), _CLOSE_STREAM_TIMEOUT)

    @asynccontextmanager
    async def serve(
        self, services: list[Any], address: str, secret: str, ssl: SSLContext | None = None,
        allowed_uids: Collection[int] = (),
    ) -> AsyncIterator[str]:
        """Serve grpclib ``services`` on ``address`` (``"unix:..."``, or ``"tcp:HOST:PORT"``
        with TLS when ``ssl`` is a server context; port 0: any free one) for the block's
        duration; yields the address it listens on. On a Unix socket, peers of another uid
        than ours, root's and ``allowed_uids`` are refused (see ``new_server``)."""
        server, health = new_server(services, secret, allowed_uids=allowed_uids)
        scheme, where, port = parse_address(address)
        if scheme == "unix":
            await self.run(server.start(path=where))
        else:
            listener = tcp_listener(where, port)
            host, port = listener.getsockname()[:2]
            address = f"tcp:{host}:{port}"
            await self.run(server.start(sock=listener, ssl=ssl))
        try:
            yield address
        finally:
            health.set(False)
            with trio.CancelScope(shield=True):
                if not self.loop.is_closed():
                    server.close()
                    await self._run_bounded(server.wait_closed(), _CLOSE_SERVER_TIMEOUT)


class CallStream:
    """A worker connection's calls, multiplexed on one long-lived bidirectional gRPC stream
    (``WorkerService.Calls``), driven from Trio.

    Why: a unary RPC per call costs a HEADERS frame, HPACK, a DATA frame and trailers each way,
    and a boundary crossing; on one stream a call is one DATA frame each way, and a Trio caller
    only puts its request in the outbox and sleeps until the reply's call id wakes it.
    Cancelling a caller sends ``cancel`` with its call id (the worker cancels that call alone).

    :meth:`run` is the stream's life (a Trio task of the worker's handle): its asyncio side reads
    replies and wakes their callers, and writes the outbox in order. When the stream fails or
    ends, every call waiting on it fails with :class:`TransportError`, as do later ones.
    """

    def __init__(self, boundary: Boundary, stub: pb.WorkerServiceStub, max_in_flight: int) -> None:
        self._boundary = boundary
        self._stub = stub
        # Each call in flight puts at most an execute and a cancel, and a worker has at most
        # max_in_flight calls in flight (the pool's slots): never full.
        self._outbox: asyncio.Queue[pb.CallMessage] = asyncio.Queue(maxsize=2 * max_in_flight + 2)
        self._waiting: dict[str, _Reply] = {}
        self._failure: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the stream (``task_status.started()`` once it is open) and serve it until it
        ends or this task is cancelled.

        Raises:
            TransportError: the stream could not be opened.
        """
        opened = trio.Event()
        started = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_until_done, opened)
            await opened.wait()
            if self._failure is None:
                started = True
                task_status.started()
        if not started:  # raised out here: inside the nursery it would come wrapped in a group
            raise TransportError(f"cannot open the call stream: {self._failure}")

    async def _serve_until_done(self, opened: trio.Event) -> None:
        try:
            await self._boundary.run(self._serve(opened))
        except TransportError as exc:
            self._fail(str(exc))
        except CallFailed as exc:  # the worker refused the stream itself (a request it cannot read)
            self._fail(f"the worker refused the call stream: {exc.info.message}")
        finally:
            self._fail("the call stream ended")
            opened.set()

    async def _serve(self, opened: trio.Event) -> None:
        async with self._stub.channel.request(
            "/trio_bridge.v1.WorkerService/Calls", grpclib.const.Cardinality.STREAM_STREAM,
            pb.CallMessage, pb.CallResult, metadata=self._stub.metadata,
        ) as stream:
            await stream.send_request()
            opened.set()
            writer = asyncio.ensure_future(self._write(stream))
            try:
                while (result := await stream.recv_message()) is not None:
                    reply = self._waiting.pop(result.call_id, None)
                    if reply is not None:  # None: a cancelled call's late answer
                        response = pb.ExecuteToolResponse() if result.response is None else result.response
                        reply.set(outcome.Value(response))
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_TRANSPORT_ERRORS):
                    await writer

    async def _write(self, stream: Any) -> None:
        while True:
            await stream.send_message(await self._outbox.get())

    def _send(self, message: pb.CallMessage) -> None:
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:  # a bug: more than two messages per slot
            raise TransportError("the call stream's outbox is full") from None

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            reply.set(outcome.Error(TransportError(self._failure)))

    async def execute(self, request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """Run one call; a cancelled caller cancels it on the worker.

        Raises:
            TransportError: the stream failed (or had already), before the reply came.
        """
        if self._failure is not None:
            raise TransportError(self._failure)
        reply = _Reply()
        self._waiting[request.call_id] = reply
        self._send(pb.CallMessage(execute=request))
        try:
            await reply.event.wait()
        except BaseException:
            if self._waiting.pop(request.call_id, None) is not None and self._failure is None:
                self._send(pb.CallMessage(cancel=request.call_id))
            raise
        assert reply.result is not None
        return reply.result.unwrap()


class _Reply:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: outcome.Outcome[pb.ExecuteToolResponse] | None = None

    def set(self, result: outcome.Outcome[pb.ExecuteToolResponse]) -> None:
        self.result = result
        self.event.set()  # from asyncio code: it runs in trio-asyncio's Trio task, in this thread


async def _wait_future(future: asyncio.Future[T], *, abandon_on_cancel: bool) -> T:
    """``trio_asyncio.run_aio_future`` with a choice on cancellation: wait until the asyncio
    side has finished (a call), or stop waiting at once (teardown, where a bound must hold)."""
    task = trio.lowlevel.current_task()
    raise_cancel: Callable[[], NoReturn] | None = None
    waiting = True

    def done(_: asyncio.Future[T]) -> None:
        # asyncio may already have queued this callback when we stop waiting: then it is void
        # (rescheduling a task that waits on something else would wake it with our result).
        if waiting:
            trio.lowlevel.reschedule(task, outcome.capture(future.result))

    future.add_done_callback(done)

    def abort(raise_cancel_arg: Any) -> trio.lowlevel.Abort:
        nonlocal raise_cancel, waiting
        future.cancel()
        if abandon_on_cancel:
            waiting = False
            future.remove_done_callback(done)
            return trio.lowlevel.Abort.SUCCEEDED
        raise_cancel = raise_cancel_arg
        return trio.lowlevel.Abort.FAILED

    try:
        return await trio.lowlevel.wait_task_rescheduled(abort)
    except asyncio.CancelledError as exc:
        if raise_cancel is None:
            raise
        try:
            raise_cancel()
        except BaseException as cancelled:  # trio.Cancelled, or a KeyboardInterrupt delivered here
            cancelled.__cause__ = exc
            raise


def _close(coro: Awaitable[Any]) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()  # no "coroutine was never awaited" warning


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return f"gRPC {exc.status.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
