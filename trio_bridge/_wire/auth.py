"""The pool secret: handed to workers in the environment (never argv, which ``ps`` shows) and
sent as gRPC metadata on every call, both ways."""

from __future__ import annotations

import hmac

import grpclib.const
import grpclib.events
from grpclib.exceptions import GRPCError

from trio_bridge._wire.contract import SECRET_METADATA


async def authenticate(secret: str, event: grpclib.events.RecvRequest) -> None:
    """grpclib ``RecvRequest`` listener: refuse calls without the right secret."""
    sent = event.metadata.get(SECRET_METADATA, "")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), secret.encode()):
        raise GRPCError(grpclib.const.Status.UNAUTHENTICATED, "missing or wrong pool secret")


def require_secret(server: object, secret: str) -> None:
    """Make ``server`` (a grpclib Server) refuse calls that lack ``secret``."""
    grpclib.events.listen(server, grpclib.events.RecvRequest, lambda event: authenticate(secret, event))  # type: ignore[arg-type]
