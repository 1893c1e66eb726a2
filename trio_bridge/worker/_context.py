"""The context a tool receives when it declares a parameter annotated ``SessionContext``."""

from __future__ import annotations

import threading
import time

__all__ = ["SessionContext"]


class SessionContext:
    """Per-call context handed to a tool.

    Attributes:
        session_id: the session the call belongs to (``""`` outside a session).
        call_id: the host's id for this call.
        deadline: ``time.monotonic()`` value by which the caller wants the result, or ``None``.

    Sync tools cannot be interrupted from outside their thread: a long-running one should check
    :attr:`cancelled` now and then and return early. Async tools are cancelled for real, and
    generators are closed, so they need no such check.
    """

    __slots__ = ("_cancelled", "call_id", "deadline", "session_id")

    def __init__(self, session_id: str, call_id: str, deadline: float | None) -> None:
        self.session_id = session_id
        self.call_id = call_id
        self.deadline = deadline
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call (or its deadline passed)."""
        return self._cancelled.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block a sync tool's thread up to ``timeout`` seconds until the call is cancelled.

        Returns:
            True if the call was cancelled. Useful as an interruptible ``time.sleep``.
        """
        return self._cancelled.wait(timeout)

    def time_remaining(self) -> float | None:
        """Seconds left until :attr:`deadline` (may be negative), or ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _cancel(self) -> None:
        self._cancelled.set()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<SessionContext session={self.session_id!r} call={self.call_id!r} {state}>"
