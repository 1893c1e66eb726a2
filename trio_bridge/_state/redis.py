"""The Redis state backend: sessions and variables shared by every host that uses the same Redis.

Keys (``P`` is the prefix, ``"trio-bridge"`` by default)::

    P:sessions        set: every session's id (the max_sessions quota)
    P:expiry          sorted set: session id -> when it expires (epoch seconds), sessions with a TTL
    P:ended           stream: ids of sessions that ended (every host reads it: on_session_end)
    P:s:ID:meta       hash: created_at, last_used, ttl, metadata, state_version, next_id, revision
    P:s:ID:vars       hash: variable name -> its record (value, history, lock lease...), encoded
    P:s:ID:log        stream: every change of the session's variables, in order (watches read it)
    P:call:KEY        hash: an idempotent call's fingerprint f, holder's token t and lease end u
                      (ms, Redis's clock), or its record r once done; expires idempotency_ttl
                      seconds after its last write

Atomicity comes from Redis: every write is optimistic -- read the session in one MULTI, apply
the operation with the same pure :class:`VariableStore` the memory backend uses (so the rules,
limits and errors are the same), then write the changed records, the new ``state_version`` and
the log entries with one Lua script that first checks the session's ``revision`` is still the
one read (a compare-and-set; every write bumps it). If another host wrote in between, the
operation runs again on fresh data. Creating a session uses WATCH/MULTI/EXEC; small Lua scripts
touch a session (its TTL restarts) and end one (only one host can win). No lock lives in one host's memory; an optimization lock is a lease
(``lock_lease`` seconds, renewed by its holder) that lapses if its holder dies.

Watches read the session's log with ``XREAD BLOCK``: Redis Streams rather than pub/sub, because a
stream is resumable -- a watcher keeps the id of the last entry it read, and after a dropped
connection it reads on from there, so nothing is lost -- and because the initial values and the
stream position are read in one MULTI, no change can fall between them. A watcher more than
``buffer_size`` entries behind reads the current values instead (the skipped count comes from
the versions), so a trimmed log (``log_length``) can never hide a change.

Times are wall-clock seconds (hosts' clocks should agree to well under a TTL). Redis going away
raises :class:`StateUnavailableError` on each call (every command has a timeout: nothing hangs),
and calls work again once it is back.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, final

import redis
import redis.asyncio
import redis.exceptions
import trio

from trio_bridge._aio import Boundary, TransportError, open_boundary
from trio_bridge._checks import positive_seconds, whole
from trio_bridge._errors import InvalidArgumentError, SessionNotFoundError, StateUnavailableError
from trio_bridge._state.backend import SessionInfo, StateBackend, Watcher
from trio_bridge._state.calls import DEFAULT_IDEMPOTENCY_TTL, Claim, new_token
from trio_bridge._state.sessions import SessionStore
from trio_bridge._state.variables import HistoryEntry, UpdateKind, Variable, VariableStore, VariableUpdate
from trio_bridge._util import public_module
from trio_bridge._wire import codec
from trio_bridge._wire.contract import DEFAULT_WATCH_BUFFER
from trio_bridge._wire.generated.trio_bridge import v1 as pb

__all__ = ["RedisBackend"]

T = TypeVar("T")
_Client = Any  # a redis.Redis or redis.asyncio.Redis (redis-py's own annotations are looser than ours)
# What makes a call fail with StateUnavailableError (redis-py's errors, and the boundary's).
_FAILURES = (redis.exceptions.RedisError, TransportError, OSError)

def _restart_ttl(meta: str, expiry: str, others: tuple[str, ...], now: str, session_id: str, margin: str) -> str:
    """Lua: push the session's expiry back by its TTL (in the expiry set, and Redis's own key
    expiry as a safety net), if it has one. Arguments are Lua expressions."""
    pexpire = "".join(f"  redis.call('PEXPIRE', {key}, ms)\n" for key in (meta, *others))
    return f"""local ttl = redis.call('HGET', {meta}, 'ttl')
if ttl and ttl ~= '' then
  local seconds = tonumber(ttl)
  redis.call('ZADD', {expiry}, tonumber({now}) + seconds, {session_id})
  local ms = math.floor((seconds + tonumber({margin})) * 1000)
{pexpire}end
"""


# Touch: restart the session's TTL. KEYS: meta, expiry, vars, log; ARGV: now, id, key expiry margin.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_used', ARGV[1])
""" + _restart_ttl("KEYS[1]", "KEYS[2]", ("KEYS[3]", "KEYS[4]"), "ARGV[1]", "ARGV[2]", "ARGV[3]") + """return 1
"""

# End a session: only the caller that finds it wins. KEYS: meta, vars, log, sessions, expiry,
# ended; ARGV: id, only-if-expired-by (epoch seconds, '' for now), log grace (ms).
_END = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' then
  local at = redis.call('ZSCORE', KEYS[5], ARGV[1])
  if (not at) or tonumber(at) > tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', 'end')
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[3]))
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 10000, '*', 'id', ARGV[1])
return 1
"""

# Write a session's changes if nobody wrote since they were computed (compare-and-set on the
# session's revision), touching it too. KEYS: meta, vars, log, expiry; ARGV: revision, now, id,
# key margin, state_version increment, next_id, log length, then counted lists: records to set
# (name, data), names to delete, log entries (7 values each). Returns the new state_version;
# -1: no such session; -2: another write came first.
_WRITE = """
local rev = redis.call('HGET', KEYS[1], 'revision')
if not rev then return -1 end
if rev ~= ARGV[1] then return -2 end
local i = 8
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do redis.call('HDEL', KEYS[2], ARGV[i]); i = i + 1 end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'k', ARGV[i], 'n', ARGV[i + 1], 'v', ARGV[i + 2],
             's', ARGV[i + 3], 't', ARGV[i + 4], 'o', ARGV[i + 5], 'w', ARGV[i + 6])
  i = i + 7
end
local version = redis.call('HINCRBY', KEYS[1], 'state_version', tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'revision', tonumber(rev) + 1, 'next_id', ARGV[6], 'last_used', ARGV[2])
""" + _restart_ttl("KEYS[1]", "KEYS[4]", ("KEYS[2]", "KEYS[3]"), "ARGV[2]", "ARGV[3]", "ARGV[4]") + """return version
"""

# Idempotent calls (P:call:KEY), on Redis's own clock (TIME), so hosts' clocks need not agree;
# a held claim's key lives at least as long as its lease.
# Claim: create, or take over a lapsed lease, or say who has it. KEYS: the hash; ARGV:
# fingerprint, token, lease (ms), ttl (ms). Returns {state, fingerprint, record}.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'f', 'u', 'r')
if h[1] and h[1] ~= ARGV[1] then return {'conflict', h[1], ''} end
if h[3] then return {'done', h[1], h[3]} end
if h[1] and tonumber(h[2]) > now then return {'running', h[1], ''} end
redis.call('HSET', KEYS[1], 'f', ARGV[1], 't', ARGV[2], 'u', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]), tonumber(ARGV[4])))
return {'claimed', ARGV[1], ''}
"""
# Renew (ARGV: token, lease ms, ttl ms), finish (ARGV: token, record, ttl ms), release (ARGV:
# token): only by the holder. Return 1, or 0 when the token no longer holds the key.
_RENEW = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'u', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(ARGV[3])))
return 1
"""
_FINISH = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 't', 'u')
redis.call('HSET', KEYS[1], 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_KEY_MARGIN = 60.0  # seconds Redis keeps an expired session's keys after its TTL if no host reaps it
_LOG_GRACE_MS = 60_000  # an ended session's log stays this long, so its watchers read the end
_REAP_INTERVAL = 1.0  # seconds between looks for expired sessions
_BLOCK_MS = 1000  # longest blocking read


_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_TOUCH, _WRITE, _CLAIM, _RENEW, _FINISH, _RELEASE)}


def _load_scripts(client: Any) -> None:
    for script in _SHA:
        client.script_load(script)


@dataclass(frozen=True)
class _Keys:
    meta: str
    vars: str
    log: str


@public_module
@final
class RedisBackend(StateBackend):
    """Sessions and variables in Redis, shared by every host (every pool) that uses the same
    server and ``prefix``: ``open_pool(..., state="redis://host:6379/0")`` or
    ``state=trio_bridge.RedisBackend(url)``.

    Every behaviour of the in-memory backend holds across hosts (types and constraints,
    versions and ``expected_version``, batches, history and rollback, dependencies,
    optimization locks, quotas, TTLs, watches); see the module docstring for how.

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS), as redis-py takes it.
        prefix: of every key it uses.
        max_sessions: how many sessions may exist at once (hosts sharing a Redis should use
            the same quotas).
        max_variables_per_session: how many variables a session may hold.
        max_value_bytes: the largest encoded value accepted, in bytes.
        history_limit: how many past values each variable keeps (oldest dropped first).
        lock_lease: seconds an optimization lock lasts unless its holder renews it (workers
            renew theirs while their ``optimizing`` block runs); a holder that died loses it.
        log_length: changes kept per session for watchers (trimmed approximately).
        timeout: seconds any one Redis command may take before the call fails.
        idempotency_ttl: seconds an idempotent call's record (``P:call:KEY``) lives after its
            last write (default 3600).

    Raises (from its methods, on top of the memory backend's):
        StateUnavailableError: Redis cannot be reached, or did not answer within ``timeout``.
    """

    def __init__(
        self, url: str, *, prefix: str = "trio-bridge", max_sessions: int = 10_000, max_variables_per_session: int = 1000,
        max_value_bytes: int = 64 * 2**20, history_limit: int = 50, lock_lease: float = 30.0, log_length: int = 10_000,
        timeout: float = 5.0, idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgumentError(f"a Redis URL starts with redis://, rediss:// or unix://, not {codec.short_repr(url)}")
        for name, value in (("lock_lease", lock_lease), ("timeout", timeout), ("idempotency_ttl", idempotency_ttl)):
            positive_seconds(name, value)
        whole(2)("log_length", log_length)
        self.url: str = url
        self.prefix: str = prefix
        self.lock_lease: float | None = float(lock_lease)
        self.log_length: int = log_length
        self.timeout: float = float(timeout)
        self.idempotency_ttl: float = float(idempotency_ttl)
        self.max_value_bytes: int | None = max_value_bytes
        # The pure store checks ids, TTLs and metadata exactly as the memory backend does.
        self._limits = SessionStore(
            max_sessions=max_sessions, max_variables_per_session=max_variables_per_session,
            max_value_bytes=max_value_bytes, history_limit=history_limit,
        )
        self.on_session_end: list[Callable[[str], None]] = []
        self._boundary: Boundary | None = None
        self._redis: _Client | None = None  # redis-py's asyncio client: blocking reads
        self._sync: _Client | None = None  # its blocking client, used from threads: everything else
        self._running = 0
        self._started = trio.Event()
        self._ended_here: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    # ---- keys and plumbing ----
    def _keys(self, session_id: str) -> _Keys:
        base = f"{self.prefix}:s:{session_id}"
        return _Keys(f"{base}:meta", f"{base}:vars", f"{base}:log")

    @property
    def _sessions_key(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def _expiry_key(self) -> str:
        return f"{self.prefix}:expiry"

    @property
    def _ended_key(self) -> str:
        return f"{self.prefix}:ended"

    async def _call(self, function: Callable[[_Client], T]) -> T:
        """Run ``function(client)`` -- redis-py's blocking client -- in a worker thread (a
        thread hop costs ~0.15 ms here, a round trip through the asyncio boundary costs more:
        measured in the module docstring); Redis errors become ours. A cancelled caller stops waiting at
        once; the command itself is bounded by ``timeout``."""
        await trio.lowlevel.checkpoint_if_cancelled()
        client = self._sync
        if client is None:
            raise StateUnavailableError(f"{self!r} is not running: start RedisBackend.run() first (open_pool does)")

        def call() -> T:
            try:
                return function(client)
            except redis.exceptions.NoScriptError:  # Redis restarted without its script cache
                _load_scripts(client)
                return function(client)

        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def _wait(self, function: Callable[[_Client], Awaitable[T]]) -> T:
        """Run ``function(client)`` on redis-py's asyncio client, on the asyncio boundary (``trio_bridge._aio``):
        for blocking reads (``XREAD BLOCK``), which would hold a thread each."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._boundary is None or self._redis is None:
            raise StateUnavailableError(f"{self!r} is not running: start RedisBackend.run() first (open_pool does)")
        try:
            return await self._boundary.run(_on_the_loop(function, self._redis))
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> StateUnavailableError:
        if isinstance(exc, redis.exceptions.RedisError) and not isinstance(
            exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        ):
            return StateUnavailableError(f"the state backend at {self.url} refused the operation: {exc}")
        return StateUnavailableError(f"the state backend at {self.url} is unavailable: {exc}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then reap expired sessions and run ``on_session_end`` for every session that
        ends on any host, until cancelled. Another ``run()`` of the same backend (a second pool
        in this process) shares the first one's connection."""
        if self._running:
            self._running += 1
            try:
                await self._started.wait()
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._running -= 1
            return
        self._running = 1
        try:
            async with open_boundary() as boundary:
                options = {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout, "health_check_interval": 30}
                # made in the loop's thread: redis-py's asyncio objects are its loop's
                client = await boundary.run_sync(lambda: redis.asyncio.Redis.from_url(self.url, **options))
                self._boundary, self._redis = boundary, client
                self._sync = redis.Redis.from_url(self.url, **options)
                self._end_script = self._sync.register_script(_END)
                try:
                    await self._call(_load_scripts)
                    last_ended = await self._last_id(self._ended_key)
                    self._started.set()
                    task_status.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._reap_expired)
                        await self._follow_ended(last_ended)
                finally:
                    sync, self._sync = self._sync, None
                    self._boundary = self._redis = None
                    self._started = trio.Event()
                    sync.close()
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await boundary.run(client.aclose())
        finally:
            self._running = 0

    async def _last_id(self, stream: str) -> str:
        def read(r: _Client) -> str:
            last = r.xrevrange(stream, "+", "-", count=1)
            return last[0][0].decode() if last else "0-0"

        return await self._call(read)

    async def _reap_expired(self) -> None:
        while True:
            with contextlib.suppress(StateUnavailableError):  # Redis away: try again later
                now = time.time()
                expired = await self._call(lambda r, now=now: r.zrangebyscore(self._expiry_key, "-inf", now, start=0, num=100))
                for raw in expired:
                    await self._end(raw.decode(), only_if_expired_by=now)
            await trio.sleep(_REAP_INTERVAL)

    async def _follow_ended(self, last: str) -> None:
        """Run on_session_end for each session that ended, on any host (the ``P:ended`` stream)."""
        while True:
            try:
                entries = await self._wait(lambda r, last=last: r.xread({self._ended_key: last}, block=_BLOCK_MS, count=100))
            except StateUnavailableError:
                await trio.sleep(_REAP_INTERVAL)
                continue
            for _, items in entries:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    session_id = fields[b"id"].decode()
                    if self._ended_here.pop(session_id, 0) is None:
                        continue  # it ended here: its callbacks ran already
                    self._run_callbacks(session_id)

    def _run_callbacks(self, session_id: str) -> None:
        for callback in self.on_session_end:
            callback(session_id)

    async def _end(self, session_id: str, *, only_if_expired_by: float | None = None) -> bool:
        keys = self._keys(session_id)
        # Marked before the script runs: the P:ended reader may see the entry before we return.
        self._ended_here[session_id] = None
        while len(self._ended_here) > 10_000:
            self._ended_here.popitem(last=False)
        ended = False
        try:
            ended = bool(await self._call(lambda r: self._end_script(
                keys=[keys.meta, keys.vars, keys.log, self._sessions_key, self._expiry_key, self._ended_key],
                args=[session_id, "" if only_if_expired_by is None else repr(only_if_expired_by), _LOG_GRACE_MS],
            )))
        finally:
            if not ended:
                self._ended_here.pop(session_id, None)
        if ended:
            self._run_callbacks(session_id)
        return ended

    # ---- sessions ----
    async def create_session(self, session_id: str | None, *, ttl: float | None, metadata: dict[str, Any] | None) -> SessionInfo:
        # The pure store checks the id, the TTL and the metadata (and makes a random id).
        record = SessionStore(max_value_bytes=self._limits.max_value_bytes).create(session_id, ttl=ttl, metadata=metadata, now=0.0)
        keys, now = self._keys(record.id), time.time()
        meta = {
            "created_at": repr(now), "last_used": repr(now), "ttl": "" if record.ttl is None else repr(record.ttl),
            "metadata": _pack(record.metadata), "state_version": 0, "next_id": 1, "revision": 0,
        }

        def create(r: _Client) -> None:
            from trio_bridge._errors import QuotaExceededError, SessionExistsError

            with r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._sessions_key, keys.meta)
                        if pipe.exists(keys.meta):
                            raise SessionExistsError(f"a session with id {record.id!r} already exists")
                        if pipe.scard(self._sessions_key) >= self._limits.max_sessions:
                            raise QuotaExceededError(f"{self._limits.max_sessions} sessions already exist (max_sessions)")
                        pipe.multi()
                        pipe.delete(keys.vars, keys.log)  # leftovers of an ended session of that id
                        pipe.hset(keys.meta, mapping=meta)
                        pipe.sadd(self._sessions_key, record.id)
                        if record.ttl is not None:
                            pipe.zadd(self._expiry_key, {record.id: now + record.ttl})
                            pipe.pexpire(keys.meta, int((record.ttl + _KEY_MARGIN) * 1000))
                        pipe.execute()
                        return
                    except redis.exceptions.WatchError:
                        continue

        await self._call(create)
        return SessionInfo(record.id, now, now, record.ttl, record.metadata, 0, 0)

    async def get_session(self, session_id: str) -> SessionInfo:
        keys = self._keys(self._check_id(session_id))

        def read(r: _Client) -> tuple[dict[bytes, bytes], int]:
            with r.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.meta)
                pipe.hlen(keys.vars)
                meta, count = pipe.execute()
            return meta, count

        meta, count = await self._call(read)
        return self._info(session_id, meta, count)

    async def touch_session(self, session_id: str) -> SessionInfo:
        meta, count = await self._touched(session_id, records=False)
        return self._info(session_id, meta, count)

    async def cleanup_session(self, session_id: str) -> bool:
        if not isinstance(session_id, str):
            return False
        return await self._end(session_id)

    def _check_id(self, session_id: Any) -> str:
        if not isinstance(session_id, str):
            raise SessionNotFoundError(f"no session {codec.short_repr(session_id)} (never created, cleaned up, or expired)")
        return session_id

    def _info(self, session_id: str, meta: dict[bytes, bytes], count: int) -> SessionInfo:
        if not meta:
            raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
        ttl = meta[b"ttl"].decode()
        return SessionInfo(
            session_id, float(meta[b"created_at"]), float(meta[b"last_used"]), float(ttl) if ttl else None,
            _unpack(meta[b"metadata"]), count, int(meta[b"state_version"]),
        )

    def _queue_touch(self, pipe: Any, session_id: str, keys: _Keys, now: float) -> None:
        pipe.evalsha(_SHA[_TOUCH], 4, keys.meta, self._expiry_key, keys.vars, keys.log, repr(now), session_id, _KEY_MARGIN)

    # ---- variables ----
    def _store(self, meta: dict[bytes, bytes], raw: dict[bytes, bytes]) -> VariableStore:
        return VariableStore.from_records(
            (_unpack(data) for data in raw.values()), next_id=int(meta[b"next_id"]),
            max_variables=self._limits.max_variables_per_session, max_value_bytes=self._limits.max_value_bytes,
            history_limit=self._limits.history_limit,
        )

    async def _read(self, session_id: str) -> tuple[VariableStore, int]:
        """The session's variables (its TTL restarts), and its state_version."""
        meta, raw = await self._touched(session_id, records=True)
        return self._store(meta, raw), int(meta[b"state_version"])

    async def _touched(self, session_id: str, *, records: bool) -> tuple[dict[bytes, bytes], Any]:
        """Touch the session (its TTL restarts) and read its meta and its variables' records
        (``records``) or their number, in one MULTI.

        Raises:
            SessionNotFoundError: no such session.
        """
        keys = self._keys(self._check_id(session_id))

        def read(r: _Client) -> tuple[dict[bytes, bytes], Any]:
            with r.pipeline(transaction=True) as pipe:
                self._queue_touch(pipe, session_id, keys, time.time())
                pipe.hgetall(keys.meta)
                (pipe.hgetall if records else pipe.hlen)(keys.vars)
                _, meta, variables = pipe.execute()
            return meta, variables

        meta, variables = await self._call(read)
        if not meta:
            raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
        return meta, variables

    async def _write(
        self, session_id: str, operation: Callable[[VariableStore], tuple[T, list[VariableUpdate], bool]],
    ) -> tuple[T, int]:
        """Apply ``operation(store) -> (result, updates, changed)`` atomically: read the session
        in one MULTI, apply the operation to the pure store, and write what changed with a Lua
        compare-and-set on the session's revision (another host's write in between: run again on
        fresh data). Two round trips. Returns the result and the state_version after it."""
        keys = self._keys(self._check_id(session_id))

        def write(r: _Client) -> tuple[T, int]:
            while True:
                with r.pipeline(transaction=True) as pipe:
                    pipe.hgetall(keys.meta)
                    pipe.hgetall(keys.vars)
                    meta, raw = pipe.execute()
                if not meta:
                    raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
                store = self._store(meta, raw)
                result, updates, changed = operation(store)  # raises: nothing is written
                after = {name.encode(): _pack(record) for name, record in store.records().items()}
                written = [item for name, data in after.items() if raw.get(name) != data for item in (name, data)]
                removed = [name for name in raw if name not in after]
                log = [value for update in updates for value in _update_fields(update)]
                version = r.evalsha(
                    _SHA[_WRITE], 4, keys.meta, keys.vars, keys.log, self._expiry_key,
                    meta.get(b"revision", b"0"), repr(time.time()), session_id, _KEY_MARGIN, 1 if changed else 0,
                    store.next_id, self.log_length, len(written) // 2, *written, len(removed), *removed,
                    len(updates), *log,
                )
                if version == -1:
                    raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
                if version != -2:
                    return result, int(version)

        return await self._call(write)

    async def register_variable(
        self, session_id: str, name: str, type_name: str, value: Any, *, constraints: dict[str, Any] | None,
        metadata: dict[str, Any] | None, source: str,
    ) -> tuple[Variable, int]:
        def register(store: VariableStore) -> tuple[Variable, list[VariableUpdate], bool]:
            v = store.register(name, type_name, value, constraints=constraints, metadata=metadata, source=source)
            return v, [VariableUpdate(v.name, None, v.value, 0, source, "change", v.created_at)], True

        return await self._write(session_id, register)

    async def get_variables(self, session_id: str, keys: list[str] | None) -> tuple[dict[str, Variable], int]:
        store, version = await self._read(session_id)
        if keys is None:
            return {v.name: v for v in store.list()}, version
        found = {}
        for key in keys:
            variable = store.get(key)
            found[variable.name] = variable
        return found, version

    async def set_variable(
        self, session_id: str, key: str, value: Any, *, expected_version: int | None, source: str,
        optimizer_id: str | None, metadata: dict[str, Any] | None,
    ) -> tuple[Variable, int]:
        def set_one(store: VariableStore) -> tuple[Variable, list[VariableUpdate], bool]:
            variable, change = store.set(
                key, value, expected_version=expected_version, source=source, optimizer_id=optimizer_id, metadata=metadata,
            )
            return variable, [change] if change else [], change is not None

        return await self._write(session_id, set_one)

    async def set_variables(
        self, session_id: str, updates: Mapping[str, Any], *, atomic: bool, source: str, optimizer_id: str | None
    ) -> tuple[dict[str, Variable | Exception], int]:
        def set_many(store: VariableStore) -> tuple[dict[str, Variable | Exception], list[VariableUpdate], bool]:
            results, changes = store.set_many(updates, atomic=atomic, source=source, optimizer_id=optimizer_id)
            return results, changes, bool(changes)

        return await self._write(session_id, set_many)

    async def list_variables(self, session_id: str, pattern: str) -> list[Variable]:
        store, _ = await self._read(session_id)
        return store.list(pattern)

    async def delete_variable(self, session_id: str, key: str, *, source: str) -> int:
        def delete(store: VariableStore) -> tuple[None, list[VariableUpdate], bool]:
            return None, [store.delete(key, source=source)], True

        return (await self._write(session_id, delete))[1]

    async def variable_history(self, session_id: str, key: str) -> list[HistoryEntry]:
        store, _ = await self._read(session_id)
        return store.history(key)

    async def rollback_variable(
        self, session_id: str, key: str, version: int, *, source: str, optimizer_id: str | None
    ) -> tuple[Variable, int]:
        def rollback(store: VariableStore) -> tuple[Variable, list[VariableUpdate], bool]:
            variable, change = store.rollback(key, version, source=source, optimizer_id=optimizer_id)
            return variable, [change] if change else [], change is not None

        return await self._write(session_id, rollback)

    async def add_dependency(self, session_id: str, dependent: str, dependency: str) -> Variable:
        def add(store: VariableStore) -> tuple[Variable, list[VariableUpdate], bool]:
            return store.add_dependency(dependent, dependency), [], True  # workers' caches hold depends_on

        return (await self._write(session_id, add))[0]

    async def set_optimization(self, session_id: str, key: str, optimizer_id: str, *, active: bool) -> Variable:
        def lock(store: VariableStore) -> tuple[Variable, list[VariableUpdate], bool]:
            if active:
                return store.start_optimization(key, optimizer_id, lease=self.lock_lease), [], True
            return store.stop_optimization(key, optimizer_id), [], True

        return (await self._write(session_id, lock))[0]

    # ---- idempotent calls ----
    @property
    def command_timeout(self) -> float | None:
        return self.timeout

    def _call_key(self, key: str) -> str:
        return f"{self.prefix}:call:{key}"

    async def _script(self, script: str, key: str, *args: Any) -> Any:
        return await self._call(lambda r: r.evalsha(_SHA[script], 1, self._call_key(key), *args))

    async def claim_call(self, key: str, fingerprint: str, lease: float) -> Claim:
        token = new_token()
        state, found, record = await self._script(_CLAIM, key, fingerprint, token, _ms(lease), _ms(self.idempotency_ttl))
        state = state.decode()
        return Claim(state, found.decode(), token if state == "claimed" else "", record)

    async def renew_call(self, key: str, token: str, lease: float) -> bool:
        return bool(await self._script(_RENEW, key, token, _ms(lease), _ms(self.idempotency_ttl)))

    async def finish_call(self, key: str, token: str, record: bytes) -> bool:
        return bool(await self._script(_FINISH, key, token, record, _ms(self.idempotency_ttl)))

    async def release_call(self, key: str, token: str) -> bool:
        return bool(await self._script(_RELEASE, key, token))

    async def wait_call(self, key: str, poll: float) -> None:
        await trio.sleep(poll)  # another host's holder cannot tell us: look again

    # ---- watching ----
    @asynccontextmanager
    async def watch(
        self, session_id: str, names: list[str], *, include_initial: bool, buffer_size: int = DEFAULT_WATCH_BUFFER
    ) -> AsyncIterator[Watcher]:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise InvalidArgumentError(f"buffer_size must be a positive number of updates, not {buffer_size!r}")
        if buffer_size > self.log_length - 2:
            raise InvalidArgumentError(f"buffer_size must be below this backend's log_length - 1 ({self.log_length - 1})")
        keys = self._keys(self._check_id(session_id))

        def snapshot(r: _Client) -> tuple[dict[bytes, bytes], dict[bytes, bytes], list[Any]]:
            with r.pipeline(transaction=True) as pipe:  # one MULTI: no change between them
                self._queue_touch(pipe, session_id, keys, time.time())
                pipe.hgetall(keys.meta)
                pipe.hgetall(keys.vars)
                pipe.xrevrange(keys.log, "+", "-", count=1)
                _, meta, raw, last = pipe.execute()
            return meta, raw, last

        meta, raw, last = await self._call(snapshot)
        if not meta:
            raise SessionNotFoundError(f"no session {session_id!r} (never created, cleaned up, or expired)")
        store = self._store(meta, raw)
        variables = list({v.name: v for v in (store.get(name) for name in names)}.values())  # unknown names fail here
        now = time.time()
        initial = [VariableUpdate(v.name, None, v.value, v.version, v.source, "initial", now) for v in variables] if include_initial else []
        watcher = RedisWatcher(self, keys, variables, buffer_size, last[0][0].decode() if last else "0-0", initial)
        try:
            yield watcher
        finally:
            watcher.close()


async def _on_the_loop(function: Callable[[Any], Awaitable[T]], client: Any) -> T:
    """``await function(client)``, called only once this runs on the loop: redis-py's commands
    make their inner coroutine at once, which a crossing dropped before it started (the loop
    shutting down) would leave never awaited."""
    return await function(client)


@final
class RedisWatcher(Watcher):
    """:class:`RedisBackend`'s watcher: a cursor into the session's log stream."""

    def __init__(
        self, backend: RedisBackend, keys: _Keys, variables: list[Variable], buffer_size: int, cursor: str,
        initial: list[VariableUpdate],
    ) -> None:
        super().__init__([v.name for v in variables], buffer_size)
        self._backend = backend
        self._keys = keys
        self._cursor = cursor
        self._seen: dict[str, tuple[int, Any]] = {v.name: (v.version, v.value) for v in variables}
        self._initial = initial
        self._closed = False
        self._ended = False

    def close(self) -> None:
        self._closed = True

    async def next_batch(self) -> list[VariableUpdate]:
        await trio.lowlevel.checkpoint_if_cancelled()
        batch, self._initial = self._initial, []
        while not batch and not self._closed and not self._ended:
            batch = await self._read()
        return [] if self._closed else batch

    async def _read(self) -> list[VariableUpdate]:
        """The next updates of the watched variables (waiting up to a second for one); the
        current values instead when more than ``buffer_size`` of them are pending, or when the
        versions show a gap (the log was trimmed past this watcher)."""
        log, chunk = self._keys.log, min(max(64, self.buffer_size + 1), 1024)
        cursor, ended, pending = self._cursor, False, []
        try:
            found = await self._backend._wait(lambda r: r.xread({log: cursor}, block=_BLOCK_MS, count=chunk))
            entries = [item for _, items in found for item in items]
            while entries:
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    if fields[b"k"] == b"end":
                        ended = True
                        break
                    if fields[b"n"].decode() in self.names:
                        pending.append(fields)
                if ended or len(entries) < chunk or len(pending) > self.buffer_size:
                    break
                entries = await self._backend._wait(lambda r, after=cursor: r.xrange(log, f"({after}", "+", count=chunk))
        except StateUnavailableError:
            await trio.sleep(_REAP_INTERVAL)  # Redis away: read on from the same entry once it is back
            return []
        if len(pending) > self.buffer_size:
            return await self._catch_up()
        updates = [_update_from(fields) for fields in pending]
        versions = {name: version for name, (version, _) in self._seen.items()}
        for u in updates:
            if u.version != 0 and versions[u.name] >= 0 and u.version != versions[u.name] + 1:
                return await self._catch_up()  # a gap: entries this watcher never read were trimmed
            versions[u.name] = -1 if u.kind == "delete" else u.version
        self._cursor, self._ended = cursor, ended
        for u in updates:
            self._seen[u.name] = (-1 if u.kind == "delete" else u.version, u.new_value)
        return updates

    async def _catch_up(self) -> list[VariableUpdate]:
        keys, names = self._keys, sorted(self.names)

        def read(r: _Client) -> tuple[list[bytes | None], list[Any]]:
            with r.pipeline(transaction=True) as pipe:
                pipe.hmget(keys.vars, names)
                pipe.xrevrange(keys.log, "+", "-", count=1)
                records, last = pipe.execute()
            return records, last

        records, last = await self._backend._call(read)
        if last:
            self._cursor = last[0][0].decode()
            if last[0][1].get(b"k") == b"end":
                self._ended = True
                return []  # the session ended: its variables are gone, not deleted one by one
        batch = []
        now = time.time()
        for name, data in zip(names, records, strict=True):
            seen_version, seen_value = self._seen[name]
            if data is None:  # deleted since
                if seen_version >= 0:
                    batch.append(VariableUpdate(name, seen_value, None, seen_version + 1, "", "delete", now))
                    self._seen[name] = (-1, None)
                continue
            record = _unpack(data)
            if record["version"] == seen_version and seen_version >= 0:
                continue
            skipped = max(0, record["version"] - seen_version - 1) if seen_version >= 0 else 0
            self.coalesced += skipped
            batch.append(VariableUpdate(
                name, seen_value, record["value"], record["version"], record["source"], "change", record["updated_at"], skipped,
            ))
            self._seen[name] = (record["version"], record["value"])
        batch.sort(key=lambda u: u.timestamp)
        return batch


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _pack(value: Any) -> bytes:
    return bytes(codec.encode(value, plane=None))


def _unpack(data: bytes) -> Any:
    return codec.decode(pb.Payload().parse(data), plane=None)


def _update_fields(u: VariableUpdate) -> list[Any]:
    """A log entry's values, in the order of the write script's XADD (k n v s t o w)."""
    return [u.kind, u.name, u.version, u.source, repr(u.timestamp), _pack(u.old_value), _pack(u.new_value)]


def _update_from(fields: dict[bytes, bytes]) -> VariableUpdate:
    kind: UpdateKind = "delete" if fields[b"k"] == b"delete" else "change"
    return VariableUpdate(
        fields[b"n"].decode(), _unpack(fields[b"o"]), _unpack(fields[b"w"]), int(fields[b"v"]), fields[b"s"].decode(),
        kind, float(fields[b"t"]),
    )
