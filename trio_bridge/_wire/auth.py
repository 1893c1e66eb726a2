"""The pool secret: handed to workers in the environment (never argv, which ``ps`` shows) and
sent as gRPC metadata on every call, both ways."""

from __future__ import annotations

import hmac
import logging
import time

import grpclib.const
import grpclib.events
from grpclib.exceptions import GRPCError

from trio_bridge._wire.contract import SECRET_METADATA
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
