"""HostService: what the host serves to its workers, one grpclib service made of its areas.

- :mod:`_service_members`: heartbeats and joining workers;
- :mod:`_service_tools`: host tools, and calls routed to another worker;
- :mod:`_service_state`: sessions, variables and watching;
- :mod:`_service_area`: what they share.

Handlers are asyncio coroutines on the host's asyncio loop (its own thread, ``trio_bridge._aio``);
each crosses into Trio once to reach the pool's state. Every request is validated: an unknown
session, a malformed value or a refused write ends the RPC with a gRPC status whose details hold
its ``ErrorInfo`` (see ``_wire/errors.py``), changes nothing, and never crashes the host.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpclib.const

from trio_bridge._host._service_area import ServiceArea, with_caller
from trio_bridge._host._service_members import MembershipService
from trio_bridge._host._service_state import StateService
from trio_bridge._host._service_tools import RoutedCalls, ToolService
from trio_bridge._wire.errors import Refusals
from trio_bridge._wire.generated.trio_bridge import v1 as pb

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._host._router import Route
    from trio_bridge._host._tools import ToolRegistry
    from trio_bridge._state.backend import StateBackend
    from trio_bridge._wire.shared_memory import SharedMemoryPlane

__all__ = ["HostService", "RoutedCalls"]


class HostService:
    """The ``trio_bridge.v1.HostService`` of the .proto, served by grpclib (an object whose
    ``__mapping__()`` gives each RPC's handler): every RPC by exactly one of its areas.

    Args:
        boundary: the asyncio boundary (handlers cross into Trio through it).
        state: the state backend.
        calls: runs routed worker-to-worker calls; parks a worker's call while it waits on the host.
        tools: the host tool registry.
        plane: the shared-memory plane of the pool (``None``: in-band only).
        heartbeat: a worker's heartbeat: keeps its figures, and says whether a live worker of the
            pool has its id.
        route_for: the route of a session's calls, by session id.
        join: takes a remote worker that offers itself, ``join(address, adapter, tool_names)``
            (raises a TrioBridgeError to refuse it); ``None``: the pool takes none.
        count_host_tool_call: counts a host tool call, ``(tool, outcome)``.
    """

    def __init__(
        self, boundary: Boundary, state: StateBackend, *, calls: RoutedCalls, tools: ToolRegistry,
        plane: SharedMemoryPlane | None, heartbeat: Callable[[pb.HeartbeatRequest], bool], route_for: Callable[[str], Route],
        join: Callable[[str, str, list[str]], Awaitable[None]] | None = None,
        count_host_tool_call: Callable[[str, str], None] | None = None,
    ) -> None:
        self._refusals = refusals = Refusals()  # malformed requests: logged rate-limited
        self.areas: tuple[ServiceArea, ...] = (
            MembershipService(boundary, plane, refusals, heartbeat=heartbeat, join=join),
            ToolService(
                boundary, plane, refusals, calls=calls, tools=tools, route_for=route_for,
                count=count_host_tool_call or (lambda tool, outcome: None),
            ),
            StateService(boundary, plane, refusals, state),
        )

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        """Each RPC's handler, which remembers the calling worker and refuses a request
        without its message. Raises AssertionError if an RPC of the .proto has no area, or two."""
        mapping: dict[str, grpclib.const.Handler] = {}
        for area in self.areas:
            for path, handler in area.__mapping__().items():
                assert path not in mapping, f"{path} is served by two areas of the HostService"
                refusals = None if handler.cardinality.client_streaming else self._refusals
                checked = with_caller(handler.func, path, refusals)
                mapping[path] = grpclib.const.Handler(checked, handler.cardinality, handler.request_type, handler.reply_type)
        missing = set(pb.HostServiceBase().__mapping__()) - set(mapping)
        assert not missing, f"no area of the HostService serves {sorted(missing)}"
        return mapping
