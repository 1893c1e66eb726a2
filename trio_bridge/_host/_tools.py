"""The host's tool registry: worker tools (as workers report them) and host tools (callables
registered on the pool, globally or for one session), and running host tools for workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, final, get_args

import trio

from trio_bridge._core.tools import NOT_JSON, NUMERIC_ARRAY_REF, ToolDefinition, define_tool, json_value
from trio_bridge._errors import InvalidArgumentError, ToolNotFoundError
from trio_bridge._util import public_module
from trio_bridge._wire.codec import decode, encode, short_repr
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tool_spec import tool_spec

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
MAX_DESCRIPTION = 4096        # characters
MAX_METADATA_BYTES = 16_384   # encoded

#: ``ToolInfo.side``: an adapter's tool, or a callable registered on the pool.
ToolSide = Literal["worker", "host"]

#: ``Pool.tools(format=...)``: the shapes LLM APIs take tool lists in.
ToolFormat = Literal["openai", "anthropic", "mcp"]
TOOL_FORMATS: tuple[str, ...] = get_args(ToolFormat)

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
        parameters_schema: the arguments as one JSON Schema (draft 2020-12) object, made by
            pydantic from the same annotations the argument check uses:
            ``{"type": "object", "properties": {name: schema}, "required": [names],
            "additionalProperties": false}`` (no ``additionalProperties`` for a tool that takes
            ``**kwargs``; ``$defs`` where needed). A parameter pydantic cannot describe is ``{}``
            (any value), with a description saying so; numpy arrays are nested lists of numbers.
            From a worker that sends none (an older release): the parameters, any values.
    """

    name: str
    description: str
    parameters: tuple[ParameterInfo, ...]
    streaming: bool
    side: ToolSide = "worker"
    session_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    parameters_schema: dict[str, Any] = field(default_factory=dict, compare=False)

    def arguments_from_json(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` as an LLM or an MCP client gives them (parsed JSON), ready for
        ``pool.execute``: the nested lists given where :attr:`parameters_schema` has a numpy
        array (at any depth) become arrays (``numpy.asarray``: integers give int64, any float
        float64). Everything else is returned as it is: the pool's check says what does not fit.
        """
        if not isinstance(arguments, dict):
            return arguments  # the check says what is wrong
        properties = self.parameters_schema.get("properties", {})
        definitions = self.parameters_schema.get("$defs", {})
        return {k: _arrays(v, properties.get(k), definitions, 0) for k, v in arguments.items()}


@dataclass(frozen=True)
class HostTool:
    definition: ToolDefinition
    metadata: dict[str, Any]
    session_id: str | None

    def info(self) -> ToolInfo:
        return tool_info(tool_spec(self.definition), side="host", session_id=self.session_id, metadata=self.metadata)


def tool_info(spec: pb.ToolSpec, *, side: ToolSide = "worker", session_id: str | None = None, metadata: dict[str, Any] | None = None) -> ToolInfo:
    parameters = tuple(
        ParameterInfo(p.name, p.type, p.required, None if p.required else decode(p.default), p.description)
        for p in spec.parameters
    )
    return ToolInfo(
        name=spec.name,
        description=spec.description,
        parameters=parameters,
        streaming=spec.streaming,
        side=side,
        session_id=session_id,
        metadata=dict(metadata or {}),
        parameters_schema=_parameters_schema(spec.parameters_json_schema, parameters),
    )


def _parameters_schema(text: str, parameters: tuple[ParameterInfo, ...]) -> dict[str, Any]:
    """The spec's schema, or (none, or not a JSON object) one that names the parameters and
    takes any values: all a peer that sends none lets us say."""
    if text:
        try:
            schema = json.loads(text)
        except ValueError:
            schema = None
        if isinstance(schema, dict) and schema.get("type") == "object":
            return schema
    properties: dict[str, Any] = {}
    for p in parameters:
        prop: dict[str, Any] = {"description": p.description} if p.description else {}
        if not p.required and (default := json_value(p.default)) is not NOT_JSON:
            prop["default"] = default
        properties[p.name] = prop
    return {"type": "object", "properties": properties, "required": [p.name for p in parameters if p.required]}


def _arrays(value: Any, schema: Any, definitions: dict[str, Any], depth: int) -> Any:
    """``value`` with numpy arrays for the nested lists where ``schema`` says one goes."""
    if not isinstance(schema, dict) or depth > 64:
        return value
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref != NUMERIC_ARRAY_REF:
        return _arrays(value, definitions.get(ref.removeprefix("#/$defs/")), definitions, depth + 1)
    if isinstance(value, list) and schema.get("items") == {"$ref": NUMERIC_ARRAY_REF}:
        import numpy as np

        try:
            array = np.asarray(value)
        except (ValueError, TypeError):  # ragged: the check says what is wrong
            return value
        return array if array.dtype.kind in "biuf" else value
    for branch in schema.get("anyOf", ()):
        converted = _arrays(value, branch, definitions, depth + 1)
        if converted is not value:
            return converted
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_arrays(v, schema["items"], definitions, depth + 1) for v in value]
    if isinstance(value, dict) and ("properties" in schema or isinstance(schema.get("additionalProperties"), dict)):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {k: _arrays(v, properties.get(k, extra), definitions, depth + 1) for k, v in value.items()}
    return value


_STREAMING_NOTE = "(A streaming tool: its result is the list of its chunks.)"


def tool_dicts(tools: list[ToolInfo], format: str) -> list[dict[str, Any]]:
    """``tools`` in the shape an LLM API takes (see ``Pool.tools``). A host tool named like a
    worker tool is left out: a call by that name runs the worker tool.

    Raises:
        InvalidArgumentError: ``format`` is not one of :data:`TOOL_FORMATS`.
    """
    if format not in TOOL_FORMATS:
        raise InvalidArgumentError(f"format must be None or one of {', '.join(map(repr, TOOL_FORMATS))}, not {short_repr(format)}")
    worker_names = {t.name for t in tools if t.side == "worker"}
    shaped = []
    for t in tools:
        if t.side == "host" and t.name in worker_names:
            continue
        description = f"{t.description} {_STREAMING_NOTE}".strip() if t.streaming else t.description
        schema = t.parameters_schema or {"type": "object", "properties": {}}
        if format == "openai":  # Chat Completions' "tools"
            shaped.append({"type": "function", "function": {"name": t.name, "description": description, "parameters": schema}})
        elif format == "anthropic":  # the Messages API's "tools"
            shaped.append({"name": t.name, "description": description, "input_schema": schema})
        else:  # MCP's Tool, as tools/list sends it
            shaped.append({"name": t.name, "description": description, "inputSchema": schema})
    return shaped


class ToolRegistry:
    """Worker tools and host tools by name. Host tools live in one namespace per session on top
    of the global one; a name may not be used twice where a caller could see both. Worker tools
    are a namespace of their own."""

    def __init__(self) -> None:
        self.worker_tools: Mapping[str, ToolInfo] = {}
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


async def call_host_tool_here(tool: HostTool, arguments: dict[str, Any] | None) -> Any:
    """Check ``arguments`` and run a host tool here on the host (a streaming one's chunks
    collected into a list).

    Raises:
        InvalidArgumentError: the arguments do not fit. What the tool raises, as itself.
    """
    checked = tool.definition.check_arguments(arguments)
    if tool.definition.streaming:
        async with contextlib.aclosing(iterate_host_tool(tool, checked)) as chunks:
            return [chunk async for chunk in chunks]
    return await run_host_tool(tool, checked)


async def run_host_tool(tool: HostTool, arguments: dict[str, Any]) -> Any:
    """Call a non-streaming host tool: async ones on the Trio loop, sync ones in a thread (so a
    slow one cannot stall the host)."""
    function = tool.definition.function
    if tool.definition.kind == "async":
        return await function(**arguments)
    return await trio.to_thread.run_sync(partial(function, **arguments))


async def iterate_host_tool(tool: HostTool, arguments: dict[str, Any]) -> AsyncGenerator[Any, None]:
    """Chunks of a streaming host tool. A sync generator advances in a thread, one item at a
    time, and is closed there (its ``finally`` blocks are its code too: they cannot stall the
    host); closing the iterator waits for that close, even when cancelled."""
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
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(generator.close)
