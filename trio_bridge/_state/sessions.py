"""Sessions: ids, TTLs, metadata and quotas (pure, synchronous; the caller passes the time)."""

from __future__ import annotations

import heapq
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from trio_bridge._errors import InvalidArgumentError, QuotaExceededError, SessionNotFoundError
from trio_bridge._state.variables import VariableStore

_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


@dataclass
class SessionRecord:
    """One session. ``state_version`` counts the changes to its variables: workers compare it
    with their cache's version to stay coherent without TTLs."""

    id: str
    created_at: float
    last_used: float
    ttl: float | None
    metadata: dict[str, Any]
    variables: VariableStore
    state_version: int = 0
    expiry_token: int = field(default=0, repr=False)

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl is None else self.last_used + self.ttl


class SessionStore:
    """All sessions of a pool (or of a backend shared by several hosts).

    Args:
        max_sessions: how many sessions may exist at once.
        max_variables_per_session, max_value_bytes, history_limit: passed to each
            session's :class:`VariableStore`.
    """

    def __init__(
        self,
        *,
        max_sessions: int = 10_000,
        max_variables_per_session: int = 1000,
        max_value_bytes: int = 64 * 2**20,
        history_limit: int = 50,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_variables_per_session = max_variables_per_session
        self.max_value_bytes = max_value_bytes
        self.history_limit = history_limit
        self._sessions: dict[str, SessionRecord] = {}
        self._expiry_heap: list[tuple[float, int, str]] = []  # (expires_at, token, id); stale entries skipped

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def create(self, session_id: str | None, *, ttl: float | None, metadata: dict[str, Any] | None, now: float) -> SessionRecord:
        """Create a session (a random id when ``session_id`` is None).

        Raises:
            QuotaExceededError: ``max_sessions`` sessions exist.
            InvalidArgumentError: the id is malformed or taken, or ``ttl`` is not positive.
        """
        if session_id is None:
            session_id = "s_" + secrets.token_hex(8)
        elif not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise InvalidArgumentError(f"invalid session id {session_id!r}: 1-128 of letters, digits and _ . : -")
        if session_id in self._sessions:
            raise InvalidArgumentError(f"a session with id {session_id!r} already exists")
        if ttl is not None and not ttl > 0:
            raise InvalidArgumentError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
        if len(self._sessions) >= self.max_sessions:
            raise QuotaExceededError(f"{self.max_sessions} sessions already exist (max_sessions)")
        record = SessionRecord(
            id=session_id, created_at=now, last_used=now, ttl=ttl, metadata=dict(metadata or {}),
            variables=VariableStore(
                max_variables=self.max_variables_per_session, max_value_bytes=self.max_value_bytes,
                history_limit=self.history_limit,
            ),
        )
        self._sessions[session_id] = record
        self._schedule(record)
        return record

    def get(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id)
        if record is None:
            raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
        return record

    def touch(self, session_id: str, now: float) -> SessionRecord:
        """Mark the session used now, pushing its expiry back by its TTL."""
        record = self.get(session_id)
        record.last_used = now
        self._schedule(record)
        return record

    def remove(self, session_id: str) -> SessionRecord | None:
        """Forget a session; an unknown or already removed id is not an error."""
        return self._sessions.pop(session_id, None)

    def pop_expired(self, now: float) -> list[SessionRecord]:
        """Remove and return the sessions whose TTL has run out by ``now``."""
        expired = []
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            _, token, session_id = heapq.heappop(self._expiry_heap)
            record = self._sessions.get(session_id)
            if record is not None and record.expiry_token == token:
                del self._sessions[session_id]
                expired.append(record)
        return expired

    def next_expiry(self) -> float | None:
        """When the next session may expire (stale heap entries may make it early, never late)."""
        return self._expiry_heap[0][0] if self._expiry_heap else None

    def _schedule(self, record: SessionRecord) -> None:
        record.expiry_token += 1
        if record.expires_at is not None:
            heapq.heappush(self._expiry_heap, (record.expires_at, record.expiry_token, record.id))
