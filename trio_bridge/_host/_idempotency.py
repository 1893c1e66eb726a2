"""Idempotent calls: ``Pool.execute(..., idempotency_key=KEY)`` runs the call at most once to
completion per key, and answers later calls with the same key from the record.

A call claims its key in the state backend (a lease of :data:`LEASE` seconds, or three of the
backend's ``command_timeout`` if longer, renewed a third of it after the last renewal while the
call runs; a failed or slow renewal is retried soon), runs, and then records its result, or
the error if the tool raised (``ToolError``, not ``internal``). Any other end (the worker
crashed, the call was cancelled or timed out, the pool refused it, trio-bridge failed) releases
the key with no record, so a retry runs the call again: crashes make it at-least-once. A caller
that finds the key held waits for its holder (within its own cancel scope; it is not one of the
dispatcher's queued calls, so ``max_queue`` does not count it), then answers from the record,
or claims the key itself if the holder released it (or stopped renewing: its host died).
Records live ``idempotency_ttl`` seconds (the backend's).

The key's fingerprint is the SHA-256 of the tool, the session id and the arguments in a
canonical encoding (dict keys sorted at every level; numpy arrays by dtype, shape and bytes);
the same key with another fingerprint is an :class:`IdempotencyConflictError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from trio_bridge._core.failures import is_failure
from trio_bridge._errors import (
    IdempotencyConflictError,
    InvalidArgumentError,
    QuotaExceededError,
    ToolError,
    TrioBridgeError,
)
from trio_bridge._host._leases import keep_renewed
from trio_bridge._host._metrics import Metrics, Outcome
from trio_bridge._state.backend import StateBackend
from trio_bridge._wire.codec import decode, encode, short_repr
from trio_bridge._wire.errors import bounded, error_info, exception_from
from trio_bridge._wire.generated.trio_bridge.v1 import ErrorInfo, Payload

_logger = logging.getLogger("trio_bridge")

LEASE = 10.0  # seconds a claim lasts unless its holder renews it (every third of it)
_LEASE_PER_TIMEOUT = 3  # a lease is at least this many of the backend's command timeouts
MAX_KEY_LENGTH = 200
_POLL = (0.01, 0.2)  # seconds between looks at a key another host holds: first, longest

# A record's first byte says what follows.
_RESULT, _ERROR, _TOO_LARGE = b"r", b"e", b"x"


class IdempotentCalls:
    """Runs calls that carry an idempotency key through the state backend's claims and records
    (see the module docstring); counts the calls it answers itself in ``metrics``.

    Args:
        check_open: raises ``PoolClosedError`` once the pool closes (checked before claiming).
        lease: seconds a claim lasts unless renewed; at least 3 times the backend's
            ``command_timeout`` where it has one, so that a renewal may fail and be retried
            before the claim lapses.
    """

    def __init__(self, state: StateBackend, metrics: Metrics, *, check_open: Callable[[], None], lease: float = LEASE) -> None:
        self._state = state
        self._metrics = metrics
        self._check_open = check_open
        self._shortest_lease = lease

    @property
    def lease(self) -> float:
        """Seconds a claim lasts unless its holder renews it."""
        timeout = self._state.command_timeout
        return self._shortest_lease if timeout is None else max(self._shortest_lease, _LEASE_PER_TIMEOUT * timeout)

    async def execute(
        self, key: Any, tool: str, arguments: dict[str, Any] | None, session_id: str, run: Callable[[], Awaitable[Any]],
    ) -> Any:
        """``await run()`` (the call of ``tool``) at most once to completion for ``key``, or
        answer from its record; the errors of ``Pool.execute``, and:

        Raises:
            InvalidArgumentError: ``key`` is not a str of 1-200 characters; nothing ran.
            PoolClosedError: the pool is closed; nothing ran.
            IdempotencyConflictError: ``key`` was used for another tool, arguments or session.
            QuotaExceededError: the first call's result was over the backend's ``max_value_bytes``,
                so it was not recorded; or the backend holds as many running claims as it may.
        """
        waiting = replayed = False
        try:
            self._check_open()
            check_key(key)
            fingerprint = _fingerprint(tool, arguments, session_id)
            poll = _POLL[0]
            while True:
                claim = await self._state.claim_call(key, fingerprint, self.lease)
                if claim.state == "claimed":
                    break
                if claim.state == "conflict":
                    raise _conflict(key, claim.fingerprint, fingerprint)
                if claim.state == "done":
                    replayed = True
                    return self._replay(key, tool, claim.record)
                waiting = True
                await self._state.wait_call(key, poll)
                poll = min(poll * 2, _POLL[1])
        except BaseException as exc:
            cancelled = isinstance(exc, (trio.Cancelled, KeyboardInterrupt))
            if not replayed:  # a replay is counted as one
                self._metrics.record(Outcome.CANCELLED_QUEUED if cancelled and waiting else Outcome.REFUSED, tool=tool)
            raise
        return await self._run(key, claim.token, run)

    async def _run(self, key: str, token: str, run: Callable[[], Awaitable[Any]]) -> Any:
        failure: BaseException | None = None
        # The renewals run in a nursery of the call's own, so they end with it (and need nothing
        # of the pool's); the call's exception is taken out of the nursery so that it leaves as
        # itself, not in a group.
        async with trio.open_nursery() as renewals:
            renewals.start_soon(keep_renewed, partial(self._state.renew_call, key, token, self.lease), self.lease)
            try:
                result = await run()
                record = _RESULT + bytes(encode(result, path="result", plane=None))
            except BaseException as exc:
                failure = exc
            finally:
                renewals.cancel_scope.cancel()
        if failure is not None:
            try:
                if isinstance(failure, ToolError) and not failure.internal:  # the tool's own error: recorded
                    await self._finish(key, token, _ERROR + bytes(bounded(error_info(failure))))  # bounded: a trailer's size
                else:  # it did not finish (or trio-bridge failed): a retry runs it again
                    with trio.CancelScope(shield=True), contextlib.suppress(TrioBridgeError):  # else its lease lapses
                        await self._state.release_call(key, token)
                raise failure
            finally:
                del failure  # no cycle through this frame
        limit = self._state.max_value_bytes
        if limit is not None and len(record) > limit:
            record = _TOO_LARGE + str(len(record)).encode()
        await self._finish(key, token, record)
        return result

    async def _finish(self, key: str, token: str, record: bytes) -> None:
        with trio.CancelScope(shield=True):
            try:
                if not await self._state.finish_call(key, token, record):
                    _logger.warning("idempotent call %r finished after its claim lapsed (lease %g s): not recorded", key, self.lease)
            except TrioBridgeError as exc:  # the caller has its answer; the claim lapses with its lease
                _logger.warning("idempotent call %r: its outcome could not be recorded: %s", key, exc)

    def _replay(self, key: str, tool: str, record: bytes) -> Any:
        self._metrics.record(Outcome.REPLAYED, tool=tool)
        kind, data = record[:1], record[1:]
        if kind == _ERROR:
            raise exception_from(ErrorInfo.parse(data), tool)
        if kind == _TOO_LARGE:
            raise QuotaExceededError(
                f"the call with idempotency key {key!r} returned a result of {int(data):,} bytes, over the state "
                f"backend's max_value_bytes ({self._state.max_value_bytes:,}): it was returned to the first caller "
                "and not recorded; use another key to run the call again"
            )
        return decode(Payload.parse(data), plane=None)


def check_key(key: Any) -> str:
    """``key``, a str of 1-200 characters.

    Raises:
        InvalidArgumentError: it is not one.
    """
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidArgumentError(f"idempotency_key must be a str of 1-{MAX_KEY_LENGTH} characters, not {short_repr(key)}")
    return key


def _fingerprint(tool: str, arguments: dict[str, Any] | None, session_id: str) -> str:
    """The call's fingerprint: its tool and session as they are (for the conflict's message),
    and the SHA-256 of all three with the canonical encoding of its arguments."""
    arguments = {} if arguments is None else arguments
    try:
        canonical = _canonical(arguments)
    except BaseException as exc:  # a value's own methods raised, or it nests too deeply:
        if not is_failure(exc, ()):
            raise
        canonical = arguments  # the codec says what is wrong with it, as in a call without a key
    payload = encode(canonical, path="arguments", plane=None)
    digest = hashlib.sha256()
    for part in (tool.encode("utf-8", "surrogatepass"), session_id.encode(), payload.json, *payload.blobs):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return json.dumps([digest.hexdigest(), tool, session_id])


def _canonical(value: Any) -> Any:
    """``value`` with every dict's keys sorted (the codec keeps their order); a non-str key is
    left for the codec to refuse."""
    if isinstance(value, dict):
        items = list(dict(value).items())  # (as the codec reads a subclass)
        if all(isinstance(k, str) for k, _ in items):
            items.sort(key=lambda item: item[0])
        return {k: _canonical(v) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _conflict(key: str, stored: str, given: str) -> IdempotencyConflictError:
    _, tool_was, session_was = json.loads(stored)
    _, tool, session = json.loads(given)
    if tool_was != tool:
        what = f"tool {short_repr(tool_was)}, not {short_repr(tool)}"
    elif session_was != session:
        what = f"{f'session {session_was!r}' if session_was else 'no session'}, not {f'session {session!r}' if session else 'none'}"
    else:
        what = "other arguments"
    return IdempotencyConflictError(
        key, f"idempotency key {key!r} was used for a call with {what}; nothing ran: use another key for another call",
    )
