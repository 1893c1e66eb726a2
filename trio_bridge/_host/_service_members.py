"""The HostService's pool membership: workers' heartbeats, and remote workers that offer
themselves (``trio-bridge worker --join``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from trio_bridge._errors import InvalidArgumentError, TrioBridgeError
from trio_bridge._host._service_area import ServiceArea
from trio_bridge._wire.errors import Refusals, error_info, status_error
from trio_bridge._wire.generated.trio_bridge import v1 as pb

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._wire.shared_memory import SharedMemoryPlane


class MembershipService(ServiceArea):
    """Heartbeats and joins.

    Args:
        heartbeat: a worker's heartbeat: keeps its figures, and says whether a live worker of the
            pool has its id.
        join: takes a remote worker that offers itself, ``join(address, adapter, tool_names)``
            (raises a TrioBridgeError to refuse it); ``None``: the pool takes none.

    (See :class:`ServiceArea` for the others.)
    """

    RPCS = ("Heartbeat", "Join")

    def __init__(
        self, boundary: Boundary, plane: SharedMemoryPlane | None, refusals: Refusals, *,
        heartbeat: Callable[[pb.HeartbeatRequest], bool], join: Callable[[str, str, list[str]], Awaitable[None]] | None,
    ) -> None:
        super().__init__(boundary, plane, refusals)
        self._heartbeat = heartbeat
        self._join = join

    # The pool's state is Trio's: handlers read and change it only on Trio's side of the boundary.
    async def heartbeat(self, message: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        async def beat() -> pb.HeartbeatResponse:
            return pb.HeartbeatResponse(known=self._heartbeat(message))

        return await self.boundary.call_trio(beat)

    async def join(self, m: pb.JoinRequest) -> pb.JoinReply:
        if self._join is None:
            raise status_error(error_info(InvalidArgumentError("this pool takes no joining workers")))
        try:
            await self.boundary.call_trio(self._join, m.address, m.adapter, list(m.tools))
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None
        return pb.JoinReply()
