"""The error model: :class:`ErrorInfo` <-> the exceptions of :mod:`trio_bridge._errors`, and
ErrorInfo <-> gRPC statuses.

A failed RPC ends with the standard gRPC status its ErrorInfo maps to (:func:`status_of`), with
the ErrorInfo itself in the ``grpc-status-details-bin`` trailer: a ``google.rpc.Status`` whose
``details`` hold it as a ``google.protobuf.Any`` (the rich error model of
https://grpc.io/docs/guides/error/, see :class:`StatusDetailsCodec`). So gRPC tooling counts
failures as failures, and a peer still gets the remote type, message and traceback. Results
that share a stream with others (a CallResult on the Calls stream) carry the ErrorInfo in-band.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import traceback as _traceback
from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import (
    DeadlineExceededError,
    DependencyCycleError,
    EncodeError,
    InvalidArgumentError,
    InvalidVariableError,
    NotAllowedError,
    PoolClosedError,
    PoolSaturatedError,
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
from trio_bridge._wire.auth import RateLimitedWarning
from trio_bridge._wire.contract import MAX_STATUS_DETAILS_BYTES, MAX_STATUS_MESSAGE_BYTES, REFUSAL_LOG_INTERVAL
from trio_bridge._wire.generated.trio_bridge.v1 import ErrorInfo

# ErrorInfo.kind values.
TOOL_ERROR = "tool_error"
TOOL_NOT_FOUND = "tool_not_found"
INVALID_ARGUMENT = "invalid_argument"
ENCODE_ERROR = "encode_error"
DEADLINE_EXCEEDED = "deadline_exceeded"
SHUTTING_DOWN = "shutting_down"
# The worker drains (SIGTERM, SIGHUP, Shutdown): it did not start the call, another worker may
# run it. With call_id "" on a call stream, a notice that it drains (docs/wire.md, 6.3).
DRAINING = "draining"
STATE = "state"  # a refused session or variable operation; ErrorInfo.type names the class
INTERNAL = "internal"  # a fault of trio-bridge's own, not of the tool or the request

# Errors that travel by class name: the receiver raises the same class with the same message.
_BY_NAME: dict[str, type[TrioBridgeError]] = {
    cls.__name__: cls
    for cls in (
        SessionNotFoundError, QuotaExceededError, VariableNotFoundError, InvalidVariableError,
        VersionConflictError, DependencyCycleError, VariableLockedError, WorkerBusyError, SessionExistsError,
        StateUnavailableError, PoolSaturatedError,
    )
}

# The gRPC status of each kind of error (google.rpc.Code, as grpclib names it).
_STATUS_BY_KIND = {
    TOOL_ERROR: Status.UNKNOWN,  # the tool's own exception: its type is in the ErrorInfo
    TOOL_NOT_FOUND: Status.NOT_FOUND,
    INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
    ENCODE_ERROR: Status.INTERNAL,  # a result (or chunk) the tool returned cannot be encoded
    DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
    SHUTTING_DOWN: Status.UNAVAILABLE,
    DRAINING: Status.UNAVAILABLE,
    INTERNAL: Status.INTERNAL,
}
_STATUS_BY_STATE_TYPE = {
    SessionNotFoundError.__name__: Status.NOT_FOUND,
    VariableNotFoundError.__name__: Status.NOT_FOUND,
    SessionExistsError.__name__: Status.ALREADY_EXISTS,
    InvalidVariableError.__name__: Status.INVALID_ARGUMENT,
    VersionConflictError.__name__: Status.ABORTED,  # optimistic concurrency: read again, retry
    DependencyCycleError.__name__: Status.FAILED_PRECONDITION,
    VariableLockedError.__name__: Status.FAILED_PRECONDITION,
    QuotaExceededError.__name__: Status.RESOURCE_EXHAUSTED,
    WorkerBusyError.__name__: Status.RESOURCE_EXHAUSTED,
    PoolSaturatedError.__name__: Status.RESOURCE_EXHAUSTED,
    StateUnavailableError.__name__: Status.UNAVAILABLE,
}
ERROR_INFO_TYPE_URL = "type.googleapis.com/trio_bridge.v1.ErrorInfo"


def error_info(exc: BaseException, *, kind: str | None = None, available: list[str] | None = None) -> ErrorInfo:
    """Describe ``exc`` for the wire. Without ``kind``, our own errors map to theirs and any other
    exception is a tool error carrying its traceback."""
    if isinstance(exc, ToolError):  # passing on another side's tool error: keep its origin
        return ErrorInfo(kind=INTERNAL if exc.internal else TOOL_ERROR, type=exc.remote_type, message=exc.remote_message, traceback=exc.remote_traceback)
    if kind is None:
        if type(exc).__name__ in _BY_NAME:
            kind = STATE
        elif isinstance(exc, ToolNotFoundError):
            kind, available = TOOL_NOT_FOUND, list(exc.available)
        elif isinstance(exc, InvalidArgumentError):
            kind = INVALID_ARGUMENT
        elif isinstance(exc, EncodeError):
            kind = ENCODE_ERROR
        elif isinstance(exc, DeadlineExceededError):
            kind = DEADLINE_EXCEEDED
        elif isinstance(exc, PoolClosedError):
            kind = SHUTTING_DOWN
        else:
            kind = TOOL_ERROR
    text = _user_traceback(exc) if kind in (TOOL_ERROR, INTERNAL) else ""
    return ErrorInfo(
        kind=kind,
        type=type(exc).__name__,
        message=exception_text(exc),
        traceback=text,
        available=list(available or []),
    )



def tool_failure(exc: BaseException) -> ErrorInfo:
    """What a tool raised, for the wire: a tool error, unless it deliberately said the call
    itself was wrong (``InvalidArgumentError``, ``EncodeError``)."""
    if isinstance(exc, (InvalidArgumentError, EncodeError)):
        return error_info(exc)
    return error_info(exc, kind=TOOL_ERROR)


def deadline_error() -> ErrorInfo:
    """A call whose deadline passed in the worker."""
    return ErrorInfo(kind=DEADLINE_EXCEEDED, type="TimeoutError", message="the call's deadline passed in the worker")

def draining_notice() -> ErrorInfo:
    """The ErrorInfo of a call a draining worker refuses (it did not start it), and of its notice
    on a call stream that it drains."""
    return ErrorInfo(kind=DRAINING, type="Draining", message="the worker drains: it takes no new call")


def exception_from(info: ErrorInfo, tool: str) -> TrioBridgeError:
    """The exception an :class:`ErrorInfo` from a call of ``tool`` stands for."""
    kind = info.kind
    if kind == TOOL_NOT_FOUND:
        return ToolNotFoundError(tool, list(info.available))
    if kind == INVALID_ARGUMENT:  # the PythonAdapter's refusal keeps its class (a subclass)
        return (NotAllowedError if info.type == NotAllowedError.__name__ else InvalidArgumentError)(info.message)
    if kind == ENCODE_ERROR:
        return EncodeError(f"tool {tool!r}: {info.message}")
    if kind == DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"tool {tool!r}: {info.message}")
    if kind == STATE and info.type in _BY_NAME:
        return _BY_NAME[info.type](info.message)
    if kind in (SHUTTING_DOWN, DRAINING):  # (the pool's own workers turn DRAINING into a new dispatch first)
        return PoolClosedError(f"tool {tool!r}: {info.message}")
    # the tool's own error; anything else (INTERNAL, a kind or state error this version does
    # not know) is still the call's error, marked as not the tool's
    return ToolError(tool, info.type, info.message, info.traceback, internal=kind != TOOL_ERROR)


def status_of(info: ErrorInfo) -> Status:
    """The gRPC status an RPC that failed with ``info`` ends with (see docs/wire.md)."""
    if info.kind == STATE:
        return _STATUS_BY_STATE_TYPE.get(info.type, Status.FAILED_PRECONDITION)
    return _STATUS_BY_KIND.get(info.kind, Status.UNKNOWN)


def status_error(info: ErrorInfo) -> GRPCError:
    """The ``GRPCError`` a handler raises to fail its RPC with ``info``: its status, its message,
    and ``info`` in the status details (sent by :class:`StatusDetailsCodec`), both cut to fit a
    trailer (:func:`bounded`)."""
    message = f"{info.type}: {info.message}" if info.kind == TOOL_ERROR and info.type else info.message
    return GRPCError(status_of(info), clip(message, MAX_STATUS_MESSAGE_BYTES), [bounded(info)])


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (about), saying how long it was: an
    error message or a log line never carries an unbounded string a client sent."""
    if len(text) * 4 <= limit:  # short enough whatever its characters
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    note = f"... [cut: {len(data):,} bytes in all]"
    return data[: max(limit - len(note), 0)].decode("utf-8", "ignore") + note


def _clip_head(text: str, limit: int) -> str:
    """``text`` cut to its last ``limit`` bytes (about): a traceback's end, where the error is."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    note = f"[cut: the first {len(data) - limit:,} of {len(data):,} bytes]\n..."
    return note + data[len(data) - max(limit - len(note), 0):].decode("utf-8", "ignore")


_AVAILABLE_BYTES = 1024  # names of existing tools a tool_not_found trailer lists


def bounded(info: ErrorInfo) -> ErrorInfo:
    """``info`` cut to fit a failed RPC's ``grpc-status-details-bin`` trailer (at most
    ``MAX_STATUS_DETAILS_BYTES`` before base64, see ``docs/wire.md``, Limits): its message, its
    type, the list of available tools, then the start of its traceback (the end, where the error
    is, is kept). ``info`` itself if it fits."""
    if len(bytes(info)) + MAX_STATUS_MESSAGE_BYTES + 80 <= MAX_STATUS_DETAILS_BYTES:
        return info
    message, type_ = clip(info.message, 1024), clip(info.type, 256)
    available: list[str] = []
    room = _AVAILABLE_BYTES
    for name in info.available:
        room -= len(name.encode("utf-8", "surrogatepass")) + 3
        if room < 0:
            break
        available.append(name)
    trimmed = ErrorInfo(kind=clip(info.kind, 64), type=type_, message=message, traceback="", available=available)
    room = MAX_STATUS_DETAILS_BYTES - MAX_STATUS_MESSAGE_BYTES - len(bytes(trimmed)) - 80  # 80: the Status and Any around it
    trimmed.traceback = _clip_head(info.traceback, room) if room > 64 else ""
    return trimmed


class Refusals:
    """A server's log of the requests it refuses as malformed or over a limit: per kind of
    refusal, one line per ``REFUSAL_LOG_INTERVAL`` seconds at most (saying how many were held
    back since), each short, never a traceback: a bad client cannot flood the log."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("trio_bridge.wire")
        self._by_kind: dict[str, RateLimitedWarning] = {}
        # The host's service logs from both sides of its asyncio boundary (two threads).
        self._lock = threading.Lock()

    def log(self, kind: str, problem: str) -> None:
        """Log (rate-limited) the refusal of a request; ``kind``: one of a few fixed words."""
        with self._lock:
            warning = self._by_kind.get(kind)
            if warning is None:
                warning = self._by_kind[kind] = RateLimitedWarning(self._logger, REFUSAL_LOG_INTERVAL)
            warning.warn(f"refused a request ({kind}): {clip(problem, 300)}")

    def refuse(self, kind: str, problem: str, *, type_name: str = "InvalidArgumentError") -> GRPCError:
        """Log the refusal of a request, and return the ``INVALID_ARGUMENT`` error to end its RPC with."""
        self.log(kind, problem)
        return status_error(ErrorInfo(kind=INVALID_ARGUMENT, type=type_name, message=problem))


# Kinds of refusals (Refusals.log), besides those of limits.request_problem.
NO_MESSAGE = "no message"
MALFORMED_PAYLOAD = "malformed payload"


def require_message(stream: Any, rpc: str, refusals: Refusals) -> None:
    """Make ``stream`` (a grpclib server stream of ``rpc``, whose request is one message) refuse
    a request that ended with no message: ``INVALID_ARGUMENT``, logged by ``refusals`` (grpclib
    hands a handler ``None`` then, which fails with ``UNKNOWN`` and a traceback)."""
    receive = stream.recv_message

    async def recv_message() -> Any:
        message = await receive()
        if message is None:
            raise refusals.refuse(NO_MESSAGE, f"{rpc}: the request ended without its message")
        return message

    stream.recv_message = recv_message


def info_of(exc: GRPCError) -> ErrorInfo | None:
    """The ErrorInfo in a failed RPC's status details (a trio-bridge peer's), or ``None``: a
    status of the transport's own, or from a server that sent no details."""
    for detail in exc.details or ():
        if isinstance(detail, ErrorInfo):
            return detail
    return None


class CallFailed(Exception):
    """A peer ended an RPC with a status carrying ``info``: the call failed (or was refused),
    its connection did not."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info: ErrorInfo = info


class StatusDetailsCodec(StatusDetailsCodecBase):
    """grpclib's codec of the ``grpc-status-details-bin`` trailer, for betterproto2 messages: a
    ``google.rpc.Status`` (code, message, details) whose details are ``google.protobuf.Any``.

    grpclib's own ``ProtoStatusDetailsCodec`` wants googleapis-common-protos and protobuf
    messages; ours are betterproto2's. Encodes the :class:`ErrorInfo` among ``details`` (other
    messages are skipped); decodes to a list holding the ErrorInfo found, if any (details of
    other types are skipped: a client that wants them reads the trailer itself).
    """

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        from trio_bridge._wire.generated.google.protobuf import Any as AnyMessage
        from trio_bridge._wire.generated.google.rpc import Status as StatusMessage

        packed = [AnyMessage(type_url=ERROR_INFO_TYPE_URL, value=bytes(bounded(d))) for d in details or () if isinstance(d, ErrorInfo)]
        return bytes(StatusMessage(code=status.value, message=clip(message or "", MAX_STATUS_MESSAGE_BYTES), details=packed))

    def decode(self, status: Status, message: str | None, data: bytes) -> list[ErrorInfo]:
        from trio_bridge._wire.generated.google.rpc import Status as StatusMessage

        try:
            details = StatusMessage.parse(data).details
            return [ErrorInfo.parse(d.value) for d in details if d.type_url == ERROR_INFO_TYPE_URL]
        except Exception:  # a malformed trailer: the status and its message still stand
            return []


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
    try:
        return "".join(_traceback.format_exception(type(exc), exc, tb))
    except BaseException as failed:  # its __str__ raised what traceback lets through (it catches Exceptions)
        if not is_failure(failed, ()):
            raise
        return "".join(["Traceback (most recent call last):\n", *_traceback.format_tb(tb), f"{type(exc).__name__}: {exception_text(exc)}\n"])
