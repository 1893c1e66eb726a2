"""The one error hierarchy of trio-bridge, rooted at :class:`TrioBridgeError`.

Errors are grouped by what the caller can do about them (httpcore-style):

* the pool refused the call: :class:`PoolSaturatedError` (retry later), :class:`PoolClosedError`;
* the call was wrong: :class:`ToolNotFoundError`, :class:`InvalidArgumentError`
  (:class:`NotAllowedError`: outside an allowlist), :class:`EncodeError` (fix the call);
* the tool ran and failed: :class:`ToolError` (remote type, message and traceback);
* an idempotency key was used for another call: :class:`IdempotencyConflictError`;
* a worker went away: :class:`WorkerStartError`, :class:`WorkerCrashedError`.

This module is import-light: worker processes import it too.
"""

from __future__ import annotations

import signal as _signal


class TrioBridgeError(Exception):
    """Base class of every error trio-bridge raises on purpose."""


class PoolClosedError(TrioBridgeError):
    """The pool is shutting down or closed; it accepts no new calls."""


class PoolInternalError(TrioBridgeError):
    """A background task of the pool failed unexpectedly: a bug in trio-bridge (please report it).

    Its ``__cause__`` is the exception group with every failure.
    """


class PoolSaturatedError(TrioBridgeError):
    """Every worker is busy and the wait queue already holds ``max_queue`` calls.

    Raised at once, never after a wait: back off, or open the pool with a larger ``max_queue``
    or ``size``.
    """


class ToolNotFoundError(TrioBridgeError):
    """The adapter has no tool of that name.

    Attributes:
        tool: the name asked for.
        available: the names of the tools that do exist, sorted.
    """

    def __init__(self, tool: str, available: list[str] | tuple[str, ...]) -> None:
        self.tool: str = tool
        self.available: tuple[str, ...] = tuple(sorted(available))
        super().__init__(
            f"no tool named {tool!r}; available tools: {', '.join(self.available) or '(none)'}"
        )


class InvalidArgumentError(TrioBridgeError):
    """The arguments do not fit the tool's parameters (missing, unknown or mistyped).

    Raised before the tool runs, so it had no side effects.
    """


class SessionExistsError(InvalidArgumentError):
    """A session with that id already exists (``create_session`` with a taken id).

    A subclass of :class:`InvalidArgumentError` (so old ``except`` clauses still catch it), but
    distinct from a malformed id, ttl or metadata, which raise a plain ``InvalidArgumentError``.
    """


class NotAllowedError(InvalidArgumentError):
    """The ``PythonAdapter``'s allowlist refused what a call reaches: a module, class or function
    outside the allowed module trees (``adapter_options={"allow": [...]}``), met on the way to the
    target, as the target, as a stored argument, or as the result.

    The message names the module that is not allowed and how to allow it. Raised before the
    target runs, except for a refused result: then the call ran, and its result was neither
    returned nor stored. A subclass of :class:`InvalidArgumentError` (fix the call, or the pool's
    allowlist).
    """


class EncodeError(TrioBridgeError, TypeError):
    """A value cannot travel on the wire; the message names the offending path,
    e.g. ``result["items"][3]: object of type Foo is not serializable``."""


class ToolError(TrioBridgeError):
    """The tool raised an exception in the worker (or the host, for host tools).

    Attributes:
        tool: the tool's name.
        remote_type: the remote exception's type name, e.g. ``"ValueError"``.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the remote traceback as text (may be empty).
        internal: ``True`` when it is not the tool's own exception but a fault of trio-bridge's
            in the worker (or an error this version cannot name), reported as the call's
            error; an idempotent call does not record it (a retry runs the tool again).
    """

    def __init__(
        self, tool: str, remote_type: str, remote_message: str, remote_traceback: str = "", *, internal: bool = False,
    ) -> None:
        self.tool: str = tool
        self.remote_type: str = remote_type
        self.remote_message: str = remote_message
        self.remote_traceback: str = remote_traceback
        self.internal: bool = internal
        super().__init__(f"tool {tool!r} raised {remote_type}: {remote_message}")

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


class DeadlineExceededError(TrioBridgeError):
    """The worker gave up on a call because the deadline sent with it passed.

    A host's own cancel scope normally fires first and raises :class:`trio.Cancelled`
    instead; this one is seen only when the worker's clock got there before the host's.
    """


class WorkerBusyError(TrioBridgeError):
    """The session's worker is busy and its affinity is ``"strict_fail_fast"``."""


class SessionNotFoundError(TrioBridgeError, KeyError):
    """No session has that id (it was never created, was cleaned up, or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateUnavailableError(TrioBridgeError):
    """The shared state backend (Redis) cannot be reached: the operation did not happen, or its
    outcome is unknown if the connection dropped mid-write (the message says which). The pool
    keeps running, and state calls work again once the backend is back."""


class QuotaExceededError(TrioBridgeError):
    """A configured limit would be exceeded: sessions, variables per session, or value bytes."""


class VariableError(TrioBridgeError):
    """Base class for refused variable operations. A refused write changes nothing."""


class VariableNotFoundError(VariableError, KeyError):
    """No variable has that name or id in the session."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidVariableError(VariableError, ValueError):
    """A value does not fit the variable's type or constraints, or the type, name or
    constraints given at registration are invalid."""


class VersionConflictError(VariableError):
    """``expected_version`` did not match the variable's current version."""


class DependencyCycleError(VariableError):
    """Adding the dependency would make the dependency graph cyclic."""


class VariableLockedError(VariableError):
    """Another optimizer holds the variable's optimization lock."""


class IdempotencyConflictError(TrioBridgeError):
    """An idempotency key was used before for another call: another tool, other arguments, or
    another session (the message names the key and what differs). Nothing ran: use another key
    for another call.

    Attributes:
        key: the idempotency key.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key: str = key
        super().__init__(message)


class StoredObjectLostError(TrioBridgeError):
    """An object a session stored in a worker (``store_as``) went away with that worker."""


class WorkerError(TrioBridgeError):
    """Base class for a worker process that failed to start or died.

    Attributes:
        worker_id: the pool's id of the worker, e.g. ``"w3"``.
        pid: its process id, or ``None`` if it never started.
        exit_code: its exit status (negative: killed by a signal), or ``None`` if unknown.
        signal: the name of the signal that killed it (``"SIGKILL"``), or ``None``.
        stderr_tail: the last lines it wrote to stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        worker_id: str,
        pid: int | None = None,
        exit_code: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        self.worker_id: str = worker_id
        self.pid: int | None = pid
        self.exit_code: int | None = exit_code
        self.signal: str | None = _signal_name(exit_code)
        self.stderr_tail: str = stderr_tail
        details: list[str] = []
        if pid is not None:
            details.append(f"pid {pid}")
        if exit_code is not None:
            details.append(describe_exit(exit_code))
        text = f"worker {worker_id}: {message}"
        if details:
            text += f" ({', '.join(details)})"
        if stderr_tail.strip():
            text += "\n--- worker stderr (last lines) ---\n" + stderr_tail.rstrip()
        super().__init__(text)


class WorkerStartError(WorkerError):
    """A worker did not become ready: its adapter failed to import or its ``setup()`` raised,
    the process exited, or no ready line came within the pool's ``startup_timeout``."""


class WorkerCrashedError(WorkerError):
    """The worker serving this call died (or stopped answering) before the call finished.

    Only the calls that worker was serving fail; the pool starts a replacement.
    """


def describe_exit(exit_code: int) -> str:
    """``"killed by SIGKILL"`` or ``"exit code 3"``."""
    name = _signal_name(exit_code)
    return f"killed by {name}" if name else f"exit code {exit_code}"


def _signal_name(exit_code: int | None) -> str | None:
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return _signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"
