"""The one place where host code touches asyncio: grpclib (and redis-py's asyncio client) run on a
plain asyncio loop -- uvloop's where it is installed -- in a thread that :func:`open_boundary`
starts, owns, stops and joins. docs/boundary.md is the design note, with its measurements.

Everything else on the host is plain Trio, in Trio's thread. The two threads share no mutable
structure: everything handed from Trio to the loop goes through ``loop.call_soon_threadsafe``,
everything handed back through Trio's ``TrioToken.run_sync_soon`` (both are queues with their own
lock and a wake-up), and each object is then touched by one thread only. Correctness therefore
does not rest on the GIL, and nothing in asyncio, grpclib or Trio is patched.

Each call crosses once each way (a unary call), or once per message (a stream, whose messages
carry batches of chunks): a crossing is a thread wake-up, tens of microseconds, so never cross per
item in a hot loop. grpclib and OS errors are translated here into :class:`TransportError`, which
callers turn into the public error that fits.

Signals: only the main thread receives them, and the loop's thread never runs Python signal
handlers, so a Ctrl-C reaches Trio alone, where Trio delivers it. The crossings are KI-protected
on the Trio side: a ``KeyboardInterrupt`` arrives at the wait, which then cancels the asyncio side
and waits for it like any cancellation.

Teardown is bounded: leaving :func:`open_boundary` refuses new calls, cancels every asyncio task
still running, waits for them at most ``_CANCEL_TASKS_TIMEOUT`` seconds, closes the loop and joins
its thread. A loop that does not stop in ``_STOP_TIMEOUT`` seconds (code blocking it) is abandoned
with a log line -- its thread is a daemon -- never waited for forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from functools import partial
from ssl import SSLContext
from typing import Any, Generic, Protocol, TypeVar, final

import grpclib.client
import grpclib.const
import grpclib.exceptions
import grpclib.server
import h2.exceptions
import outcome
import trio

from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.errors import DRAINING, CallFailed, info_of
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.standard_services import ServingStatus
from trio_bridge._wire.transport import new_health_server, new_server, open_channel, parse_address, tcp_listener

T = TypeVar("T")


class _Closable(Protocol):
    """What :meth:`Boundary.close_channel` needs of a channel (a ``grpclib.client.Channel``)."""

    def close(self) -> None: ...


_logger = logging.getLogger("trio_bridge")
_CLOSE_STREAM_TIMEOUT = 1.0  # seconds to close a stream we leave (it is then abandoned)
_CLOSE_SERVER_TIMEOUT = 2.0  # seconds for the host's server to close
_CANCEL_TASKS_TIMEOUT = 2.0  # seconds for the loop's tasks to end once cancelled at teardown
_STOP_TIMEOUT = 5.0  # seconds for the loop's thread to end at teardown (then it is abandoned)
_TRIO_CANCEL_TIMEOUT = 1.0  # seconds an asyncio caller of call_trio waits for the cancelled Trio side


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


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (the workers use it too), asyncio's otherwise; made
    directly, never through an event-loop policy."""
    try:
        import uvloop  # optional: not on every platform
    except ImportError:
        return asyncio.SelectorEventLoop()
    return uvloop.Loop()


@asynccontextmanager
async def open_boundary() -> AsyncIterator[Boundary]:
    """Start an asyncio loop in a thread of its own and yield the :class:`Boundary` to it; on
    leaving, stop it (bounded, see the module docstring), close it and join the thread.

    The Trio tasks that :meth:`Boundary.call_trio` starts live in a nursery of this block.
    """
    loop = _new_loop()
    token = trio.lowlevel.current_trio_token()
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        boundary = Boundary(loop, token, nursery)
        thread = threading.Thread(
            target=_run_loop, args=(loop, token, boundary._on_loop_closing, boundary._on_loop_stopped, stopped), name="trio-bridge asyncio", daemon=True,
        )
        thread.start()
        try:
            yield boundary
        finally:
            boundary._ended = True
            with trio.CancelScope(shield=True):
                with contextlib.suppress(RuntimeError):  # closed already: it stopped on its own
                    loop.call_soon_threadsafe(boundary._start_shutdown)
                with trio.move_on_after(_STOP_TIMEOUT):
                    await stopped.wait()
                if stopped.is_set():
                    thread.join(_STOP_TIMEOUT)  # it has only its return left to do
                else:
                    _logger.warning(
                        "the host's asyncio loop did not stop within %g s (code blocking it?): its thread is abandoned", _STOP_TIMEOUT,
                    )
                boundary._on_loop_stopped()
            nursery.cancel_scope.cancel()  # call_trio tasks whose asyncio caller is gone


def _run_loop(
    loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, on_closing: Callable[[], None],
    on_stopped: Callable[[], None], stopped: trio.Event,
) -> None:
    """The loop's thread: run it until stopped, then end what is left of it and close it."""
    try:
        try:
            loop.run_forever()
        except BaseException:  # an asyncio callback raised SystemExit, say: the loop is gone
            _logger.exception("the host's asyncio loop stopped on an error")
            on_closing()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(_shutdown(loop))
        loop.close()
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(on_stopped)
            token.run_sync_soon(stopped.set)


async def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
    """On the loop: cancel every task but this one, wait for them (bounded), end async generators."""
    tasks = [task for task in asyncio.all_tasks(loop) if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=_CANCEL_TASKS_TIMEOUT)
        if pending:
            _logger.warning("%d asyncio task(s) of the host did not end within %g s of being cancelled", len(pending), _CANCEL_TASKS_TIMEOUT)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(loop.shutdown_asyncgens(), _CANCEL_TASKS_TIMEOUT)


class _Crossing(Generic[T]):
    """One coroutine run on the loop for a Trio task. ``task``, ``waiting`` and ``raise_cancel``
    are the Trio thread's; ``aio_task`` the loop thread's."""

    __slots__ = ("aio_task", "coro", "raise_cancel", "task", "waiting")

    def __init__(self, coro: Awaitable[T], task: trio.lowlevel.Task) -> None:
        self.coro: Awaitable[T] | None = coro
        self.task = task
        self.waiting = True
        self.raise_cancel: Callable[[], Any] | None = None
        self.aio_task: asyncio.Future[T] | None = None


class _TrioJob:
    """One Trio function run for an asyncio caller (:meth:`Boundary.call_trio`). ``scope`` and
    ``cancelled`` are the Trio thread's; ``future`` and ``done`` the loop thread's."""

    __slots__ = ("args", "cancelled", "done", "fn", "future", "scope")

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.done = asyncio.Event()
        self.cancelled = False
        self.scope: trio.CancelScope | None = None


@final
class Boundary:
    """Runs asyncio coroutines (grpclib) from Trio on the loop's thread, and Trio functions from
    that loop. Made by :func:`open_boundary`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.loop = loop
        self._token = token
        self._nursery = nursery
        self._ended = False  # the open_boundary block is over: no new calls (Trio's thread)
        self._stopped = False  # the loop's thread has ended (Trio's thread)
        self._closing = False  # the loop is shutting down: starts nothing more (the loop's thread)
        self._crossings: set[_Crossing[Any]] = set()  # Trio's thread

    @property
    def usable(self) -> bool:
        """False once the loop's block has ended or its loop has stopped."""
        return not self._ended and not self._stopped

    def _on_loop_closing(self) -> None:
        self._closing = True  # the loop's thread

    def _start_shutdown(self) -> None:
        """The loop's thread: refuse new crossings, end the loop's tasks, then stop it."""
        self._closing = True
        task = self.loop.create_task(_shutdown(self.loop))
        task.add_done_callback(lambda _: self.loop.stop())

    def _on_loop_stopped(self) -> None:
        """Trio's thread: the loop is gone; whoever still waits on it gets a TransportError."""
        self._stopped = True
        crossings, self._crossings = self._crossings, set()
        for crossing in crossings:
            self._finish(crossing, outcome.Error(TransportError("the host's asyncio loop is shut down")))

    # ---- Trio -> asyncio ----
    async def run(self, coro: Awaitable[T]) -> T:
        """Await an asyncio coroutine from Trio. Trio cancellation cancels it (and waits until
        the asyncio side has finished, so nothing keeps running behind the caller's back; the
        teardown of :func:`open_boundary` bounds that wait).

        Raises:
            CallFailed: the peer ended the RPC with a status carrying an ErrorInfo (the call
                failed or was refused; the connection is fine).
            TransportError: for other grpclib and OS-level errors, and at once (the coroutine
                is not started) when the loop is shut down or shutting down.
        """
        try:
            return await self._cross(coro, abandon_on_cancel=False)
        except _TRANSPORT_ERRORS as exc:
            info = info_of(exc) if isinstance(exc, grpclib.exceptions.GRPCError) else None
            if info is not None:
                raise CallFailed(info) from None
            raise TransportError(describe(exc)) from exc

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in the loop's thread (to make or change asyncio objects there).

        Raises:
            TransportError: the loop is shut down; and as :meth:`run`.
        """
        return await self.run(_call(fn, *args))

    @trio.lowlevel.enable_ki_protection
    async def _cross(self, coro: Awaitable[T], *, abandon_on_cancel: bool) -> T:
        # KI-protected: a Ctrl-C arrives at the wait below (through abort), never between the
        # hand-over and the wait, where the reply would find a task that no longer waits.
        if not self.usable:
            _close(coro)
            raise TransportError("the host's asyncio loop is shut down")
        crossing = _Crossing(coro, trio.lowlevel.current_task())
        try:
            self.loop.call_soon_threadsafe(self._start, crossing)
        except RuntimeError as exc:  # closed between the check and here
            _close(coro)
            raise TransportError(f"the host's asyncio loop is shut down ({exc})") from exc
        self._crossings.add(crossing)

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            with contextlib.suppress(RuntimeError):  # a closed loop has resolved it already
                self.loop.call_soon_threadsafe(self._cancel, crossing)
            if abandon_on_cancel:
                crossing.waiting = False
                self._crossings.discard(crossing)
                return trio.lowlevel.Abort.SUCCEEDED
            crossing.raise_cancel = raise_cancel
            return trio.lowlevel.Abort.FAILED

        try:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        except (asyncio.CancelledError, TransportError) as exc:
            if crossing.raise_cancel is None:
                if isinstance(exc, TransportError):
                    raise
                # cancelled on the loop's side: it is shutting down
                raise TransportError("the host's asyncio loop is shut down") from exc
            try:
                crossing.raise_cancel()
            except BaseException as cancelled:  # trio.Cancelled, or a KeyboardInterrupt delivered here
                cancelled.__cause__ = exc
                raise
            raise  # not reached: raise_cancel always raises

    def _start(self, crossing: _Crossing[Any]) -> None:
        """The loop's thread: start the crossing's coroutine; its end goes back to Trio."""
        coro, crossing.coro = crossing.coro, None
        assert coro is not None
        if self._closing:
            _close(coro)
            self._reply(crossing, outcome.Error(TransportError("the host's asyncio loop is shut down")))
            return
        try:
            task = asyncio.ensure_future(coro, loop=self.loop)
        except BaseException as exc:
            self._reply(crossing, outcome.Error(exc))
            return
        crossing.aio_task = task
        task.add_done_callback(lambda done: self._reply(crossing, outcome.capture(done.result)))

    def _cancel(self, crossing: _Crossing[Any]) -> None:
        """The loop's thread (after :meth:`_start`, as call_soon_threadsafe keeps order)."""
        if crossing.aio_task is not None:
            crossing.aio_task.cancel()

    def _reply(self, crossing: _Crossing[Any], result: outcome.Outcome[Any]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._finish, crossing, result)

    def _finish(self, crossing: _Crossing[Any], result: outcome.Outcome[Any]) -> None:
        """Trio's thread: wake the crossing's task, if it still waits (once)."""
        if crossing.waiting:
            crossing.waiting = False
            self._crossings.discard(crossing)
            trio.lowlevel.reschedule(crossing.task, result)

    async def _run_bounded(self, coro: Awaitable[Any], timeout: float) -> None:
        """For teardown: run ``coro`` for at most ``timeout`` seconds, shielded; errors,
        cancellation and a shut-down loop end it quietly, and what is left is abandoned."""
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            try:
                await self._cross(coro, abandon_on_cancel=True)
            except (TransportError, asyncio.CancelledError, *_TRANSPORT_ERRORS):
                pass

    def post(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Have ``fn(*args)`` called soon in the loop's thread, without waiting; False (and
        nothing called) when the loop is shut down."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True

    async def worker_stub(
        self, address: str, secret: str, ssl: SSLContext | None = None, *, server_name: str | None = None,
    ) -> tuple[grpclib.client.Channel, pb.WorkerServiceStub]:
        """A channel to a worker and its stub, made in the loop's thread (a channel is the loop's);
        over TLS, the worker's certificate must name ``server_name`` (default: the address's host).

        Raises:
            TransportError: the loop is shut down.
        """
        channel = await self.run_sync(partial(open_channel, address, ssl, server_name=server_name))
        return channel, pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: secret})

    def close_channel(self, channel: _Closable) -> None:
        """Close ``channel`` in the loop's thread (soon; at once if the loop is gone, where its
        sockets are closed already)."""
        self.post(channel.close)

    # ---- asyncio -> Trio ----
    async def call_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio code on the loop (a HostService handler): run the Trio async function
        ``fn(*args)`` in a task of the boundary's nursery, in a copy of the caller's context,
        and await it. Cancelling the caller cancels the Trio task (and waits up to a second for
        it to end); its errors are raised here.

        Raises:
            TransportError: the boundary is shut down.
        """
        job = _TrioJob(fn, args, asyncio.get_running_loop().create_future())
        try:
            self._token.run_sync_soon(self._spawn, job, contextvars.copy_context())
        except trio.RunFinishedError:
            raise TransportError("the host's Trio run is over") from None
        try:
            return await job.future
        except asyncio.CancelledError:
            if not job.done.is_set():
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._cancel_job, job)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(job.done.wait(), _TRIO_CANCEL_TIMEOUT)
            raise

    def _spawn(self, job: _TrioJob, context: contextvars.Context) -> None:
        """Trio's thread: start the job (its task gets a copy of ``context``)."""
        try:
            context.run(self._nursery.start_soon, self._run_job, job)
        except RuntimeError:  # the nursery is closed: the boundary is over
            self.post(_settle, job, outcome.Error(TransportError("the host's asyncio boundary is shut down")))

    def _cancel_job(self, job: _TrioJob) -> None:
        """Trio's thread."""
        job.cancelled = True
        if job.scope is not None:
            job.scope.cancel()

    async def _run_job(self, job: _TrioJob) -> None:
        result: outcome.Outcome[Any] | None = None  # None: cancelled
        try:
            with trio.CancelScope() as job.scope:
                if job.cancelled:
                    job.scope.cancel()
                try:
                    result = outcome.Value(await job.fn(*job.args))
                except Exception as exc:  # BaseExceptions (Cancelled, KeyboardInterrupt) stay in Trio
                    result = outcome.Error(exc)
        finally:
            self.post(_settle, job, result)

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
        server, health = await self.run_sync(lambda: new_server(services, secret, allowed_uids=allowed_uids))
        async with self._serving(server, [health], address, ssl) as bound:
            yield bound

    @asynccontextmanager
    async def serve_health(self, address: str, statuses: Mapping[str, ServingStatus]) -> AsyncIterator[str]:
        """Serve ``grpc.health.v1`` alone (see ``new_health_server``) on ``"tcp:HOST:PORT"``, in
        plain TCP, for the block's duration; yields the address it listens on. Set ``statuses``
        in the loop's thread (:meth:`post`); all turn NOT_SERVING as the block ends.

        Raises:
            OSError: it cannot listen there.
        """
        server = await self.run_sync(new_health_server, statuses)
        async with self._serving(server, list(statuses.values()), address, None) as bound:
            yield bound

    @asynccontextmanager
    async def _serving(
        self, server: grpclib.server.Server, health: list[ServingStatus], address: str, ssl: SSLContext | None,
    ) -> AsyncIterator[str]:
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

            async def close() -> None:
                for status in health:
                    status.set(False)
                server.close()
                await server.wait_closed()

            await self._run_bounded(close(), _CLOSE_SERVER_TIMEOUT)


def _settle(job: _TrioJob, result: outcome.Outcome[Any] | None) -> None:
    """The loop's thread: hand a Trio job's end to its asyncio caller."""
    job.done.set()
    if job.future.done():
        return
    if result is None:
        job.future.cancel()
    elif isinstance(result, outcome.Value):
        job.future.set_result(result.value)
    elif isinstance(result, outcome.Error):
        job.future.set_exception(result.error)


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class CallStreamBase:
    """What every call stream does with its calls, in Trio's thread: the callers waiting by call
    id, a reply delivered to its caller (the drain notice, call id ``""``, to ``on_draining``), a
    failure failing every caller now and later with :class:`TransportError`, and a cancelled
    caller's ``cancel`` message. A subclass moves the messages (:meth:`_send`) and calls
    :meth:`deliver` with each reply and :meth:`fail` when the stream fails or ends."""

    def __init__(self, on_draining: Callable[[], None]) -> None:
        self._on_draining = on_draining
        self._waiting: dict[str, _Reply] = {}
        self._failure: str | None = None

    def _send(self, message: pb.CallMessage) -> None:
        """Send ``message`` after those sent before it, without waiting (Trio's thread).

        Raises:
            TransportError: the stream is gone (it has failed, or fails now).
        """
        raise NotImplementedError

    def _send_execute(self, request: pb.ExecuteToolRequest) -> None:
        self._send(pb.CallMessage(execute=request))

    def deliver(self, result: pb.CallResult) -> None:
        """A reply (Trio's thread): to its caller, if it still waits."""
        if not result.call_id:  # a notice, not a reply
            if result.response is not None and result.response.error is not None and result.response.error.kind == DRAINING:
                self._on_draining()
            return
        reply = self._waiting.pop(result.call_id, None)
        if reply is not None:  # None: a cancelled call's late answer
            reply.set(outcome.Value(pb.ExecuteToolResponse() if result.response is None else result.response))

    def fail(self, reason: str) -> None:
        """The stream failed or ended (Trio's thread): every caller, now and later, gets
        :class:`TransportError` (the first reason given)."""
        if self._failure is None:
            self._failure = reason
        waiting, self._waiting = self._waiting, {}
        for reply in waiting.values():
            reply.set(outcome.Error(TransportError(self._failure)))

    @property
    def ended(self) -> bool:
        """The stream has failed or ended: a call sent from now on never reaches the worker."""
        return self._failure is not None

    async def execute(self, request: pb.ExecuteToolRequest) -> pb.ExecuteToolResponse:
        """Run one call; a cancelled caller cancels it on the worker.

        Raises:
            TransportError: the stream failed (or had already), before the reply came.
        """
        if self._failure is not None:
            raise TransportError(self._failure)
        reply = _Reply()
        self._waiting[request.call_id] = reply
        self._send_execute(request)
        try:
            return await reply.wait()
        except BaseException:
            if self._waiting.pop(request.call_id, None) is not None and self._failure is None:
                with contextlib.suppress(TransportError):
                    self._send(pb.CallMessage(cancel=request.call_id))
            raise


class _Reply:
    """One call's wait for its answer: the caller's task parked until the stream (its reader, or
    a failure) reschedules it with the outcome, in Trio's thread; no Event, no parking lot (one
    call, one waiter)."""

    __slots__ = ("result", "task")

    def __init__(self) -> None:
        self.result: outcome.Outcome[pb.ExecuteToolResponse] | None = None
        self.task: trio.lowlevel.Task | None = None  # the caller, while it waits

    def set(self, result: outcome.Outcome[pb.ExecuteToolResponse]) -> None:
        self.result = result
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task, result)

    async def wait(self) -> pb.ExecuteToolResponse:
        """The answer (a checkpoint, as ``Event.wait`` is); a cancellation leaves it unanswered."""
        if self.result is not None:  # answered (or failed) before the caller parked
            await trio.lowlevel.checkpoint()
            return self.result.unwrap()
        self.task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class CallStream(CallStreamBase):
    """A worker connection's calls, multiplexed on one long-lived bidirectional gRPC stream
    (``WorkerService.Calls``), driven from Trio.

    Why: a unary RPC per call costs a HEADERS frame, HPACK, a DATA frame and trailers each way;
    on one stream a call is one DATA frame each way and one crossing each way: a Trio caller
    hands its request to the loop's outbox and sleeps until the reply's call id wakes it.
    Replies read in one loop tick cross back to Trio together. Cancelling a caller sends
    ``cancel`` with its call id (the worker cancels that call alone).

    Threads: ``_waiting`` and ``_failure`` are Trio's; the stream and its outbox the loop's.

    :meth:`run` is the stream's life (a Trio task of the worker's handle): its asyncio side reads
    replies and writes the outbox in order. When the stream fails or ends, every call waiting on
    it fails with :class:`TransportError`, as do later ones. ``on_draining()`` is called (Trio's
    thread) when the worker says on the stream that it drains (a result with call id ``""``).
    """

    def __init__(
        self, boundary: Boundary, stub: pb.WorkerServiceStub, max_in_flight: int, on_draining: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(on_draining)
        self._boundary = boundary
        self._stub = stub
        # Each call in flight puts at most an execute and a cancel, and a worker has at most
        # max_in_flight calls in flight (the pool's slots): never full.
        self._outbox_size = 2 * max_in_flight + 2
        self._outbox: asyncio.Queue[pb.CallMessage] | None = None  # the loop's, once open
        self._replies: list[pb.CallResult] = []  # the loop's: read this tick, not yet handed over

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
            self.fail(str(exc))
        except CallFailed as exc:  # the worker refused the stream itself (a request it cannot read)
            self.fail(f"the worker refused the call stream: {exc.info.message}")
        except Exception as exc:  # e.g. a reply that does not parse: the peer's fault or ours, never the caller's
            _logger.warning("a call stream failed", exc_info=True)
            self.fail(f"the call stream failed: {describe(exc)}")
        finally:
            self.fail("the call stream ended")
            opened.set()

    async def _serve(self, opened: trio.Event) -> None:
        """The loop's thread."""
        token = self._boundary._token
        async with self._stub.channel.request(
            "/trio_bridge.v1.WorkerService/Calls", grpclib.const.Cardinality.STREAM_STREAM,
            pb.CallMessage, pb.CallResult, metadata=self._stub.metadata,
        ) as stream:
            await stream.send_request()
            self._outbox = asyncio.Queue(maxsize=self._outbox_size)
            token.run_sync_soon(opened.set)
            writer = asyncio.ensure_future(self._write(stream))
            loop = asyncio.get_running_loop()
            try:
                while (result := await stream.recv_message()) is not None:
                    if not self._replies:
                        loop.call_soon(self._hand_over)
                    self._replies.append(result)
                    del result  # not held while the next one arrives: its big buffer may be reused then (buffers.py)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_TRANSPORT_ERRORS):
                    await writer

    def _hand_over(self) -> None:
        """The loop's thread: the replies read this tick cross to Trio in one go (the list is
        Trio's from then on)."""
        replies, self._replies = self._replies, []
        with contextlib.suppress(trio.RunFinishedError):
            self._boundary._token.run_sync_soon(self._deliver_all, replies)

    def _deliver_all(self, replies: list[pb.CallResult]) -> None:
        """Trio's thread."""
        for result in replies:
            self.deliver(result)

    async def _write(self, stream: Any) -> None:
        assert self._outbox is not None
        while True:
            await stream.send_message(await self._outbox.get())

    def _enqueue(self, message: pb.CallMessage) -> None:
        """The loop's thread."""
        if self._outbox is None:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:  # a bug: more than two messages per slot
            with contextlib.suppress(trio.RunFinishedError):
                self._boundary._token.run_sync_soon(self.fail, "the call stream's outbox is full")

    def _send(self, message: pb.CallMessage) -> None:
        if not self._boundary.post(self._enqueue, message):
            self.fail("the host's asyncio loop is shut down")
            raise TransportError(self._failure or "the call stream ended")


def _close(coro: Awaitable[Any]) -> None:
    close = getattr(coro, "close", None)
    if close is not None:
        close()  # no "coroutine was never awaited" warning


def describe(exc: BaseException) -> str:
    """``exc`` in a few words for an error message: its type and text (a gRPC status by name)."""
    if isinstance(exc, grpclib.exceptions.GRPCError):
        return f"gRPC {exc.status.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
