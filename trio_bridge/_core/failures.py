"""What user code raised: its failure, answered to the caller, or a stop that propagates.

One rule for both sides (a worker's tools and hooks, the host's tools) and for the codec (a
value's own methods raising while it is encoded); it imports nothing of trio_bridge (the codec
uses it).
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

__all__ = ["STOPS_PROGRAM", "exception_text", "failed_in_task", "is_failure", "raise_stop"]


#: What user code (a tool, an adapter's hook) may raise that stops the program it runs in instead
#: of failing what it was doing: these two propagate, as asyncio's tasks re-raise them
#: (``Task.__step``) and Trio lets them through.
STOPS_PROGRAM: tuple[type[BaseException], ...] = (SystemExit, KeyboardInterrupt)


def is_failure(exc: BaseException, cancellation: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc``, raised out of user code, is that code's failure -- answered to the caller
    (a tool's: :class:`~trio_bridge.ToolError` naming it) -- rather than a stop: one of
    :data:`STOPS_PROGRAM`, one of ``cancellation`` (the runtime's cancellation, where it is one),
    or an exception group that holds one. So ``GeneratorExit``, ``StopIteration``, a bare
    ``BaseException`` and a test framework's ``BaseException`` subclasses fail the call as any
    ``Exception`` does, as ``concurrent.futures`` keeps them as a call's outcome."""
    stops = (*STOPS_PROGRAM, *cancellation)
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(stops) is None
    return not isinstance(exc, stops)


def failed_in_task(exc: BaseException) -> bool:
    """:func:`is_failure` for code run in the current asyncio task: its ``CancelledError`` is a
    stop while the task is being cancelled (``Task.cancelling()``: the caller's cancel, a
    deadline's timeout); raised otherwise (a future the code awaited was cancelled by someone
    else), it is the code's failure."""
    task = asyncio.current_task()
    cancelling = task is None or task.cancelling() > 0
    return is_failure(exc, (asyncio.CancelledError,) if cancelling else ())


def raise_stop(exc: BaseException) -> NoReturn:
    """Raise ``exc``, a stop (not :func:`is_failure`), so that it stops what it should: an
    exception group's first ``SystemExit`` or ``KeyboardInterrupt`` bare, from the group (asyncio
    stops its loop for a bare one only; a group would end just the task, and its call would never
    be answered); anything else as it is."""
    if isinstance(exc, BaseExceptionGroup):
        stops = exc.subgroup(STOPS_PROGRAM)
        if stops is not None:
            leaf: BaseException = stops
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from exc
    raise exc


def exception_text(exc: BaseException) -> str:
    """``str(exc)``; where the exception's own ``__str__`` raises (anything but a stop), what
    ``traceback`` writes in its place: ``"<exception str() failed>"``."""
    try:
        return str(exc)
    except BaseException as failed:
        if not is_failure(failed, ()):
            raise
        return "<exception str() failed>"
