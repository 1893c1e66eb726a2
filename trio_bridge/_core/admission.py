"""Whether a worker takes a tool call: the check every kind of worker makes before it runs one
(the worker process's service, ``trio_bridge/worker/_server.py``, and ``trio_bridge.testing``'s
fake and in-process workers). Pure and synchronous."""

from __future__ import annotations

from collections.abc import Container, Mapping

from trio_bridge._core.tools import ToolDefinition
from trio_bridge._errors import InvalidArgumentError, ToolNotFoundError


class Draining(Exception):
    """The worker is shutting down: it takes no new call (the wire says ``draining``: it did
    not start the call, and the pool runs it on another worker)."""


def admit_call(
    tools: Mapping[str, ToolDefinition], tool: str, *, streaming: bool, call_id: str, running: Container[str],
    draining: bool = False,
) -> ToolDefinition:
    """The definition of the tool a call runs, if the worker takes the call.

    Args:
        tools: the worker's tools by name. tool: the tool the call names.
        streaming: the call came as a stream (``ExecuteStreamingTool``) rather than unary.
        call_id: the call's id; running: the ids of the calls the worker runs now.
        draining: the worker is shutting down.

    Raises:
        Draining: ``draining``.
        InvalidArgumentError: an empty or duplicate call id (it keys the call's cancellation,
            slot and drain), or a streaming tool called as unary (or the other way round).
        ToolNotFoundError: no such tool (it names those there are).
    """
    if draining:
        raise Draining("the worker is shutting down")
    if not call_id:
        raise InvalidArgumentError("call_id is empty: every call needs an id unique among the running calls")
    if call_id in running:
        raise InvalidArgumentError(f"call_id {call_id!r} is already running on this worker")
    definition = tools.get(tool)
    if definition is None:
        raise ToolNotFoundError(tool, list(tools))
    if definition.streaming != streaming:
        hint = "pool.stream() (RPC ExecuteStreamingTool)" if definition.streaming else "pool.execute() (RPC ExecuteTool)"
        kind = "a streaming" if definition.streaming else "not a streaming"
        raise InvalidArgumentError(f"tool {definition.name!r} is {kind} tool; call it with {hint}")
    return definition
