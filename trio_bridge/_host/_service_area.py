"""What every area of the host's ``HostService`` shares (see :mod:`_host_service`): serving the
RPCs it names, decoding payloads (a malformed one refused and logged), and which worker calls.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import grpclib.const
import grpclib.server

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import decode
from trio_bridge._wire.contract import WORKER_METADATA
from trio_bridge._wire.errors import MALFORMED_PAYLOAD, Refusals, require_message
from trio_bridge._wire.generated.trio_bridge import v1 as pb

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._wire.shared_memory import SharedMemoryPlane

SERVICE = "/trio_bridge.v1.HostService/"  # the prefix of its RPCs' paths
StreamHandler = Callable[[grpclib.server.Stream], Awaitable[None]]
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("trio_bridge_caller", default="")


class ServiceArea(pb.HostServiceBase):
    """One area of the ``HostService``: it serves the RPCs it names in ``RPCS`` (their names in
    the .proto) and no others, each by the generated handler (which calls this class's method
    of that name) or by its own handler of the whole stream (:meth:`streams`).

    Args:
        boundary: the asyncio boundary (handlers cross into Trio through it).
        plane: the shared-memory plane of the pool (``None``: in-band only).
        refusals: the service's log of refused requests (malformed payloads among them).
    """

    RPCS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, boundary: Boundary, plane: SharedMemoryPlane | None, refusals: Refusals) -> None:
        self.boundary: Boundary = boundary
        """What its handlers cross into Trio with."""
        self.plane: SharedMemoryPlane | None = plane
        """Where its handlers' large arrays go (``None``: in-band only)."""
        self._refusals = refusals

    def streams(self) -> Mapping[str, StreamHandler]:
        """RPCs (by name) served by a handler of the whole stream instead of the generated one:
        server streams we send ourselves, so that cancellation lands inside our code."""
        return {}

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        generated, own = super().__mapping__(), self.streams()
        mapping = {}
        for rpc in self.RPCS:
            handler = generated[SERVICE + rpc]
            function = own.get(rpc, handler.func)
            mapping[SERVICE + rpc] = grpclib.const.Handler(function, handler.cardinality, handler.request_type, handler.reply_type)
        return mapping

    def decode_payload(self, payload: pb.Payload | None, what: str) -> Any:
        """For its handlers: a request's ``payload`` (``what`` names it in the error), decoded.

        Raises:
            InvalidArgumentError: it is malformed (logged with the service's refusals).
        """
        try:
            return decode(payload, plane=self.plane)
        except ValueError as exc:
            problem = f"malformed {what}: {exc}"
            self._refusals.log(MALFORMED_PAYLOAD, problem)
            raise InvalidArgumentError(problem) from None


def with_caller(function: StreamHandler, rpc: str, refusals: Refusals | None) -> StreamHandler:
    """Remember which worker is calling (from its metadata) for the ``source`` of its writes;
    with ``refusals``, refuse a request that has no message (see ``require_message``)."""

    async def handler(stream: grpclib.server.Stream) -> None:
        if refusals is not None:
            require_message(stream, rpc, refusals)
        worker = stream.metadata.get(WORKER_METADATA, "") if stream.metadata else ""
        token = _caller.set(f"worker:{worker}" if worker else "worker")
        try:
            await function(stream)
        finally:
            _caller.reset(token)

    return handler


def source() -> str:
    """The ``source`` of a write made by the RPC being served: ``"worker:ID"``."""
    return _caller.get() or "worker"
