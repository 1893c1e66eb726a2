"""Tool definitions, shared by both sides: derived from a callable's signature, type hints and
Google-style docstring (name, description, parameters, streaming flag), checked against call
arguments before a tool runs, and carried on the wire as ``ToolSpec``.

Worker tools are adapter methods; host tools are plain callables registered on the pool.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trio_bridge._errors import EncodeError, InvalidArgumentError
from trio_bridge._wire.codec import encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb

__all__ = ["ParameterDefinition", "ToolDefinition", "define_tool", "tool_spec"]

_NO_DEFAULT = inspect.Parameter.empty


@dataclass(frozen=True)
class ParameterDefinition:
    """One parameter of a tool, as derived from its signature."""

    name: str
    type: str
    required: bool
    default: Any = None
    description: str = ""
    check: Callable[[Any], bool] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ToolDefinition:
    """A tool bound to an adapter instance.

    Attributes:
        kind: ``"sync"``, ``"async"``, ``"generator"`` or ``"async_generator"``.
        context_parameter: the name of the parameter that receives the ``SessionContext``, if any.
    """

    name: str
    description: str
    parameters: tuple[ParameterDefinition, ...]
    kind: str
    function: Callable[..., Any] = field(repr=False)
    context_parameter: str | None = None
    accepts_any_keyword: bool = False

    @property
    def streaming(self) -> bool:
        return self.kind in ("generator", "async_generator")

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        """Check call arguments against the parameters before the tool runs.

        Returns:
            The arguments with defaults filled in.

        Raises:
            InvalidArgumentError: not a dict, a required argument missing, an unknown argument,
                or a value whose type does not fit a simple annotation (int, float, str, ...).
        """
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise InvalidArgumentError(
                f"tool {self.name!r}: arguments must be a dict of name -> value, not {type(arguments).__name__}"
            )
        known = {p.name for p in self.parameters}
        unknown = sorted(set(arguments) - known)
        if unknown and not self.accepts_any_keyword:
            raise InvalidArgumentError(
                f"tool {self.name!r}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"it takes {', '.join(map(repr, sorted(known))) or 'no arguments'}"
            )
        missing = [p.name for p in self.parameters if p.required and p.name not in arguments]
        if missing:
            raise InvalidArgumentError(
                f"tool {self.name!r}: missing required argument(s) {', '.join(map(repr, missing))}"
            )
        checked = dict(arguments)
        for p in self.parameters:
            if p.name in arguments:
                if p.check is not None and not p.check(arguments[p.name]):
                    raise InvalidArgumentError(
                        f"tool {self.name!r}: argument {p.name!r} must be {p.type}, "
                        f"not {type(arguments[p.name]).__name__}"
                    )
            elif not p.required:
                checked[p.name] = p.default
        return checked


def define_tool(method: Callable[..., Any], name: str, description: str | None) -> ToolDefinition:
    """Derive a tool from a callable (a bound adapter method or a host function).

    A parameter annotated ``SessionContext`` is not a tool parameter: it receives the call's
    context. Sync and async functions are tools; generators and async generators are
    streaming tools.

    Raises:
        ValueError: a parameter cannot be passed by keyword.
    """
    from trio_bridge.worker._context import SessionContext

    function = inspect.unwrap(method)
    if inspect.isasyncgenfunction(function):
        kind = "async_generator"
    elif inspect.isgeneratorfunction(function):
        kind = "generator"
    elif inspect.iscoroutinefunction(function):
        kind = "async"
    else:
        kind = "sync"
    doc = inspect.getdoc(method) or ""
    summary, arg_docs = _parse_docstring(doc)
    try:
        hints = typing.get_type_hints(method)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    parameters = []
    context_parameter = None
    accepts_any_keyword = False
    for p in inspect.signature(method).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if annotation is SessionContext or annotation == "SessionContext":
            context_parameter = p.name
            continue
        if p.kind is p.VAR_KEYWORD:
            accepts_any_keyword = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            raise ValueError(f"tool {name!r}: parameter {p.name!r} must be passable by keyword")
        parameters.append(
            ParameterDefinition(
                name=p.name,
                type=_annotation_text(annotation),
                required=p.default is _NO_DEFAULT,
                default=None if p.default is _NO_DEFAULT else p.default,
                description=arg_docs.get(p.name, ""),
                check=_checker(annotation),
            )
        )
    return ToolDefinition(
        name=name,
        description=description if description is not None else summary,
        parameters=tuple(parameters),
        kind=kind,
        function=method,
        context_parameter=context_parameter,
        accepts_any_keyword=accepts_any_keyword,
    )


def _annotation_text(annotation: Any) -> str:
    if annotation is _NO_DEFAULT:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__ if annotation.__module__ == "builtins" else f"{annotation.__module__}.{annotation.__qualname__}"
    return repr(annotation).replace("typing.", "")


_SIMPLE_CHECKS: dict[Any, Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    bytes: lambda v: isinstance(v, bytes),
    list: lambda v: isinstance(v, list),
    dict: lambda v: isinstance(v, dict),
}


def _checker(annotation: Any) -> Callable[[Any], bool] | None:
    """A cheap isinstance check for simple annotations; ``None`` means "not checked"."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        checks = [_checker(arg) if arg is not type(None) else (lambda v: v is None) for arg in typing.get_args(annotation)]
        if any(c is None for c in checks):
            return None
        return lambda v: any(c(v) for c in checks)  # type: ignore[misc]
    if origin in (list, tuple):  # a tuple arrives as a list
        return _SIMPLE_CHECKS[list]
    if origin is dict:
        return _SIMPLE_CHECKS[dict]
    if annotation is tuple:
        return _SIMPLE_CHECKS[list]
    if isinstance(annotation, type) and annotation.__module__ == "numpy" and annotation.__name__ == "ndarray":
        return lambda v: type(v).__name__ == "ndarray"
    return _SIMPLE_CHECKS.get(annotation)


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary paragraph and ``Args:`` descriptions."""
    lines = doc.splitlines()
    summary_lines = []
    for line in lines:
        if not line.strip():
            break
        summary_lines.append(line.strip())
    args: dict[str, str] = {}
    in_args = False
    current = None
    indent = None
    for line in lines:
        if _ARGS_HEADER.match(line.strip()) and not line.startswith(" "):
            in_args, current, indent = True, None, None
            continue
        if not in_args:
            continue
        if line.strip() and not line.startswith(" "):
            break  # the next section
        stripped = line.strip()
        if not stripped:
            continue
        this_indent = len(line) - len(line.lstrip())
        match = _ARG_LINE.match(stripped)
        if match and (indent is None or this_indent <= indent):
            indent = this_indent
            current = match.group(1).lstrip("*")
            args[current] = match.group(3).strip()
        elif current is not None:
            args[current] = (args[current] + " " + stripped).strip()
    return " ".join(summary_lines), args


def tool_spec(definition: ToolDefinition) -> pb.ToolSpec:
    """The wire form of a tool definition (defaults that cannot be encoded travel as their repr)."""
    parameters = []
    for p in definition.parameters:
        try:
            default = None if p.required else encode(p.default, path=f"{definition.name}.{p.name} default", plane=None)
        except EncodeError:
            default = encode(repr(p.default), plane=None)
        parameters.append(pb.ParameterSpec(name=p.name, type=p.type, required=p.required, default=default, description=p.description))
    return pb.ToolSpec(name=definition.name, description=definition.description, parameters=parameters, streaming=definition.streaming)
