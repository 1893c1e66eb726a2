"""In-band error reports (:class:`ErrorInfo`) <-> the exceptions of :mod:`trio_bridge._errors`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import traceback as _traceback

from trio_bridge._errors import (
    DeadlineExceededError,
    DependencyCycleError,
    EncodeError,
    InvalidArgumentError,
    InvalidVariableError,
    PoolClosedError,
    QuotaExceededError,
    SessionExistsError,
    SessionNotFoundError,
    StateUnavailableError,
    ToolError,
    ToolNotFoundError,
    TrioBridgeError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
    WorkerBusyError,
)
from trio_bridge._wire.generated.trio_bridge.v1 import ErrorInfo

# ErrorInfo.kind values.
TOOL_ERROR = "tool_error"
TOOL_NOT_FOUND = "tool_not_found"
INVALID_ARGUMENT = "invalid_argument"
ENCODE_ERROR = "encode_error"
DEADLINE_EXCEEDED = "deadline_exceeded"
SHUTTING_DOWN = "shutting_down"
STATE = "state"  # a refused session or variable operation; ErrorInfo.type names the class

# Errors that travel by class name: the receiver raises the same class with the same message.
_BY_NAME: dict[str, type[TrioBridgeError]] = {
    cls.__name__: cls
    for cls in (
        SessionNotFoundError, QuotaExceededError, VariableNotFoundError, InvalidVariableError,
        VersionConflictError, DependencyCycleError, VariableLockedError, WorkerBusyError, SessionExistsError,
        StateUnavailableError,
    )
}


def error_info(exc: BaseException, *, kind: str | None = None, available: list[str] | None = None) -> ErrorInfo:
    """Describe ``exc`` for the wire. Without ``kind``, our own errors map to theirs and any other
    exception is a tool error carrying its traceback."""
    if isinstance(exc, ToolError):  # passing on another side's tool error: keep its origin
        return ErrorInfo(kind=TOOL_ERROR, type=exc.remote_type, message=exc.remote_message, traceback=exc.remote_traceback)
    if kind is None:
        if type(exc).__name__ in _BY_NAME:
            kind = STATE
        elif isinstance(exc, ToolNotFoundError):
            kind, available = TOOL_NOT_FOUND, list(exc.available)
        elif isinstance(exc, InvalidArgumentError):
            kind = INVALID_ARGUMENT
        elif isinstance(exc, EncodeError):
            kind = ENCODE_ERROR
        else:
            kind = TOOL_ERROR
    text = _user_traceback(exc) if kind == TOOL_ERROR else ""
    return ErrorInfo(
        kind=kind,
        type=type(exc).__name__,
        message=str(exc),
        traceback=text,
        available=list(available or []),
    )


def exception_from(info: ErrorInfo, tool: str) -> TrioBridgeError:
    """The exception an :class:`ErrorInfo` from a call of ``tool`` stands for."""
    kind = info.kind
    if kind == TOOL_NOT_FOUND:
        return ToolNotFoundError(tool, list(info.available))
    if kind == INVALID_ARGUMENT:
        return InvalidArgumentError(info.message)
    if kind == ENCODE_ERROR:
        return EncodeError(f"tool {tool!r}: {info.message}")
    if kind == DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"tool {tool!r}: {info.message}")
    if kind == STATE and info.type in _BY_NAME:
        return _BY_NAME[info.type](info.message)
    if kind == SHUTTING_DOWN:
        return PoolClosedError(f"tool {tool!r}: {info.message}")
    return ToolError(tool, info.type, info.message, info.traceback)


# Frames of the machinery that ran the tool are noise in a remote traceback: drop them.
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MACHINERY = (
    os.path.join(_HERE, "worker", ""),
    os.path.join(_HERE, "_wire", ""),
    os.path.join(_HERE, "_host", ""),
    os.path.dirname(asyncio.__file__) + os.sep,
    os.path.dirname(concurrent.futures.__file__) + os.sep,
)


def _user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_MACHINERY):
        tb = tb.tb_next
    return "".join(_traceback.format_exception(type(exc), exc, tb))
