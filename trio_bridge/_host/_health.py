"""A head's health-only listener (``Monitoring(health_address=...)``): ``grpc.health.v1`` in
plain TCP, without the pool's token, for an orchestrator's native probe (Kubernetes' ``grpc:``
probe has neither TLS nor metadata). It reveals nothing but two statuses:

- ``""`` (liveness): SERVING while the pool is open; NOT_SERVING once it closes (its drain).
- ``"ready"`` (readiness): SERVING while the pool is open and at least one worker is ready.

The statuses live on the boundary's asyncio loop; a Trio task follows the supervisor and
posts their changes there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from trio_bridge._aio import Boundary
from trio_bridge._errors import InvalidArgumentError
from trio_bridge._host._supervisor import Supervisor
from trio_bridge._wire.standard_services import LIVENESS, READINESS, ServingStatus

_FOLLOW_INTERVAL = 0.5  # seconds between looks at the supervisor (probes come every few seconds)


@asynccontextmanager
async def serving_health(boundary: Boundary, address: str, supervisor: Supervisor) -> AsyncIterator[str]:
    """Serve the pool's health on ``address`` (``"HOST:PORT"``, ``tcp:`` optional; port 0: a
    free one) while the block runs; yields ``"tcp:HOST:PORT"`` as bound.

    Raises:
        InvalidArgumentError: it cannot listen there (in use, not this machine's).
    """
    alive, ready = ServingStatus(), ServingStatus(serving=False)
    where = address if address.startswith("tcp:") else f"tcp:{address}"
    async with AsyncExitStack() as stack:
        try:
            bound = await stack.enter_async_context(boundary.serve_health(where, {LIVENESS: alive, READINESS: ready}))
        except OSError as exc:
            raise InvalidArgumentError(f"health_address {address}: cannot listen there: {exc.strerror or exc}") from None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_follow, boundary, supervisor, alive, ready)
            yield bound
            nursery.cancel_scope.cancel()


async def _follow(boundary: Boundary, supervisor: Supervisor, alive: ServingStatus, ready: ServingStatus) -> None:
    seen: tuple[bool, bool] | None = None
    while True:
        now = (not supervisor.closing, not supervisor.closing and supervisor.ready > 0)
        if now != seen:
            boundary.post(alive.set, now[0])
            boundary.post(ready.set, now[1])
            seen = now
        await trio.sleep(_FOLLOW_INTERVAL)
