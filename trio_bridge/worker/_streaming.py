"""Feeding a streaming tool's chunks to the gRPC sender, with backpressure and batching.

A producer (an asyncio task for async generators, a pool thread for sync generators) pushes
chunks into a bounded buffer; the sender takes everything ready at once (up to a batch size) and
sends it as one message. When the host reads slowly, HTTP/2 flow control stalls the sender, the
buffer fills and the producer pauses at its next ``yield``: memory stays flat. Closing a source
stops the generator at its current ``yield`` (``GeneratorExit``), so its side effects stop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import threading
import traceback
from collections.abc import AsyncGenerator, Callable, Generator
from concurrent.futures import Executor
from typing import Any

from trio_bridge._core.failures import is_failure, raise_stop

_END = object()


class AsyncGeneratorSource:
    """Chunks of an async generator, produced by a task on the worker's loop."""

    def __init__(self, agen: AsyncGenerator[Any, None], buffer_size: int) -> None:
        self._agen = agen
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer_size)
        self._error: BaseException | None = None
        self._ended = False  # the end (_END) was taken from the queue
        self._closing = False  # aclose() was called: nobody takes chunks any more
        self._task = asyncio.get_running_loop().create_task(self._produce())

    async def _produce(self) -> None:
        try:
            try:
                async for item in self._agen:
                    if self._closing:  # (it went on after its cancel)
                        break
                    await self._queue.put(item)
            finally:
                await self._agen.aclose()
        except BaseException as exc:
            # Only aclose() cancels this task: a cancel of its own code's is its failure.
            if not is_failure(exc, (asyncio.CancelledError,) if self._closing else ()):  # closed, or the program stops
                raise_stop(exc)
            if self._closing:  # raised as it was closed (a RuntimeError if it yielded again)
                _report_closing_error()
                return
            self._error = exc
        if not self._closing:  # (a full queue would never take the end)
            await self._queue.put(_END)

    async def next_batch(self, max_items: int) -> tuple[list[Any], bool]:
        """Wait for at least one chunk; return ``(chunks, finished)``. Raises the generator's error
        once its earlier chunks were taken (by the next call, where they came in the same batch
        as its end)."""
        if self._ended:  # the end was taken with the last chunks: what follows them is the error
            if self._error is not None:
                raise self._error
            return [], True
        items = [await self._queue.get()]
        while len(items) < max_items and not self._queue.empty():
            items.append(self._queue.get_nowait())
        if items[-1] is _END:
            items.pop()
            self._ended = True
            if self._error is not None and not items:
                raise self._error
            return items, self._error is None
        return items, False

    async def aclose(self) -> None:
        """Stop the generator and wait for its task to end. That task's ``CancelledError`` is
        not raised here: a caller closing it while cancelled itself (the host left the stream)
        would lose what it does after. A cancel of the caller while it waits goes on into the
        generator's cleanup, as awaiting a task passes it on; the caller goes on once the
        generator has ended (its call's slot is freed after this in any case)."""
        self._closing = True
        if not self._task.done():
            self._task.cancel()
            # The producer's end, as asked (awaiting the task resumes only once it is done, even
            # for a cancel of the caller: nothing else to tell apart).
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ThreadGeneratorSource:
    """Chunks of a sync generator that runs in a pool thread.

    ``on_exit`` is called in the thread when the generator has finished or been closed: that is
    when the call really frees its slot.
    """

    def __init__(
        self,
        gen: Generator[Any, None, None],
        buffer_size: int,
        executor: Executor,
        on_exit: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._buffer_size = buffer_size
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._finished = False
        self._error: BaseException | None = None
        self._gen = gen
        self._on_exit = on_exit
        executor.submit(self._run)

    # --- the producer thread ---
    def _run(self) -> None:
        try:
            with self._lock:
                closed = self._closed
            if closed:  # cancelled before a thread took it: never start the generator's code
                self._finish(None)
                return
            for item in self._gen:
                if not self._put(item):
                    break
        except BaseException as exc:  # reported to the host as the tool's error
            self._finish(exc)
        else:
            self._finish(None)
        finally:
            try:
                self._gen.close()  # stops the generator at its yield if we left early
            except BaseException as exc:  # only where we left early (a finished one closes quietly)
                if not is_failure(exc, ()):
                    raise
                _report_closing_error()
            finally:
                self._on_exit()

    def _put(self, item: Any) -> bool:
        with self._not_full:
            while len(self._items) >= self._buffer_size and not self._closed:
                self._not_full.wait()
            if self._closed:
                return False
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)
        return True

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._finished = True
            self._error = error
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    # --- the loop side ---
    async def next_batch(self, max_items: int) -> tuple[list[Any], bool]:
        while True:
            with self._lock:
                if self._items:
                    n = min(max_items, len(self._items))
                    items = [self._items.popleft() for _ in range(n)]
                    self._not_full.notify()
                    return items, self._finished and not self._items and self._error is None
                if self._finished:
                    if self._error is not None:
                        raise self._error
                    return [], True
                waiter = self._waiter = self._loop.create_future()
            await waiter

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            self._not_full.notify_all()


def _report_closing_error() -> None:
    """Report what a streaming tool's generator raised as it was closed (its caller had left, so
    nobody else hears of it), as asyncio reports an async generator's, on stderr (the host's log);
    the call has ended all the same. A stderr the tool closed or dropped takes no report."""
    with contextlib.suppress(Exception):
        print("trio-bridge worker: a streaming tool's generator raised as it was closed:", file=sys.stderr)
        traceback.print_exc()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
