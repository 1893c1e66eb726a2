"""SIGINT and SIGTERM as an orderly stop of an open pool (``Lifecycle(handle_signals=True)``).

Python's defaults are wrong for a process that holds a pool: SIGTERM kills it at once (no drain,
no cleanup: the workers then die by the kernel's parent-death signal), and Trio raises
``KeyboardInterrupt`` wherever SIGINT finds unprotected code, in any task. So while a pool is
open, and only where the process still has those defaults and the pool runs in the main thread,
it receives both signals itself (``trio.open_signal_receiver``, as Trio's docs advise):

* the first cancels the pool's start-up and the user's block; the pool then closes as usual
  (workers get ``shutdown_timeout`` to finish, then are killed), and ``open_pool`` raises
  ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(143)`` (SIGTERM: the process exits with status
  128 + 15, as a shell reports a process SIGTERM ended, after the application's own cleanup);
* a second skips the drain: the workers are killed at once.

A program with its own handlers (its own ``open_signal_receiver``, a CLI) keeps them: the pool
then leaves signals alone. Nested pools: the outermost handles them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from trio_bridge._errors import TrioBridgeError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _has_default_handler(signum: int) -> bool:
    handler: Any = signal.getsignal(signum)
    if signum == signal.SIGINT:
        # Python's handler, or the one trio.run puts in its place for KeyboardInterrupt.
        return handler is signal.default_int_handler or getattr(handler, "__qualname__", "").startswith("KIManager.")
    return handler == signal.SIG_DFL


class StoppedBySignal(TrioBridgeError):
    """Internal: the pool's start-up was cut short by a signal (it never reaches users: it
    leaves ``open_pool`` as the signal's ``KeyboardInterrupt`` / ``SystemExit``)."""


class SignalStop:
    """One pool's signal handling. ``scope`` wraps the start-up and the user's block;
    ``shutdown_scope`` (shielded) the drain; :meth:`check` raises at the very end."""

    def __init__(self, enabled: bool) -> None:
        self.received: list[int] = []
        self.scope = trio.CancelScope()
        self.shutdown_scope = trio.CancelScope(shield=True)
        self._receiver: Any = None
        self._enabled = enabled

    @contextmanager
    def installed(self) -> Iterator[None]:
        main = threading.current_thread() is threading.main_thread()
        signums = [s for s in _SIGNALS if self._enabled and main and _has_default_handler(s)]
        if not signums:
            yield
            return
        with trio.open_signal_receiver(*signums) as receiver:
            self._receiver = receiver
            yield

    def listen(self, nursery: trio.Nursery, force: Callable[[], None]) -> None:
        """Start the listener in the pool's nursery; ``force()`` skips the drain."""
        if self._receiver is not None:
            nursery.start_soon(self._listen, force)

    async def _listen(self, force: Callable[[], None]) -> None:
        async for signum in self._receiver:
            self.received.append(signum)
            if len(self.received) == 1:
                self.scope.cancel()
            else:
                self.shutdown_scope.cancel()
                force()

    def check(self, error: BaseException | None = None) -> None:
        """Raise what the first signal means, if one came. ``error`` left the pool's block:
        the consequence of the stop (cancellation) is not shown; anything else is the cause."""
        if not self.received:
            return
        if self.received[0] == signal.SIGINT:
            raised: BaseException = KeyboardInterrupt()
        else:
            raised = SystemExit(128 + signal.SIGTERM)
        if error is not None and not _only_cancellation(error):
            raise raised from error
        raise raised from None


def _only_cancellation(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return all(_only_cancellation(e) for e in error.exceptions)
    return isinstance(error, (trio.Cancelled, StoppedBySignal))
