"""Adapters and tools: the user's code that runs inside a worker process.

An :class:`Adapter` subclass holds state loaded once per process in :meth:`Adapter.setup`, and its
methods decorated with :func:`tool` are the tools the pool can call. A tool's name, description,
parameters (from the signature, type hints and a Google-style ``Args:`` docstring section) and
streaming flag are derived here and reported to the host at start.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trio_bridge._errors import InvalidArgumentError

__all__ = ["Adapter", "tool", "ToolDefinition", "ParameterDefinition", "load_adapter_class", "collect_tools"]

_MARKER = "__trio_bridge_tool__"
_NO_DEFAULT = inspect.Parameter.empty


class Adapter:
    """Base class for the code a worker hosts.

    Subclass it, load what every call needs in :meth:`setup` (it runs once per worker process,
    before the worker reports ready), and decorate methods with :func:`tool`::

        class Inference(Adapter):
            def setup(self):
                self.model = load_model()

            @tool(description="Predict one row")
            def predict(self, x: list[float]) -> dict: ...

    Sync tools run in the worker's thread pool (one thread per concurrency slot); ``async def``
    tools run on the worker's asyncio loop; generators and async generators are streaming tools.
    """

    def setup(self) -> None:
        """Load models and data once per worker process. May also be ``async def``."""


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


def tool(
    function: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Mark an adapter method as a tool. Use as ``@tool`` or ``@tool(name=..., description=...)``.

    Args:
        name: the tool's name (default: the method's name).
        description: what it does (default: the first paragraph of the docstring).
    """

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _MARKER, {"name": name or fn.__name__, "description": description})
        return fn

    return mark(function) if function is not None else mark


def load_adapter_class(path: str) -> type[Adapter]:
    """Import ``"package.module:ClassName"`` and return the class.

    Raises:
        ValueError: the path is not of that form, or the attribute is not an Adapter subclass.
        ImportError, AttributeError: from importing the module or finding the class.
    """
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"adapter must be given as 'package.module:ClassName', got {path!r}")
    module = importlib.import_module(module_name)
    cls = module
    for part in class_name.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ValueError(f"{path!r} is not a subclass of trio_bridge.worker.Adapter")
    return cls


def collect_tools(adapter: Adapter) -> dict[str, ToolDefinition]:
    """Derive the tools of an adapter instance, keyed by name."""
    tools: dict[str, ToolDefinition] = {}
    for attr in dir(type(adapter)):
        raw = getattr(type(adapter), attr, None)
        marker = getattr(raw, _MARKER, None)
        if marker is None:
            continue
        definition = _define(getattr(adapter, attr), marker["name"], marker["description"])
        if definition.name in tools:
            raise ValueError(f"two tools are named {definition.name!r}")
        tools[definition.name] = definition
    return tools


def _define(method: Callable[..., Any], name: str, description: str | None) -> ToolDefinition:
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
