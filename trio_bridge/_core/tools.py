"""Tool definitions, shared by both sides: derived from a callable's signature, type hints and
Google-style docstring (name, description, parameters, streaming flag), checked against call
arguments before a tool runs. Their wire form (``ToolSpec``) is in ``_wire/tool_spec.py``.

Worker tools are adapter methods; host tools are plain callables registered on the pool.

Arguments are checked in depth with pydantic: one ``TypeAdapter`` per annotated parameter, built
when the tool is defined. Scalars are strict (no ``"1.5"`` for a float, no ``1.0`` or ``True``
for an int; an int is a fine float), containers are lax (a list is a fine tuple: tuples travel
as lists). ``Any``, ``object``, unannotated parameters and annotations pydantic cannot handle are
not checked. Checking never converts: the tool gets the values as they were sent.

The same adapters describe the arguments as one JSON Schema object (draft 2020-12, see
:attr:`ToolDefinition.parameters_schema`), for LLM programs and MCP clients.
"""

from __future__ import annotations

import collections.abc
import copy
import inspect
import json
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, cast

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import short_repr

__all__ = [
    "NUMERIC_ARRAY_REF", "ParameterDefinition", "ToolDefinition", "arguments_schema", "check_inline", "define_tool", "tool_kind",
]

_NO_DEFAULT = inspect.Parameter.empty

T = TypeVar("T")


@dataclass(frozen=True)
class ParameterDefinition:
    """One parameter of a tool, as derived from its signature."""

    name: str
    type: str
    required: bool
    default: Any = None
    description: str = ""
    #: returns what is wrong with a value (``"[0]: expected a number, got 'a'"``), or None if
    #: it fits; None: not checked
    check: Callable[[Any], str | None] | None = field(default=None, repr=False, compare=False)
    #: the JSON Schema of its values (shared between tools: copy before changing it); ``{}``: any
    #: value; None: its annotation has none (pydantic cannot describe it)
    schema: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ToolDefinition:
    """A tool bound to an adapter instance.

    Attributes:
        kind: ``"sync"``, ``"async"``, ``"generator"`` or ``"async_generator"``.
        context_parameter: the name of the parameter that receives the ``SessionContext``, if any.
        inline: a sync tool that runs on the worker's event loop, not in a thread (``@tool(inline=True)``).
        parameters_schema: the arguments as one JSON Schema (draft 2020-12) object (see
            :func:`arguments_schema`); treat it as read-only.
    """

    name: str
    description: str
    parameters: tuple[ParameterDefinition, ...]
    kind: str
    function: Callable[..., Any] = field(repr=False)
    context_parameter: str | None = None
    accepts_any_keyword: bool = False
    inline: bool = False
    parameters_schema: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def streaming(self) -> bool:
        return self.kind in ("generator", "async_generator")

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        """Check call arguments against the parameters before the tool runs.

        Returns:
            The arguments with defaults filled in.

        Raises:
            InvalidArgumentError: not a dict, a required argument missing, an unknown argument,
                or a value that does not fit its parameter's annotation, at any depth; the
                message names the tool, the argument and where in it, e.g.
                ``tool 'predict': argument 'x'[0]: expected a number, got 'a'``.
        """
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise InvalidArgumentError(
                f"tool {self.name!r}: arguments must be a dict of name -> value, not {type(arguments).__name__}"
            )
        known = {p.name for p in self.parameters}
        unknown = sorted(short_repr(name) for name in arguments if name not in known)
        if unknown and not self.accepts_any_keyword:
            raise InvalidArgumentError(
                f"tool {self.name!r}: unknown argument(s) {', '.join(unknown)}; "
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
                value = arguments[p.name]
                if p.check is None or (value is None and not p.required and p.default is None):
                    continue  # ``x: float = None`` takes None
                problem = p.check(value)
                if problem is not None:
                    raise InvalidArgumentError(f"tool {self.name!r}: argument {p.name!r}{problem}")
            elif not p.required:
                checked[p.name] = p.default
        return checked


def tool_kind(method: Callable[..., Any]) -> str:
    """``"sync"``, ``"async"``, ``"generator"`` or ``"async_generator"`` (see :class:`ToolDefinition`)."""
    function = inspect.unwrap(method)
    if inspect.isasyncgenfunction(function):
        return "async_generator"
    if inspect.isgeneratorfunction(function):
        return "generator"
    if inspect.iscoroutinefunction(function):
        return "async"
    return "sync"


def check_inline(name: str, kind: str) -> None:
    """Refuse ``inline`` for a tool of any other :func:`tool_kind` than ``"sync"``.

    Raises:
        ValueError: an async function, a generator or an async generator.
    """
    if kind != "sync":
        what = {"async": "an async function", "generator": "a generator", "async_generator": "an async generator"}[kind]
        raise ValueError(f"tool {name!r}: only a plain sync function can be inline, not {what}")


def define_tool(
    method: Callable[..., Any], name: str, description: str | None, *, context_type: type | None = None,
    inline: bool = False,
) -> ToolDefinition:
    """Derive a tool from a callable (a bound adapter method or a host function).

    A parameter annotated ``context_type`` (the worker passes its ``SessionContext``) is not a
    tool parameter: it receives the call's context. Sync and async functions are tools;
    generators and async generators are streaming tools. ``inline``: see :class:`ToolDefinition`.

    Raises:
        ValueError: a parameter cannot be passed by keyword, or ``inline`` for a tool that is
            not a plain sync function.
    """
    function = inspect.unwrap(method)
    kind = tool_kind(function)
    if inline:
        check_inline(name, kind)
    doc = inspect.getdoc(method) or ""
    summary, arg_docs = _parse_docstring(doc)
    try:
        hints = typing.get_type_hints(method, include_extras=True)
    except Exception:  # an unresolvable forward reference: resolve the others one by one
        hints = {}
        namespace = getattr(function, "__globals__", {})
        for p in inspect.signature(method).parameters.values():
            if isinstance(p.annotation, str):
                try:
                    hints[p.name] = eval(p.annotation, dict(namespace))  # what get_type_hints does
                except Exception:
                    pass  # stays a string: not checked
    parameters = []
    context_parameter = None
    accepts_any_keyword = False
    for p in inspect.signature(method).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if context_type is not None and (annotation is context_type or annotation == context_type.__name__):
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
                type=_annotation_text(typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation),
                required=p.default is _NO_DEFAULT,
                default=None if p.default is _NO_DEFAULT else p.default,
                description=arg_docs.get(p.name, ""),
                check=_cached_validator(annotation),
                schema=_cached_schema(annotation),
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
        inline=inline,
        parameters_schema=arguments_schema(parameters, accepts_any_keyword=accepts_any_keyword),
    )


def _annotation_text(annotation: Any) -> str:
    if annotation is _NO_DEFAULT:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__ if annotation.__module__ == "builtins" else f"{annotation.__module__}.{annotation.__qualname__}"
    return repr(annotation).replace("typing.", "")


def _per_annotation(build: Callable[[Any], T]) -> Callable[[Any], T]:
    """``build``, run once per annotation and process (an unhashable annotation -- an
    ``Annotated`` with a list in it, say -- is built each time). A pydantic ``TypeAdapter`` costs
    ~2 ms per tool parameter, and a fork-server worker inherits what its preload built."""
    built: dict[Any, T] = {}

    def cached(annotation: Any) -> T:
        try:
            return built[annotation]
        except KeyError:
            result = built[annotation] = build(annotation)
            return result
        except TypeError:
            return build(annotation)

    return cached


def _adapter(annotation: Any) -> Any:
    """The pydantic ``TypeAdapter`` of ``annotation`` (strict scalars) that both its check and its
    JSON Schema come from (see :func:`_cached_adapter`); ``None`` for ``Any``, ``object``, no
    annotation, unresolved string annotations, and anything pydantic cannot build a schema for."""
    if annotation is _NO_DEFAULT or annotation is Any or annotation is object or isinstance(annotation, str):
        return None
    from pydantic import ConfigDict, TypeAdapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for config in (ConfigDict(arbitrary_types_allowed=True), None):  # models refuse a config
            try:
                return TypeAdapter(_strict_scalars(annotation), config=config)
            except Exception:
                continue
    return None


def _validator(annotation: Any) -> Callable[[Any], str | None] | None:
    """A checker for values of ``annotation`` (see :attr:`ParameterDefinition.check`), built
    once; ``None`` (not checked) where :func:`_cached_adapter` has no adapter."""
    adapter = _cached_adapter(annotation)
    if adapter is None:
        return None
    from pydantic import ValidationError

    def check(value: Any) -> str | None:
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            return _explain(exc, value)
        except BaseException as exc:  # a user validator or a pathological value: still a clean error
            if not is_failure(exc, ()):
                raise
            return f": could not be checked: {type(exc).__name__}: {short_repr(exception_text(exc))}"
        return None

    return check


_STRICT_SCALARS: dict[Any, Any] = {}
_CONTAINERS = frozenset({
    list, tuple, dict, set, frozenset, collections.abc.Sequence, collections.abc.MutableSequence,
    collections.abc.Mapping, collections.abc.MutableMapping, collections.abc.Iterable,
    collections.abc.Collection, collections.abc.Set, collections.abc.MutableSet,
})


def _strict_scalars(annotation: Any) -> Any:
    """``annotation`` with int, float, str, bool and bytes made strict wherever they appear in
    unions, ``Annotated`` and the standard containers (which stay lax: a list fits a tuple)."""
    from pydantic import Strict

    if not _STRICT_SCALARS:
        _STRICT_SCALARS.update({t: Annotated[t, Strict()] for t in (int, float, str, bool, bytes)})
    try:
        if annotation in _STRICT_SCALARS:
            return _STRICT_SCALARS[annotation]
    except TypeError:  # unhashable metadata somewhere
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if not args:
        return annotation
    try:
        if origin is Annotated:
            return Annotated[(_strict_scalars(args[0]), *annotation.__metadata__)]  # type: ignore[attr-defined]
        if origin in (typing.Union, types.UnionType):
            return typing.Union[tuple(_strict_scalars(arg) for arg in args)]  # noqa: UP007
        if origin in _CONTAINERS:
            new = tuple(arg if arg is Ellipsis else _strict_scalars(arg) for arg in args)
            return cast(Any, origin)[new if len(new) != 1 else new[0]]  # args is not empty
    except Exception:
        pass
    return annotation


# ---- the arguments as JSON Schema (for LLM programs and MCP clients) ----

#: The ``$ref`` of a numpy array's JSON form in :attr:`ToolDefinition.parameters_schema`: a
#: number or a list of them, nested (``{"type": "array", "items": {"$ref": NUMERIC_ARRAY_REF}}``
#: is an array parameter). A JSON caller's nested lists become an array again with ``numpy.asarray``.
NUMERIC_ARRAY_REF = "#/$defs/NumericArray"
_NUMERIC_ARRAY = {
    "anyOf": [{"type": "number"}, {"type": "array", "items": {"$ref": NUMERIC_ARRAY_REF}}],
    "description": "a numpy array as JSON: nested lists of numbers",
}
_ARRAY_MARK = "x-trio-bridge-numeric-array"  # the generator's placeholder, replaced before anyone sees it
_GENERATOR: list[Any] = []
#: What :func:`json_value` gives for a value that JSON cannot hold.
NOT_JSON = object()


def arguments_schema(parameters: collections.abc.Sequence[ParameterDefinition], *, accepts_any_keyword: bool = False) -> dict[str, Any]:
    """A tool's arguments as one JSON Schema (draft 2020-12) object, from its parameters' schemas
    (see :attr:`ParameterDefinition.schema`)::

        {"type": "object", "properties": {name: schema, ...}, "required": [names],
         "additionalProperties": false, "$defs": {...}}

    ``additionalProperties`` is left out when the tool takes ``**kwargs``, ``$defs`` when no
    parameter needs them (pydantic models' are gathered there, renamed if two differ). Each
    property carries the docstring's description of its parameter and its default where that
    is JSON; a parameter whose annotation has no JSON Schema is ``{}`` (any value) with a
    description saying so. A parameter that defaults to None takes null, as the check lets it.
    """
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for p in parameters:
        properties[p.name] = _property_schema(p, defs)
    schema: dict[str, Any] = {
        "type": "object", "properties": properties, "required": [p.name for p in parameters if p.required],
    }
    if not accepts_any_keyword:
        schema["additionalProperties"] = False
    if defs:
        schema["$defs"] = defs
    return schema


def _property_schema(p: ParameterDefinition, defs: dict[str, Any]) -> dict[str, Any]:
    notes = []
    if p.schema is None:
        prop: dict[str, Any] = {}
        notes.append(f"its type, {p.type or '?'}, has no JSON Schema: any value is shown here, the tool checks it")
    else:
        prop = copy.deepcopy(p.schema)
        _hoist_definitions(prop, prop.pop("$defs", {}), defs)
        if _refers_to(prop, NUMERIC_ARRAY_REF, defs):
            notes.append("numpy arrays are given as nested lists of numbers")
    base = p.description or prop.pop("description", "")
    description = " ".join([base, *(f"({n})" for n in notes)]) if base else "; ".join(notes)
    if p.description:
        prop.pop("description", None)
    if not p.required and p.default is None and p.check is not None and p.check(None) is not None:
        prop = {"anyOf": [prop, {"type": "null"}]}  # ``x: float = None`` takes None: see check_arguments
    if description:
        prop["description"] = description
    if not p.required and (default := json_value(p.default)) is not NOT_JSON:
        prop["default"] = default
    return prop


def json_value(value: Any) -> Any:
    """``value`` as JSON holds it (a tuple as a list), or ``NOT_JSON``."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return NOT_JSON


def _hoist_definitions(prop: dict[str, Any], own: dict[str, Any], defs: dict[str, Any]) -> None:
    """Move one parameter's ``$defs`` into the tool's, renaming those that clash with a
    different definition of the same name (two models called ``Point``) and their ``$ref``s."""
    renames: dict[str, str] = {}
    for name, definition in own.items():
        if name in defs and defs[name] != definition:
            n = 2
            while f"{name}{n}" in defs or f"{name}{n}" in own:
                n += 1
            renames[f"#/$defs/{name}"] = f"#/$defs/{name}{n}"
    if renames:
        for node in (prop, *own.values()):
            _rename_refs(node, renames)
    for name, definition in own.items():
        defs[renames.get(f"#/$defs/{name}", f"#/$defs/{name}").removeprefix("#/$defs/")] = definition


def _rename_refs(node: Any, renames: dict[str, str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str) and node["$ref"] in renames:
            node["$ref"] = renames[node["$ref"]]
        for value in node.values():
            _rename_refs(value, renames)
    elif isinstance(node, list):
        for value in node:
            _rename_refs(value, renames)


def _refers_to(node: Any, ref: str, defs: dict[str, Any], seen: set[str] | None = None) -> bool:
    """Whether ``node`` uses ``ref``, directly or through the definitions it refers to."""
    seen = set() if seen is None else seen
    if isinstance(node, dict):
        target = node.get("$ref")
        if target == ref:
            return True
        if isinstance(target, str) and target not in seen and target.startswith("#/$defs/"):
            seen.add(target)
            if _refers_to(defs.get(target.removeprefix("#/$defs/")), ref, defs, seen):
                return True
        return any(_refers_to(value, ref, defs, seen) for value in node.values())
    if isinstance(node, list):
        return any(_refers_to(value, ref, defs, seen) for value in node)
    return False


def _schema(annotation: Any) -> dict[str, Any] | None:
    """The JSON Schema of values of ``annotation``, from the adapter its check uses (so both
    agree): ``{}`` (any value) for ``Any``, ``object`` and no annotation; None where pydantic has
    none (an arbitrary class, an unresolved string annotation). Numpy arrays are described as
    nested lists of numbers (``$defs`` ``NumericArray``, see :data:`NUMERIC_ARRAY_REF`)."""
    if annotation is _NO_DEFAULT or annotation is Any or annotation is object:
        return {}
    adapter = _cached_adapter(annotation)
    if adapter is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "default not JSON serializable": left out, fine
            schema = adapter.json_schema(schema_generator=_schema_generator())
    except Exception:
        return None
    marked = [False]
    schema = _replace_array_marks(schema, marked)
    if marked[0]:
        schema.setdefault("$defs", {})["NumericArray"] = copy.deepcopy(_NUMERIC_ARRAY)
    return schema


def _replace_array_marks(node: Any, marked: list[bool]) -> Any:
    if isinstance(node, dict):
        if node.get(_ARRAY_MARK):
            marked[0] = True
            rest = {k: v for k, v in node.items() if k != _ARRAY_MARK}
            return {"type": "array", "items": {"$ref": NUMERIC_ARRAY_REF}, **rest}
        return {k: _replace_array_marks(v, marked) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_array_marks(v, marked) for v in node]
    return node


def _schema_generator() -> Any:
    """pydantic's JSON Schema generator, taught numpy arrays (an ``isinstance`` check, which
    it cannot describe); made on first use (pydantic is imported lazily)."""
    if not _GENERATOR:
        from pydantic.json_schema import GenerateJsonSchema

        class Generator(GenerateJsonSchema):
            def is_instance_schema(self, schema: Any) -> Any:
                cls = schema["cls"]
                if getattr(cls, "__module__", None) == "numpy" and getattr(cls, "__name__", None) == "ndarray":
                    return {_ARRAY_MARK: True}
                return super().is_instance_schema(schema)

        _GENERATOR.append(Generator)
    return _GENERATOR[0]


_EXPECTED = {
    "float_type": "a number", "int_type": "an integer", "string_type": "a string", "bool_type": "a boolean",
    "bytes_type": "bytes", "list_type": "a list", "tuple_type": "a list (for a tuple)", "dict_type": "a dict",
    "set_type": "a set", "frozen_set_type": "a frozenset", "none_required": "None",
    "model_type": "a dict (for a model)", "dataclass_type": "a dict (for a dataclass)",
}


def _explain(exc: Any, value: Any) -> str:
    """The deepest place a pydantic ``ValidationError`` points at, as ``"[0]: expected a number,
    got 'a'"`` (what each union member expected, joined with "or")."""
    places: dict[str, list[dict[str, Any]]] = {}
    depth: dict[str, int] = {}
    for error in exc.errors():
        where, steps = _where(value, error.get("loc", ()), missing=error.get("type") == "missing")
        places.setdefault(where, []).append(error)
        depth[where] = steps
    where = max(places, key=lambda w: depth[w])
    expected: list[str] = []
    other: list[str] = []
    for error in places[where]:
        kind = error.get("type", "")
        if kind == "is_instance_of":
            text = f"an instance of {(error.get('ctx') or {}).get('class', '?')}"
        elif kind == "float_type" and isinstance(error.get("input"), int) and not isinstance(error.get("input"), bool):
            text = "a number that fits a float (this integer is too large)"
        else:
            text = _EXPECTED.get(kind, "")
        if text:
            if text not in expected:
                expected.append(text)
        else:
            message = str(error.get("msg", kind))
            message = message[:1].lower() + message[1:]
            if message not in other:
                other.append(message)
    parts = ([f"expected {' or '.join(expected)}"] if expected else []) + other
    if all(error.get("type") == "missing" for error in places[where]):
        return f"{where}: missing"
    return f"{where}: {'; '.join(parts)}, got {short_repr(places[where][0].get('input'))}"


def _where(value: Any, loc: Any, *, missing: bool = False) -> tuple[str, int]:
    """Render a pydantic error location by following it through the value: list indexes and
    dict keys are kept, union-member tags (``'int'``, ``'list[float]'``) are dropped (and so is
    the last step of a ``missing`` error, which the value does not have: it is shown as is)."""
    parts: list[str] = []
    current, steps = value, 0
    for index, item in enumerate(loc):
        if missing and index == len(loc) - 1:
            parts.append(f"[{json.dumps(item, ensure_ascii=False) if isinstance(item, str) else short_repr(item)}]")
            steps += 1
            break
        if item == "[key]":
            parts.append(" (its key)")
            steps += 1
            continue
        if isinstance(current, dict):
            try:
                found = item in current
            except TypeError:
                found = False
            if found:
                parts.append(f"[{json.dumps(item, ensure_ascii=False) if isinstance(item, str) else short_repr(item)}]")
                current, steps = current[item], steps + 1
            continue
        if isinstance(item, int) and not isinstance(current, (str, bytes)):
            try:
                current = current[item]
            except Exception:
                continue
            parts.append(f"[{item}]")
            steps += 1
    return "".join(parts), steps


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


_cached_adapter = _per_annotation(_adapter)
_cached_validator = _per_annotation(_validator)
_cached_schema = _per_annotation(_schema)
