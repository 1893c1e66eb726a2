"""Idempotent calls' claims and records, as a state backend keeps them: what a claim says
(:class:`Claim`), and the in-memory keeper (:class:`MemoryCalls`) of :class:`MemoryBackend`.

A key goes through: free -> claimed (a lease, held by one caller's token, renewed while its call
runs) -> done (a record: an encoded result or error) or free again (released: the call did
not finish). A claim whose lease lapsed may be taken over by another caller. Every record
lives ``ttl`` seconds from its last write (claim, renewal or finish), then the key is free.
"""

from __future__ import annotations

import collections
import math
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import trio

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import short_repr

ClaimState = Literal["claimed", "running", "done", "conflict"]
DEFAULT_IDEMPOTENCY_TTL = 3600.0  # seconds a key's record lives


@dataclass(frozen=True)
class Claim:
    """What :meth:`StateBackend.claim_call` found or did.

    Attributes:
        state: ``"claimed"``: the caller holds the key now (``token``) and runs the call;
            ``"running"``: another caller holds it; ``"done"``: the call finished, ``record``
            is what it recorded; ``"conflict"``: the key was claimed with another
            ``fingerprint`` (the one given back here).
        fingerprint: the key's fingerprint (as it was first claimed).
        token: the holder's token (``"claimed"`` only): for renew, finish and release.
        record: the recorded bytes (``"done"`` only).
    """

    state: ClaimState
    fingerprint: str
    token: str = ""
    record: bytes = b""


def check_ttl(name: str, value: Any) -> float:
    """``value``, a positive finite number of seconds (``name`` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidArgumentError(f"{name} must be a positive number of seconds, not {short_repr(value)}")
    return float(value)


def new_token() -> str:
    return secrets.token_hex(8)


class _Entry:
    __slots__ = ("changed", "expires", "fingerprint", "leased_until", "record", "token")

    def __init__(self, fingerprint: str, token: str, leased_until: float, expires: float) -> None:
        self.fingerprint = fingerprint
        self.token = token  # "" once done
        self.leased_until = leased_until
        self.record: bytes | None = None
        self.expires = expires
        self.changed = trio.Event()  # set when it is finished, released or dropped


class MemoryCalls:
    """The claims and records of one process's idempotent calls, on the Trio clock (so
    ``trio.testing.MockClock`` drives leases and TTLs). The TTL is the same for every entry and
    every write moves its entry to the end, so insertion order is expiry order (but for a claim
    whose lease is longer than the TTL: it lives as long as its lease, and a lookup checks): expired
    entries are dropped from the front, O(1) amortized per operation."""

    def __init__(self, ttl: float = DEFAULT_IDEMPOTENCY_TTL) -> None:
        self.ttl: float = check_ttl("idempotency_ttl", ttl)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        now = self._prune()
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:  # behind a later-expiring one (a lease over the TTL)
            del self._entries[key]
            entry.changed.set()
            entry = None
        if entry is None:
            token = new_token()
            self._entries[key] = _Entry(fingerprint, token, now + lease, now + max(self.ttl, lease))
            return Claim("claimed", fingerprint, token)
        if entry.fingerprint != fingerprint:
            return Claim("conflict", entry.fingerprint)
        if entry.record is not None:
            return Claim("done", fingerprint, record=entry.record)
        if entry.leased_until <= now:  # its holder stopped renewing: take it over
            entry.token = new_token()
            self._touch(key, entry, now, lease)
            return Claim("claimed", fingerprint, entry.token)
        return Claim("running", fingerprint)

    def renew(self, key: str, token: str, lease: float) -> bool:
        now = self._prune()
        entry = self._held(key, token)
        if entry is None:
            return False
        self._touch(key, entry, now, lease)
        return True

    def finish(self, key: str, token: str, record: bytes) -> bool:
        now = self._prune()
        entry = self._held(key, token)
        if entry is None:
            return False
        entry.record, entry.token = record, ""
        self._touch(key, entry, now, 0.0)
        entry.changed.set()
        return True

    def release(self, key: str, token: str) -> bool:
        self._prune()
        entry = self._held(key, token)
        if entry is None:
            return False
        del self._entries[key]
        entry.changed.set()
        return True

    async def wait(self, key: str) -> None:
        """Until the key's holder finishes or releases it, or its lease lapses."""
        entry = self._entries.get(key)
        if entry is None or entry.record is not None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_at(entry.leased_until):
            await entry.changed.wait()

    def _held(self, key: str, token: str) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.token and entry.token == token else None

    def _touch(self, key: str, entry: _Entry, now: float, lease: float) -> None:
        entry.leased_until = now + lease
        entry.expires = now + max(self.ttl, lease)  # a held claim outlives a TTL shorter than its lease
        self._entries.move_to_end(key)

    def _prune(self) -> float:
        now = trio.current_time()
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires > now:
                break
            del entries[key]
            entry.changed.set()
        return now
