"""The worker's connection to its host's HostService, and per-session variable caches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from trio_bridge._state.variables import Variable, VariableUpdate
from trio_bridge._wire.auth import SECRET_METADATA
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.errors import exception_from
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.state import update_from_wire, variable_from_wire
from trio_bridge._wire.transport import open_channel

WORKER_METADATA = "x-trio-bridge-worker"  # who is calling: the source of its writes


def raise_for(error: pb.ErrorInfo | None) -> None:
    if error is not None:
        raise exception_from(error, "")


@dataclass
class SessionCache:
    """A session's variables as last fetched. ``version`` is the session's state version they
    reflect (-1: never fetched)."""

    version: int = -1
    variables: dict[str, Variable] = field(default_factory=dict)


class HostClient:
    """Calls to the host, from the worker's event loop."""

    def __init__(self, address: str, secret: str, worker_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = open_channel(address)
        self.stub = pb.HostServiceStub(self.channel, metadata={SECRET_METADATA: secret, WORKER_METADATA: worker_id})
        self.loop = loop
        self.worker_id = worker_id
        self.caches: dict[str, SessionCache] = {}
        self.refreshes = 0  # round trips made to refresh caches (for tests and benchmarks)

    def close(self) -> None:
        self.channel.close()

    async def refresh(self, session_id: str, at_least: int) -> None:
        """Make the session's cache reflect at least state version ``at_least`` (one round trip
        when it is older; none otherwise)."""
        cache = self.caches.setdefault(session_id, SessionCache())
        if cache.version >= at_least and cache.version >= 0:
            return
        reply = await self.stub.get_variables(pb.GetVariablesRequest(session_id=session_id, all=True))
        self.refreshes += 1
        raise_for(reply.error)
        cache.variables = {v.name: v for v in map(variable_from_wire, reply.variables)}
        cache.version = reply.state_version

    # ---- tools ----
    async def list_host_tools(self, session_id: str) -> list[pb.ToolSpec]:
        reply = await self.stub.list_host_tools(pb.ListHostToolsRequest(session_id=session_id))
        raise_for(reply.error)
        return list(reply.tools)

    async def call(self, host_tool: bool, request: pb.ExecuteToolRequest) -> Any:
        """A host tool (``host_tool``) or a tool of any worker, routed by the host."""
        method = self.stub.execute_host_tool if host_tool else self.stub.execute_tool
        reply = await method(request)
        if reply.error is not None:
            raise exception_from(reply.error, request.tool_name)
        return decode(reply.result)

    async def stream_host_tool(self, request: pb.ExecuteToolRequest) -> AsyncIterator[list[Any]]:
        """The host tool's chunks, a message's worth (a list) at a time."""
        async for batch in self.stub.execute_streaming_host_tool(request):
            if batch.chunks:
                yield [decode(chunk) for chunk in batch.chunks]
            if batch.error is not None:
                raise exception_from(batch.error, request.tool_name)

    def forget(self, session_id: str) -> None:
        self.caches.pop(session_id, None)

    def link(self, session_id: str) -> SessionLink:
        return SessionLink(self, session_id, self.caches.setdefault(session_id, SessionCache()))


class SessionLink:
    """One session, seen from a tool: its cache and the calls that change it."""

    def __init__(self, client: HostClient, session_id: str, cache: SessionCache) -> None:
        self.client = client
        self.session_id = session_id
        self.cache = cache
        self.loop = client.loop

    def _absorb(self, reply: pb.VariableReply) -> list[Variable]:
        raise_for(reply.error)
        variables = [variable_from_wire(v) for v in reply.variables]
        # Our own write keeps the cache current only if nobody else wrote in between.
        in_step = reply.state_version == self.cache.version + 1
        for v in variables:
            self.cache.variables[v.name] = v
        if in_step:
            self.cache.version = reply.state_version
        return variables

    async def get_variable(self, name: str) -> Variable:
        reply = await self.client.stub.get_variable(pb.GetVariablesRequest(session_id=self.session_id, names=[name]))
        raise_for(reply.error)
        variable = variable_from_wire(reply.variables[0])
        self.cache.variables[variable.name] = variable
        return variable

    async def set_variable(self, name: str, value: Any, expected_version: int | None) -> Variable:
        request = pb.SetVariableRequest(
            session_id=self.session_id, name=name, value=encode(value, path=f"variable {name!r}"),
            expected_version=expected_version,
        )
        return self._absorb(await self.client.stub.set_variable(request))[0]

    async def set_variables(self, updates: dict[str, Any]) -> list[Variable]:
        request = pb.SetVariablesRequest(session_id=self.session_id, updates=encode(updates, path="updates"), atomic=True)
        return self._absorb(await self.client.stub.set_variables(request))

    async def register_variable(self, name: str, type_name: str, value: Any, constraints: dict[str, Any] | None, metadata: dict[str, Any] | None) -> Variable:
        request = pb.RegisterVariableRequest(
            session_id=self.session_id, name=name, type=type_name, value=encode(value, path=f"variable {name!r}"),
            constraints=encode(constraints or {}, path="constraints"), metadata=encode(metadata or {}, path="metadata"),
        )
        return self._absorb(await self.client.stub.register_variable(request))[0]

    async def watch(self, names: list[str], include_initial: bool) -> AsyncIterator[VariableUpdate]:
        request = pb.WatchVariablesRequest(session_id=self.session_id, names=list(names), include_initial=include_initial)
        async for batch in self.client.stub.watch_variables(request):
            if batch.error is not None:
                raise exception_from(batch.error, "")
            for update in batch.updates:  # an empty batch is a heartbeat
                yield update_from_wire(update)

