"""The worker's connection to its host's HostService, and per-session variable caches."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, TypeVar

from grpclib.exceptions import GRPCError

from trio_bridge._errors import TrioBridgeError
from trio_bridge._state.sessions import SessionInfo
from trio_bridge._state.variables import HistoryEntry, Variable, VariableUpdate
from trio_bridge._wire.chunks import decode_batch
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.contract import DEFAULT_WATCH_BUFFER, SECRET_METADATA, WATCH_BUFFER_METADATA, WORKER_METADATA
from trio_bridge._wire.errors import exception_from, info_of
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.state import history_from_wire, update_from_wire, variable_from_wire
from trio_bridge._wire.transport import open_channel

if TYPE_CHECKING:
    from grpclib.client import Channel


T = TypeVar("T")


async def unary(call: Awaitable[T], tool: str = "") -> T:
    """Await one RPC to the host. Raises the error its failure stands for (the ErrorInfo in its
    status: ``SessionNotFoundError``, ``ToolError``, ...), or grpclib's ``GRPCError`` for a
    status without one (the transport's, or an older host's)."""
    try:
        return await call
    except GRPCError as exc:
        info = info_of(exc)
        if info is None:
            raise
        raise exception_from(info, tool) from None


def failure(exc: GRPCError, tool: str = "") -> BaseException:
    """What a stream from the host that ended with ``exc`` raises (see :func:`unary`)."""
    info = info_of(exc)
    return exc if info is None else exception_from(info, tool)


@dataclass
class SessionCache:
    """A session's variables as last fetched. ``version`` is the session's state version they
    reflect (-1: never fetched)."""

    version: int = -1
    variables: dict[str, Variable] = field(default_factory=dict)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class HostClient:
    """Calls to the host, from the worker's event loop."""

    def __init__(
        self, address: str, secret: str, worker_id: str, loop: asyncio.AbstractEventLoop, ssl: SSLContext | None = None,
    ) -> None:
        self._init(address, secret, worker_id, loop, open_channel(address, ssl))

    def _init(self, address: str, secret: str, worker_id: str, loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
        self.address: str = address
        self._channel: Channel = channel
        self.metadata: dict[str, str] = {SECRET_METADATA: secret, WORKER_METADATA: worker_id}  # sent with every call
        self._loop_stub: pb.HostServiceStub = pb.HostServiceStub(self._channel, metadata=self.metadata)
        self.loop: asyncio.AbstractEventLoop = loop
        self.worker_id: str = worker_id
        self.caches: dict[str, SessionCache] = {}
        self.refreshes: int = 0  # round trips made to refresh caches (for tests and benchmarks)

    @property
    def _stub(self) -> pb.HostServiceStub:
        """The stub, from a coroutine on the worker's event loop (``loop``). Awaited in another
        loop -- ``asyncio.run(ctx.acall_host_tool(...))`` in a sync tool's thread -- its call
        would wait forever (the channel belongs to this loop): a clear error instead.

        Raises:
            RuntimeError: called from another event loop's coroutine.
        """
        if self.loop is not None and running_loop() is not self.loop:  # (None: in-process, under Trio)
            raise RuntimeError(
                "SessionContext's awaitable methods run on the worker's event loop (async tools), not in another "
                "event loop (asyncio.run in a sync tool, say): a sync tool calls their blocking forms "
                "(e.g. `ctx.call_host_tool(...)`, `ctx.get_variable(...)`)"
            )
        return self._loop_stub

    def close(self) -> None:
        self._channel.close()

    async def refresh(self, session_id: str, at_least: int) -> None:
        """Make the session's cache reflect at least state version ``at_least`` (one round trip
        when it is older; none otherwise)."""
        cache = self.caches.setdefault(session_id, SessionCache())
        if cache.version >= at_least and cache.version >= 0:
            return
        reply = await unary(self._stub.get_variables(pb.GetVariablesRequest(session_id=session_id, all=True)))
        self.refreshes += 1
        cache.variables = {v.name: v for v in map(variable_from_wire, reply.variables)}
        cache.version = reply.state_version

    # ---- tools ----
    def forget(self, session_id: str) -> None:
        self.caches.pop(session_id, None)

    def link(self, session_id: str) -> SessionLink:
        return SessionLink(self, session_id, self.caches.setdefault(session_id, SessionCache()))


# What takes or gives wire types (betterproto2's messages, grpclib's channel and stub), whose own
# typing is incomplete, is functions rather than HostClient methods or constructor parameters:
# they stay off HostClient's public surface, which the public SessionContext reaches
# (``pyright --verifytypes``).
def client_over(channel: Channel, address: str, secret: str, worker_id: str, loop: asyncio.AbstractEventLoop) -> HostClient:
    """A client on ``channel`` instead of one dialing ``address`` (``trio_bridge.testing``'s
    in-process host service)."""
    client = HostClient.__new__(HostClient)
    client._init(address, secret, worker_id, loop, channel)
    return client


def host_stub(client: HostClient) -> pb.HostServiceStub:
    """``client``'s stub of the host service (its metadata sent with every call)."""
    return client._stub


async def client_list_host_tools(client: HostClient, session_id: str) -> list[pb.ToolSpec]:
    """The host tools the session's calls may use."""
    reply = await unary(client._stub.list_host_tools(pb.ListHostToolsRequest(session_id=session_id)))
    return list(reply.tools)


async def client_call_tool(client: HostClient, host_tool: bool, request: pb.ExecuteToolRequest) -> Any:
    """A host tool (``host_tool``) or a tool of any worker, routed by the host."""
    method = client._stub.execute_host_tool if host_tool else client._stub.execute_tool
    reply = await unary(method(request), request.tool_name)
    return decode(reply.result, owned=True)


async def client_stream_host_tool(client: HostClient, request: pb.ExecuteToolRequest) -> AsyncGenerator[list[Any], None]:
    """The host tool's chunks, a message's worth (a list) at a time."""
    try:
        async for batch in client._stub.execute_streaming_host_tool(request):
            chunks = decode_batch(batch.chunks)
            if chunks:
                yield chunks
    except GRPCError as exc:
        raise failure(exc, request.tool_name) from None


class SessionLink:
    """One session, seen from a tool: its cache and the calls that change it."""

    def __init__(self, client: HostClient, session_id: str, cache: SessionCache) -> None:
        self.client: HostClient = client
        self.session_id: str = session_id
        self.cache: SessionCache = cache
        self.loop: asyncio.AbstractEventLoop = client.loop

    def _absorb(self, reply: pb.VariableReply, *, versioned: bool = True) -> list[Variable]:
        """The variables of a write's reply, into the cache (read-your-writes). ``versioned``:
        the reply carries the session's state version after the write."""
        variables = [variable_from_wire(v) for v in reply.variables]
        for v in variables:
            self.cache.variables[v.name] = v
        self._advance(reply.state_version if versioned else None)
        return variables

    def _advance(self, state_version: int | None) -> None:
        # Our own write keeps the cache current only if nobody else wrote in between; otherwise
        # (or without a version) it stays behind, and the next call refreshes it.
        if state_version is not None and self.cache.version >= 0 and state_version == self.cache.version + 1:
            self.cache.version = state_version

    def _cached(self, key: str) -> Variable | None:
        variables = self.cache.variables
        return variables.get(key) or next((v for v in variables.values() if v.id == key), None)

    async def session_info(self) -> SessionInfo:
        reply = await unary(self.client._stub.get_session(pb.GetSessionRequest(session_id=self.session_id)))
        return SessionInfo(
            id=reply.id, created_at=None, last_used=None, ttl=reply.ttl or None, metadata=decode(reply.metadata) or {},
            variable_count=reply.variable_count, state_version=reply.state_version,
        )

    async def get_variable(self, name: str) -> Variable:
        reply = await unary(self.client._stub.get_variable(pb.GetVariablesRequest(session_id=self.session_id, names=[name])))
        variable = variable_from_wire(reply.variables[0])
        self.cache.variables[variable.name] = variable
        return variable

    async def list_variables(self, pattern: str) -> list[Variable]:
        reply = await unary(self.client._stub.list_variables(pb.ListVariablesRequest(session_id=self.session_id, pattern=pattern)))
        variables = sorted((variable_from_wire(v) for v in reply.variables), key=lambda v: v.name)
        found = {v.name: v for v in variables}
        for name in [n for n in self.cache.variables if fnmatch.fnmatchcase(n, pattern) and n not in found]:
            del self.cache.variables[name]  # deleted since
        self.cache.variables.update(found)
        return variables

    async def set_variable(self, name: str, value: Any, expected_version: int | None, optimizer_id: str | None = None) -> Variable:
        request = pb.SetVariableRequest(
            session_id=self.session_id, name=name, value=encode(value, path=f"variable {name!r}"),
            expected_version=expected_version, optimizer_id=optimizer_id or "",
        )
        return self._absorb(await unary(self.client._stub.set_variable(request)))[0]

    async def set_variables(self, updates: dict[str, Any]) -> list[Variable]:
        request = pb.SetVariablesRequest(session_id=self.session_id, updates=encode(updates, path="updates"), atomic=True)
        return self._absorb(await unary(self.client._stub.set_variables(request)))

    async def register_variable(self, name: str, type_name: str, value: Any, constraints: dict[str, Any] | None, metadata: dict[str, Any] | None) -> Variable:
        request = pb.RegisterVariableRequest(
            session_id=self.session_id, name=name, type=type_name, value=encode(value, path=f"variable {name!r}"),
            constraints=encode(constraints or {}, path="constraints"), metadata=encode(metadata or {}, path="metadata"),
        )
        return self._absorb(await unary(self.client._stub.register_variable(request)))[0]

    async def delete_variable(self, name: str) -> None:
        reply = await unary(self.client._stub.delete_variable(pb.VariableRequest(session_id=self.session_id, name=name)))
        gone = self._cached(name)
        if gone is not None:  # as the host did: the variable, and the edges to it
            del self.cache.variables[gone.name]
            for other in list(self.cache.variables.values()):
                if gone.name in other.depends_on:
                    depends_on = tuple(d for d in other.depends_on if d != gone.name)
                    self.cache.variables[other.name] = dataclasses.replace(other, depends_on=depends_on)
        self._advance(reply.state_version)

    async def variable_history(self, name: str) -> list[HistoryEntry]:
        reply = await unary(self.client._stub.variable_history(pb.VariableRequest(session_id=self.session_id, name=name)))
        return [history_from_wire(e) for e in reply.history]

    async def rollback_variable(self, name: str, version: int, optimizer_id: str | None = None) -> Variable:
        request = pb.RollbackVariableRequest(session_id=self.session_id, name=name, version=version, optimizer_id=optimizer_id or "")
        return self._absorb(await unary(self.client._stub.rollback_variable(request)))[0]

    async def add_dependency(self, dependent: str, dependency: str) -> Variable:
        request = pb.AddDependencyRequest(session_id=self.session_id, dependent=dependent, dependency=dependency)
        return self._absorb(await unary(self.client._stub.add_dependency(request)), versioned=False)[0]

    async def set_optimization(self, name: str, optimizer_id: str, *, active: bool) -> tuple[Variable, float]:
        """Take (or renew) or release the lock; the variable, and the lease the host gives the
        lock in seconds (0: it lasts until released)."""
        request = pb.OptimizationRequest(session_id=self.session_id, name=name, optimizer_id=optimizer_id)
        method = self.client._stub.start_optimization if active else self.client._stub.stop_optimization
        reply = await unary(method(request))
        return self._absorb(reply, versioned=False)[0], reply.lock_lease_seconds

    async def keep_optimization(self, name: str, optimizer_id: str, lease: float) -> None:
        """Renew a held lock every third of its ``lease`` until cancelled, so it lapses only if
        this worker dies. A failed renewal is tried again at the next one (if the lock was lost
        meanwhile, the holder's next write says so)."""
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.set_optimization(name, optimizer_id, active=True)
            except (OSError, GRPCError, TrioBridgeError):
                pass

    async def watch(self, names: list[str], include_initial: bool, buffer_size: int = DEFAULT_WATCH_BUFFER) -> AsyncIterator[VariableUpdate]:
        """Updates from the WatchVariables stream. A task reads the stream into a buffer of
        ``buffer_size`` updates as they come (so the host never waits for this reader), which
        coalesces like the host's watcher when the reader falls further behind."""
        request = pb.WatchVariablesRequest(session_id=self.session_id, names=list(names), include_initial=include_initial)
        metadata = {**self.client.metadata, WATCH_BUFFER_METADATA: str(buffer_size)}
        buffer = WatchBuffer(buffer_size)

        async def receive() -> None:
            try:
                async for batch in self.client._stub.watch_variables(request, metadata=metadata):
                    if batch.updates:  # an empty batch is a heartbeat
                        buffer.add([update_from_wire(u) for u in batch.updates])
            except GRPCError as exc:
                buffer.finish(failure(exc))
            except Exception as exc:
                buffer.finish(exc)
            else:
                buffer.finish()

        receiver = asyncio.ensure_future(receive())
        try:
            while updates := await buffer.take():
                for update in updates:
                    yield update
        finally:
            receiver.cancel()
            await asyncio.wait([receiver])


class WatchBuffer:
    """A worker-side watch's updates not taken yet: at most ``size`` changes (initial values
    come on top). Once more came, and until the reader takes them, it holds the latest update
    of each variable instead, whose ``coalesced`` counts the updates it stands for besides
    itself and whose ``old_value`` is the first's -- as the host's watcher does."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._updates: list[VariableUpdate] = []
        self._changes = 0
        self._overflowed = False
        self._done = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def add(self, updates: list[VariableUpdate]) -> None:
        self._updates.extend(updates)
        self._changes += sum(u.kind != "initial" for u in updates)
        if self._overflowed or self._changes > self.size:
            self._overflowed = True
            self._coalesce()
        self._ready.set()

    def finish(self, error: BaseException | None = None) -> None:
        self._done = True
        self._error = error
        self._ready.set()

    async def take(self) -> list[VariableUpdate]:
        """Wait for updates and take them all, oldest first; ``[]`` at the end (after what was
        pending); raises the stream's error after what was pending."""
        while not self._updates and not self._done:
            self._ready.clear()
            await self._ready.wait()
        updates, self._updates, self._changes, self._overflowed = self._updates, [], 0, False
        if not updates and self._error is not None:
            raise self._error
        return updates

    def _coalesce(self) -> None:
        initial = [u for u in self._updates if u.kind == "initial"]
        folded: dict[str, tuple[Any, VariableUpdate, int]] = {}  # name -> (first old_value, latest, count)
        for u in self._updates:
            if u.kind == "initial":
                continue
            first = folded.pop(u.name, None)  # re-inserted: ordered by each one's latest update
            folded[u.name] = (u.old_value, u, u.coalesced + 1) if first is None else (first[0], u, first[2] + u.coalesced + 1)
        latest = [dataclasses.replace(u, old_value=old_value, coalesced=count - 1) for old_value, u, count in folded.values()]
        self._updates = initial + latest
        self._changes = len(latest)
