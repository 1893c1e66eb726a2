"""The host's tool registry: worker tools (as workers report them) and host tools (callables
registered on the pool, globally or for one session), and running host tools for workers.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, final

import trio

from trio_bridge._core.tools import ToolDefinition, define_tool
from trio_bridge._errors import InvalidArgumentError, ToolNotFoundError
from trio_bridge._util import public_module
from trio_bridge._wire.codec import decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tool_spec import tool_spec

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
MAX_DESCRIPTION = 4096        # characters
MAX_METADATA_BYTES = 16_384   # encoded

#: ``ToolInfo.side``: an adapter's tool, or a callable registered on the pool.
ToolSide = Literal["worker", "host"]

#: Set while a host tool (or a routed worker-to-worker call) runs on behalf of a worker call:
#: a pool call made from there is re-entrant (see ``Pool._check_reentrancy``).
in_worker_callback: contextvars.ContextVar[bool] = contextvars.ContextVar("trio_bridge_in_worker_callback", default=False)


@final
@public_module
@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a tool: ``type`` is the annotation as text (``""`` if none)."""

    name: str
    type: str
    required: bool
    default: Any
    description: str


@final
@public_module
@dataclass(frozen=True)
class ToolInfo:
    """A tool as listed by :meth:`Pool.tools`.

    Attributes:
        side: ``"worker"`` (an adapter's tool) or ``"host"`` (a callable registered on the pool).
        session_id: for a host tool registered on one session, that session; else ``None``.
    """

    name: str
    description: str
    parameters: tuple[ParameterInfo, ...]
    streaming: bool
    side: ToolSide = "worker"
    session_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class HostTool:
    definition: ToolDefinition
    metadata: dict[str, Any]
    session_id: str | None

    def info(self) -> ToolInfo:
        return tool_info(tool_spec(self.definition), side="host", session_id=self.session_id, metadata=self.metadata)


def tool_info(spec: pb.ToolSpec, *, side: ToolSide = "worker", session_id: str | None = None, metadata: dict[str, Any] | None = None) -> ToolInfo:
    return ToolInfo(
        name=spec.name,
        description=spec.description,
        parameters=tuple(
            ParameterInfo(p.name, p.type, p.required, None if p.required else decode(p.default), p.description)
            for p in spec.parameters
        ),
        streaming=spec.streaming,
        side=side,
        session_id=session_id,
        metadata=dict(metadata or {}),
    )


class ToolRegistry:
    """Worker tools and host tools by name. Host tools live in one namespace per session on top
    of the global one; a name may not be used twice where a caller could see both. Worker tools
    are a namespace of their own."""

    def __init__(self) -> None:
        self.worker_tools: dict[str, pb.ToolSpec] = {}
        self._global: dict[str, HostTool] = {}
        self._sessions: dict[str, dict[str, HostTool]] = {}

    def register(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        streaming: bool | None = None,
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> HostTool:
        """Validate and register a host tool.

        Raises:
            InvalidArgumentError: bad name (``^[A-Za-z][A-Za-z0-9_.-]{0,63}$``), a name already
                taken by a host tool the same callers can see (worker tools are a separate
                namespace: they are called with ``execute``/``call_tool``), a description
                over 4,096 characters, metadata over 16 KiB encoded, or a ``streaming`` flag
                that contradicts the callable (streaming tools are generators).
        """
        name = name or getattr(function, "__name__", "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgumentError(f"invalid tool name {name!r}: it must match ^[A-Za-z][A-Za-z0-9_.-]{{0,63}}$")
        try:
            definition = define_tool(function, name, description)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if len(definition.description) > MAX_DESCRIPTION:
            raise InvalidArgumentError(f"tool {name!r}: description is {len(definition.description):,} characters, over {MAX_DESCRIPTION:,}")
        if streaming is not None and streaming != definition.streaming:
            raise InvalidArgumentError(
                f"tool {name!r}: streaming={streaming} but the callable is "
                f"{'a generator' if definition.streaming else 'not a generator'} (streaming tools are generators)"
            )
        metadata = dict(metadata or {})
        encoded = encode(metadata, path=f"tool {name!r} metadata")
        if len(encoded.json) + sum(map(len, encoded.blobs)) > MAX_METADATA_BYTES:
            raise InvalidArgumentError(f"tool {name!r}: metadata is over {MAX_METADATA_BYTES:,} bytes encoded")
        clashes = [self._global] if session_id is not None else [self._global, *self._sessions.values()]
        if session_id is not None:
            clashes.append(self._sessions.get(session_id, {}))
        if any(name in tools for tools in clashes):
            raise InvalidArgumentError(f"a host tool named {name!r} is already registered")
        tool = HostTool(definition, metadata, session_id)
        (self._sessions.setdefault(session_id, {}) if session_id is not None else self._global)[name] = tool
        return tool

    def drop_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def host_tool(self, name: str, session_id: str) -> HostTool:
        """The host tool ``name`` as a call in ``session_id`` sees it.

        Raises:
            ToolNotFoundError: naming the host tools that call can see.
        """
        tool = self._sessions.get(session_id, {}).get(name) or self._global.get(name)
        if tool is None:
            raise ToolNotFoundError(name, [t.definition.name for t in self.host_tools(session_id)])
        return tool

    def host_tools(self, session_id: str | None) -> list[HostTool]:
        tools = dict(self._global)
        if session_id:
            tools.update(self._sessions.get(session_id, {}))
        return [tools[name] for name in sorted(tools)]


async def run_host_tool(tool: HostTool, arguments: dict[str, Any]) -> Any:
    """Call a non-streaming host tool: async ones on the Trio loop, sync ones in a thread (so a
    slow one cannot stall the host)."""
    function = tool.definition.function
    if tool.definition.kind == "async":
        return await function(**arguments)
    return await trio.to_thread.run_sync(partial(function, **arguments))


async def iterate_host_tool(tool: HostTool, arguments: dict[str, Any]) -> AsyncIterator[Any]:
    """Chunks of a streaming host tool. A sync generator advances in a thread, one item at a time."""
    generator = tool.definition.function(**arguments)
    if tool.definition.kind == "async_generator":
        try:
            async for item in generator:
                yield item
        finally:
            await generator.aclose()
        return
    done = object()
    try:
        while (item := await trio.to_thread.run_sync(next, generator, done)) is not done:
            yield item
    finally:
        generator.close()
