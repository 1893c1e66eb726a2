"""Idempotent calls' claims and records, as a state backend keeps them: what a claim says
(:class:`Claim`), and the in-memory keeper (:class:`MemoryCalls`) of :class:`MemoryBackend`.

A key goes through: free -> claimed (a lease, held by one caller's token, renewed while its call
runs) -> done (a record: an encoded result or error) or free again (released: the call did
not finish). A claim whose lease lapsed may be taken over by another caller. Every record
lives ``ttl`` seconds from its last write (claim, renewal or finish), then the key is free;
the memory backend also frees the oldest records first when it keeps ``max_records`` keys.
"""

from __future__ import annotations

import collections
import secrets
from dataclasses import dataclass
from typing import Literal

import trio

from trio_bridge._checks import positive_seconds, whole
from trio_bridge._errors import QuotaExceededError
from trio_bridge._util import public_module

ClaimState = Literal["claimed", "running", "done", "conflict"]
DEFAULT_IDEMPOTENCY_TTL = 3600.0  # seconds a key's record lives
DEFAULT_MAX_IDEMPOTENCY_RECORDS = 100_000  # keys (claims and records) the memory backend keeps


@public_module
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
    ``trio.testing.MockClock`` drives leases and TTLs), at most ``max_records`` keys in all.

    Claims and records are kept apart, each in the order of its last write; the TTL is the same
    for every entry, so that is expiry order (but for a claim whose lease is longer than the TTL:
    it lives as long as its lease, and a lookup checks): expired entries are dropped from the
    front, O(1) amortized per operation. A new claim when ``max_records`` keys are kept first
    drops the oldest record (its key is new again, as if it expired), else the least recently
    renewed claim if its lease lapsed; if every key is a running call's claim, it is refused."""

    def __init__(self, ttl: float = DEFAULT_IDEMPOTENCY_TTL, max_records: int = DEFAULT_MAX_IDEMPOTENCY_RECORDS) -> None:
        self.ttl: float = float(positive_seconds("idempotency_ttl", ttl))
        self.max_records: int = whole(1)("max_idempotency_records", max_records)
        self._claims: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # claimed, not finished
        self._records: collections.OrderedDict[str, _Entry] = collections.OrderedDict()  # finished

    def __len__(self) -> int:
        return len(self._claims) + len(self._records)

    def claim(self, key: str, fingerprint: str, lease: float) -> Claim:
        now = self._prune()
        entry = self._records.get(key)
        if entry is None:
            entry = self._claims.get(key)
            if entry is not None and entry.expires <= now:  # behind a later-expiring one (a lease over the TTL)
                del self._claims[key]
                entry.changed.set()
                entry = None
        if entry is None:
            self._make_room(now)
            token = new_token()
            self._claims[key] = _Entry(fingerprint, token, now + lease, now + max(self.ttl, lease))
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
        del self._claims[key]
        entry.record, entry.token = record, ""
        entry.leased_until, entry.expires = now, now + self.ttl
        self._records[key] = entry
        entry.changed.set()
        return True

    def release(self, key: str, token: str) -> bool:
        self._prune()
        entry = self._held(key, token)
        if entry is None:
            return False
        del self._claims[key]
        entry.changed.set()
        return True

    async def wait(self, key: str) -> None:
        """Until the key's holder finishes or releases it, or its lease lapses."""
        entry = self._claims.get(key)
        if entry is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_at(entry.leased_until):
            await entry.changed.wait()

    def _held(self, key: str, token: str) -> _Entry | None:
        entry = self._claims.get(key)
        return entry if entry is not None and entry.token == token else None

    def _touch(self, key: str, entry: _Entry, now: float, lease: float) -> None:
        entry.leased_until = now + lease
        entry.expires = now + max(self.ttl, lease)  # a held claim outlives a TTL shorter than its lease
        self._claims.move_to_end(key)

    def _make_room(self, now: float) -> None:
        """Room for one more key (see the class docstring).

        Raises:
            QuotaExceededError: every key kept is a running call's claim.
        """
        while len(self) >= self.max_records:
            if self._records:
                entries = self._records
            elif self._claims and next(iter(self._claims.values())).leased_until <= now:
                entries = self._claims
            else:
                raise QuotaExceededError(
                    f"{len(self):,} idempotent calls are running, as many as the state backend keeps "
                    f"(max_idempotency_records={self.max_records:,}): no new idempotency key can be claimed until "
                    "one finishes; try again later, or raise StateLimits.max_idempotency_records"
                )
            _, entry = entries.popitem(last=False)
            entry.changed.set()

    def _prune(self) -> float:
        now = trio.current_time()
        for entries in (self._claims, self._records):
            while entries:
                key, entry = next(iter(entries.items()))
                if entry.expires > now:
                    break
                del entries[key]
                entry.changed.set()
        return now
