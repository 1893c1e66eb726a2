"""HostService: what the host serves to its workers (asyncio handlers on the trio-asyncio loop).

For now: Heartbeat. Handlers only read plain pool state, so they need no Trio crossing.
"""

from __future__ import annotations

from collections.abc import Callable

from trio_bridge._wire.generated.trio_bridge import v1 as pb


class HostService(pb.HostServiceBase):
    def __init__(self, on_heartbeat: Callable[[pb.HeartbeatRequest], bool]) -> None:
        self._on_heartbeat = on_heartbeat

    async def heartbeat(self, message: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return pb.HeartbeatResponse(known=self._on_heartbeat(message))
