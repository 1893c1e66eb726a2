"""Tool definitions <-> their wire message ``ToolSpec`` (both sides use this)."""

from __future__ import annotations

import json

from trio_bridge._core.failures import is_failure
from trio_bridge._core.tools import ToolDefinition
from trio_bridge._errors import EncodeError
from trio_bridge._wire.codec import encode, short_repr
from trio_bridge._wire.generated.trio_bridge import v1 as pb


def tool_spec(definition: ToolDefinition) -> pb.ToolSpec:
    """The wire form of a tool definition (defaults that cannot be encoded travel as their repr;
    the arguments' JSON Schema as compact JSON text)."""
    parameters = []
    for p in definition.parameters:
        try:
            default = None if p.required else encode(p.default, path=f"{definition.name}.{p.name} default", plane=None)
        except EncodeError:
            default = encode(_repr(p.default), plane=None)
        parameters.append(pb.ParameterSpec(name=p.name, type=p.type, required=p.required, default=default, description=p.description))
    schema = ""  # none: the peer derives a loose one from the parameters
    if definition.parameters_schema:
        try:
            schema = json.dumps(definition.parameters_schema, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):  # not JSON after all (a model's default, say)
            pass
    return pb.ToolSpec(
        name=definition.name, description=definition.description, parameters=parameters, streaming=definition.streaming,
        parameters_json_schema=schema,
    )


def _repr(default: object) -> str:
    """``repr(default)``; one that raises is named by its type (``short_repr``): a default's own
    ``__repr__`` must not fail the worker's Describe, and with it every tool."""
    try:
        return repr(default)
    except BaseException as exc:
        if not is_failure(exc, ()):
            raise
        return short_repr(default)
