"""The HostService's sessions and variables: session lookup, variable reads and writes, history,
rollback, dependencies, optimization locks, and watching (a server stream).

Each request crosses into Trio once to reach the state backend; a refused one ends its RPC with
the backend's error (its ``ErrorInfo`` in the status) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import grpclib.server
import trio

from trio_bridge._errors import InvalidArgumentError, TrioBridgeError
from trio_bridge._host._service_area import ServiceArea, StreamHandler, source
from trio_bridge._wire.codec import encode
from trio_bridge._wire.contract import WATCH_BUFFER_METADATA
from trio_bridge._wire.errors import Refusals, error_info, status_error
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.state import history_to_wire, update_to_wire, variable_to_wire

if TYPE_CHECKING:
    from trio_bridge._aio import Boundary
    from trio_bridge._state.backend import StateBackend
    from trio_bridge._wire.shared_memory import SharedMemoryPlane

_DEFAULT_WATCH_HEARTBEAT = 10.0  # seconds


class StateService(ServiceArea):
    """Sessions and variables, for workers. ``state``: the state backend (see
    :class:`ServiceArea` for the other arguments)."""

    RPCS = (
        "GetSession", "RegisterVariable", "GetVariable", "GetVariables", "SetVariable", "SetVariables",
        "ListVariables", "DeleteVariable", "VariableHistory", "RollbackVariable", "AddDependency",
        "StartOptimization", "StopOptimization", "WatchVariables",
    )

    def __init__(self, boundary: Boundary, plane: SharedMemoryPlane | None, refusals: Refusals, state: StateBackend) -> None:
        super().__init__(boundary, plane, refusals)
        self._state = state

    def streams(self) -> Mapping[str, StreamHandler]:
        return {"WatchVariables": self._serve_watch}

    # ---- sessions ----
    async def get_session(self, message: pb.GetSessionRequest) -> pb.SessionReply:
        try:
            info = await self.boundary.call_trio(self._state.get_session, message.session_id)
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None
        return pb.SessionReply(
            id=info.id, ttl=info.ttl or 0.0, metadata=encode(dict(info.metadata)),
            variable_count=info.variable_count, state_version=info.state_version,
        )

    # ---- variables ----
    async def register_variable(self, m: pb.RegisterVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.register_variable(
                m.session_id, m.name, m.type, self.decode_payload(m.value, "value"), constraints=self.decode_payload(m.constraints, "constraints"),
                metadata=self.decode_payload(m.metadata, "metadata"), source=writer,
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self.plane)], state_version=version)

        writer = source()
        return await self._run(op)

    async def get_variable(self, m: pb.GetVariablesRequest) -> pb.VariableReply:
        if not m.names:
            raise status_error(error_info(InvalidArgumentError("GetVariable needs a name")))
        return await self.get_variables(pb.GetVariablesRequest(session_id=m.session_id, names=m.names[:1]))

    async def get_variables(self, m: pb.GetVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            found, version = await self._state.get_variables(m.session_id, None if m.all else list(m.names))
            return pb.VariableReply(variables=[variable_to_wire(v, self.plane) for v in found.values()], state_version=version)

        return await self._run(op)

    async def set_variable(self, m: pb.SetVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.set_variable(
                m.session_id, m.name, self.decode_payload(m.value, "value"), expected_version=m.expected_version,
                source=writer, optimizer_id=m.optimizer_id or None, metadata=self.decode_payload(m.metadata, "metadata"),
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self.plane)], state_version=version)

        writer = source()
        return await self._run(op)

    async def set_variables(self, m: pb.SetVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            updates = self.decode_payload(m.updates, "updates")
            if not isinstance(updates, dict):
                raise InvalidArgumentError("updates must be a dict of name -> value")
            results, version = await self._state.set_variables(
                m.session_id, updates, atomic=m.atomic, source=writer, optimizer_id=m.optimizer_id or None
            )
            return pb.VariableReply(
                variables=[variable_to_wire(r, self.plane) for r in results.values() if not isinstance(r, Exception)],
                errors={k: error_info(r) for k, r in results.items() if isinstance(r, Exception)},
                state_version=version,
            )

        writer = source()
        return await self._run(op)

    async def list_variables(self, m: pb.ListVariablesRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            found = await self._state.list_variables(m.session_id, m.pattern or "*")
            return pb.VariableReply(variables=[variable_to_wire(v, self.plane) for v in found])

        return await self._run(op)

    async def delete_variable(self, m: pb.VariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            return pb.VariableReply(state_version=await self._state.delete_variable(m.session_id, m.name, source=writer))

        writer = source()
        return await self._run(op)

    async def variable_history(self, m: pb.VariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            entries = await self._state.variable_history(m.session_id, m.name)
            return pb.VariableReply(history=[history_to_wire(e, self.plane) for e in entries])

        return await self._run(op)

    async def rollback_variable(self, m: pb.RollbackVariableRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable, version = await self._state.rollback_variable(
                m.session_id, m.name, m.version, source=writer, optimizer_id=m.optimizer_id or None
            )
            return pb.VariableReply(variables=[variable_to_wire(variable, self.plane)], state_version=version)

        writer = source()
        return await self._run(op)

    async def add_dependency(self, m: pb.AddDependencyRequest) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            variable = await self._state.add_dependency(m.session_id, m.dependent, m.dependency)
            return pb.VariableReply(variables=[variable_to_wire(variable, self.plane)])

        return await self._run(op)

    async def start_optimization(self, m: pb.OptimizationRequest) -> pb.VariableReply:
        return await self._optimization(m, active=True)

    async def stop_optimization(self, m: pb.OptimizationRequest) -> pb.VariableReply:
        return await self._optimization(m, active=False)

    async def _optimization(self, m: pb.OptimizationRequest, *, active: bool) -> pb.VariableReply:
        async def op() -> pb.VariableReply:
            if not m.optimizer_id:
                raise InvalidArgumentError("an optimizer_id is required")
            variable = await self._state.set_optimization(m.session_id, m.name, m.optimizer_id, active=active)
            lease = (self._state.lock_lease or 0.0) if active else 0.0
            return pb.VariableReply(variables=[variable_to_wire(variable, self.plane)], lock_lease_seconds=lease)

        return await self._run(op)

    async def _run(self, op: Callable[[], Awaitable[pb.VariableReply]]) -> pb.VariableReply:
        try:
            return await self.boundary.call_trio(op)
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None

    # ---- watching ----
    async def _serve_watch(self, stream: grpclib.server.Stream) -> None:
        message = await stream.recv_message()
        assert message is not None
        buffer_size = stream.metadata.get(WATCH_BUFFER_METADATA) if stream.metadata else None
        await self.boundary.call_trio(self._watch, message, stream, buffer_size)

    async def _watch(self, m: pb.WatchVariablesRequest, stream: grpclib.server.Stream, buffer_size: str | None) -> None:
        """Trio side of a watch: one message per batch of updates, a heartbeat (an empty batch)
        when nothing happened for ``heartbeat_seconds``; ends when the session ends.

        ``buffer_size``: the worker's ``watch_variables(buffer_size=...)``, from the
        ``x-trio-bridge-watch-buffer`` metadata (the backend's default without it). The worker
        reads the stream as it comes into a buffer of that size of its own; should the stream
        back up anyway (HTTP/2 flow control), the watcher here falls behind instead, and
        coalesces beyond that many. Writers never wait.
        """
        heartbeat = m.heartbeat_seconds if m.heartbeat_seconds > 0 else _DEFAULT_WATCH_HEARTBEAT
        send = self.boundary.run
        try:
            options = {} if buffer_size is None else {"buffer_size": _positive_int(buffer_size, WATCH_BUFFER_METADATA)}
            async with self._state.watch(m.session_id, list(m.names), include_initial=m.include_initial, **options) as watcher:
                while True:
                    batch = None
                    with trio.move_on_after(heartbeat):  # around the wait only: a send cut short would lose the batch
                        batch = await watcher.next_batch()
                    if batch is None:
                        await send(stream.send_message(pb.WatchBatch()))
                    elif not batch:
                        return  # the session ended
                    else:
                        await send(stream.send_message(pb.WatchBatch(updates=[update_to_wire(u, self.plane) for u in batch])))
        except TrioBridgeError as exc:
            raise status_error(error_info(exc)) from None


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidArgumentError(f"{what} must be a positive integer, not {text!r}")
    return value
