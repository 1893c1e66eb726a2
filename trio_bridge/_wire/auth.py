"""Who may call: the pool secret, handed to workers on stdin or in a fork request (never argv,
which ``ps`` shows, nor a worker's environment, which its tools' children inherit) and sent as
gRPC metadata on every call, both ways; on Unix sockets, the peer's uid (:class:`PeerCheck`),
checked before a connection's first byte; and token files (:func:`read_token_file`)."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Collection
from typing import Any

import grpclib.const
import grpclib.events
from grpclib.exceptions import GRPCError

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.contract import ALLOWED_UIDS_ENV, SECRET_METADATA
from trio_bridge._wire.standard_services import HEALTH_PREFIX


class RateLimitedWarning:
    """One warning line per ``interval`` seconds at most, saying how many were held back since:
    a bad client cannot flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            self._logger.warning("%s%s", message, more)
            self._last, self._suppressed = now, 0
        else:
            self._suppressed += 1


async def authenticate(secret: str, event: grpclib.events.RecvRequest, refusals: RateLimitedWarning) -> None:
    """grpclib ``RecvRequest`` listener: refuse calls without the right secret (before the
    handler runs), with a log line naming the peer (``refusals``: rate-limited, per server).
    Health checks need none (see :mod:`trio_bridge._wire.standard_services`)."""
    if event.method_name.startswith(HEALTH_PREFIX):
        return
    sent = event.metadata.get(SECRET_METADATA, "")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), secret.encode()):
        peer = event.peer.addr() if event.peer is not None else None
        refusals.warn(f"refused {event.method_name} from {peer or 'a local peer'}: missing or wrong secret")
        raise GRPCError(grpclib.const.Status.UNAUTHENTICATED, "missing or wrong pool secret")


def require_secret(server: object, secret: str) -> None:
    """Make ``server`` (a grpclib Server) refuse calls that lack ``secret``."""
    refusals = RateLimitedWarning(logging.getLogger("trio_bridge.wire"))
    grpclib.events.listen(server, grpclib.events.RecvRequest, lambda event: authenticate(secret, event, refusals))  # type: ignore[arg-type]


_UCRED = struct.Struct("=iII")  # Linux's struct ucred: pid_t pid, uid_t uid, gid_t gid


class PeerCheck:
    """Refuse Unix-socket peers of another uid (Linux: ``SO_PEERCRED``, read once per accepted
    connection). An abstract-namespace socket has no file permissions: without this, any local
    user could connect (the secret guards RPCs, not health or reflection).

    Allowed: this process's uid, root (uid 0: it can read our secret from ``/proc`` and ptrace
    us anyway; ssh-agent allows it too), and ``allowed_uids``. TCP connections are not checked
    (the secret or token, and TLS, guard them). Where ``SO_PEERCRED`` does not exist (macOS), the
    socket file's directory (0700) is the guard."""

    def __init__(self, allowed_uids: Collection[int] = ()) -> None:
        self.allowed: frozenset[int] = frozenset({os.getuid(), 0, *allowed_uids})
        self._refusals = RateLimitedWarning(logging.getLogger("trio_bridge.wire"))

    def refusal(self, sock: Any) -> str | None:
        """Why the peer on ``sock`` (an accepted socket, or asyncio/uvloop's stand-in for one)
        is refused; ``None``: it may connect. Fails closed when the credentials cannot be read."""
        if sock is None:
            return "a connection without a socket to read its peer's credentials from"
        if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
            return None
        try:
            pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as exc:
            return f"a Unix-socket peer whose credentials cannot be read ({exc})"
        if uid in self.allowed:
            return None
        return (
            f"a Unix-socket peer of another user: pid {pid}, uid {uid} (this process runs as uid {os.getuid()}); "
            f"allow it with open_pool(local=LocalWorkers(allowed_uids=[{uid}])) or {ALLOWED_UIDS_ENV}={uid} for a worker"
        )

    def refused(self, transport: Any) -> bool:
        """Check a new connection's peer; refused: log it (rate-limited) and abort ``transport``."""
        reason = self.refusal(transport.get_extra_info("socket"))
        if reason is None:
            return False
        self._refusals.warn(f"refused {reason}")
        transport.abort()
        return True


def parse_allowed_uids(value: str) -> frozenset[int]:
    """:data:`ALLOWED_UIDS_ENV`'s value (``"1001,1002"``; empty: none) as uids.

    Raises:
        ValueError: an entry is not a non-negative integer (the message names the variable).
    """
    uids = set()
    for entry in value.replace(" ", "").split(","):
        if not entry:
            continue
        if not (entry.isascii() and entry.isdigit()):
            raise ValueError(f"{ALLOWED_UIDS_ENV} must list uids separated by commas (e.g. 1001,1002), not {value!r}")
        uids.add(int(entry))
    return frozenset(uids)


def read_token_file(path: str) -> str:
    """The token in the file at ``path`` (its text, stripped). Like ssh with a key, it must be
    readable by its owner only (on POSIX).

    Raises:
        InvalidArgumentError: it cannot be read, is empty, or its mode lets the group or others
            read or write it (the message says to ``chmod 600`` it).
    """
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            if os.name == "posix" and mode & 0o077:
                raise InvalidArgumentError(
                    f"token file {path} is open to others (mode {stat.S_IMODE(mode):04o}): "
                    f"make it the owner's only with `chmod 600 {path}`"
                )
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"token file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise InvalidArgumentError(f"token file {path} is empty: write the pool's token in it")
    return token
