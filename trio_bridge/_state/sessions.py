"""Sessions: ids, TTLs, metadata and quotas (pure, synchronous; the caller passes the time)."""

from __future__ import annotations

import heapq
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trio_bridge._errors import (
    InvalidArgumentError,
    QuotaExceededError,
    SessionExistsError,
    SessionNotFoundError,
)
from trio_bridge._state.variables import VariableStore, metadata_copy
from trio_bridge._util import public_module
from trio_bridge._wire.codec import short_repr as _r

# A session id: 1-128 ASCII letters, digits, '_', '.', ':' or '-' (used with fullmatch).
_SESSION_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


@public_module
@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session: ``Session.info()`` on the host, ``ctx.session_info()`` in a tool.

    Attributes:
        id: the session id.
        created_at, last_used: when it was made and last used, on the host's Trio clock
            (seconds); ``None`` in a worker, whose clock is not the host's.
        ttl: seconds without use before it expires, or ``None`` for never.
        metadata: what it was opened with.
        variable_count: how many variables it has.
        state_version: counts the session's changes; a tool's cache reflects at least the
            version there was when its call started.
    """

    id: str
    created_at: float | None
    last_used: float | None
    ttl: float | None
    metadata: Mapping[str, Any]
    variable_count: int
    state_version: int


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
        return isinstance(session_id, str) and session_id in self._sessions

    def records(self) -> list[SessionRecord]:
        """Every session now (a copy of the list: safe to read from another thread)."""
        return list(self._sessions.values())

    def create(self, session_id: str | None, *, ttl: float | None, metadata: dict[str, Any] | None, now: float) -> SessionRecord:
        """Create a session (a random id when ``session_id`` is None).

        Args:
            session_id: 1-128 ASCII letters, digits, ``_ . : -``; or None for a random id.
            ttl: seconds without use before it expires: a positive finite number (int or float,
                not bool), or None for never.
            metadata: None or a dict with str keys whose values the codec can encode; stored in
                its wire form (a deep copy).

        Raises:
            InvalidArgumentError: the id, ``ttl`` or ``metadata`` is malformed (the message says
                which); checked first, so bad input is refused even when the id is taken.
            SessionExistsError: (an InvalidArgumentError) a session with that id exists.
            QuotaExceededError: ``max_sessions`` sessions exist, or the metadata is over
                ``max_value_bytes`` encoded.
        """
        if session_id is None:
            session_id = "s_" + secrets.token_hex(8)
        elif not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise InvalidArgumentError(
                f"invalid session id {_r(session_id)}: it must be 1-128 ASCII letters, digits, '_', '.', ':' or '-'"
            )
        session_id = str(session_id)
        ttl = _check_ttl(ttl)
        stored_metadata = self._check_metadata(metadata)
        if session_id in self._sessions:
            raise SessionExistsError(f"a session with id {session_id!r} already exists")
        if len(self._sessions) >= self.max_sessions:
            raise QuotaExceededError(f"{self.max_sessions} sessions already exist (max_sessions)")
        record = SessionRecord(
            id=session_id, created_at=now, last_used=now, ttl=ttl, metadata=stored_metadata,
            variables=VariableStore(
                max_variables=self.max_variables_per_session, max_value_bytes=self.max_value_bytes,
                history_limit=self.history_limit,
            ),
        )
        self._sessions[session_id] = record
        self._schedule(record)
        return record

    def get(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if record is None:
            raise SessionNotFoundError(f"no session {_r(session_id)} (never created, cleaned up, or expired)")
        return record

    def touch(self, session_id: str, now: float) -> SessionRecord:
        """Mark the session used now, pushing its expiry back by its TTL."""
        record = self.get(session_id)
        record.last_used = now
        self._schedule(record)
        return record

    def remove(self, session_id: str) -> SessionRecord | None:
        """Forget a session; an unknown or already removed id is not an error."""
        return self._sessions.pop(session_id, None) if isinstance(session_id, str) else None

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

    def _check_metadata(self, metadata: Any) -> dict[str, Any]:
        return metadata_copy(metadata, "session metadata", self.max_value_bytes, InvalidArgumentError)

    def _schedule(self, record: SessionRecord) -> None:
        record.expiry_token += 1
        if record.expires_at is not None:
            heapq.heappush(self._expiry_heap, (record.expires_at, record.expiry_token, record.id))


def _check_ttl(ttl: Any) -> float | None:
    """``ttl`` as a float, or InvalidArgumentError: None, or a positive finite int/float (not bool)."""
    if ttl is None:
        return None
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool):
        raise InvalidArgumentError(f"ttl must be a positive number of seconds or None, not {type(ttl).__name__} {_r(ttl)}")
    try:
        seconds = float(ttl)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InvalidArgumentError(f"ttl must be a positive finite number of seconds or None, not {_r(ttl)}")
    return seconds
