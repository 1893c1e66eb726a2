"""Adapters and tools: the user's code that runs inside a worker process.

An :class:`Adapter` subclass holds state loaded once per process in :meth:`Adapter.setup`, and its
methods decorated with :func:`tool` are the tools the pool can call. A tool's name, description,
parameters (from the signature, type hints and a Google-style ``Args:`` docstring section) and
streaming flag are derived here and reported to the host at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar, overload

from trio_bridge._core.tools import ToolDefinition, check_inline, define_tool, tool_kind
from trio_bridge.worker._context import SessionContext

__all__ = ["Adapter", "AdapterLoadError", "check_adapter_path", "collect_tools", "load_adapter_class", "tool"]

_MARKER = "__trio_bridge_tool__"
F = TypeVar("F", bound=Callable[..., Any])


class Adapter:
    """Base class for the code a worker hosts.

    Subclass it, load what every call needs in :meth:`setup` (it runs once per worker process,
    before the worker reports ready), and decorate methods with :func:`tool`::

        class Inference(Adapter):
            def setup(self):
                self.model = load_model()

            @tool(description="Predict one row")
            def predict(self, x: list[float]) -> dict: ...

    Sync tools run in the worker's thread pool (one thread per concurrency slot), or on its
    event loop if short and marked ``@tool(inline=True)``; ``async def`` tools run on the
    worker's asyncio loop; generators and async generators are streaming tools.
    """

    #: Options given to the pool (``open_pool(..., adapter_options={...})``), set before setup().
    options: dict[str, Any] = {}  # noqa: RUF012 - replaced per instance by the worker

    def setup(self) -> None:
        """Load models and data once per worker process. May also be ``async def``."""

    def on_session_start(self, session_id: str, metadata: dict[str, Any]) -> None:
        """Called before a session's first call on this worker, with the session's metadata.
        May also be ``async def``. Runs on the worker's event loop: keep it quick."""

    def on_session_end(self, session_id: str) -> None:
        """Called when a session ends (cleaned up or expired): drop what you kept for it.
        May also be ``async def``. Runs on the worker's event loop: keep it quick."""


@overload
def tool(function: F) -> F: ...
@overload
def tool(
    function: None = None, *, name: str | None = None, description: str | None = None, inline: bool = False
) -> Callable[[F], F]: ...
def tool(
    function: F | None = None, *, name: str | None = None, description: str | None = None, inline: bool = False
) -> F | Callable[[F], F]:
    """Mark an adapter method as a tool. Use as ``@tool`` or ``@tool(name=..., description=...)``;
    the function is returned unchanged (with its type).

    Args:
        name: the tool's name (default: the method's name).
        description: what it does (default: the first paragraph of the docstring).
        inline: run this sync tool on the worker's event loop instead of handing it to a thread
            of the worker's pool: a call saves two thread switches (~100 us on asyncio's loop,
            ~50 us on uvloop's; a no-op ``pool.execute`` ~10% faster end to end). Only for
            short tools (microseconds, a millisecond at most): while an inline tool runs it
            blocks the worker's loop, so the worker does nothing else -- no other call starts
            or replies even with ``concurrency > 1``, the pool's health-check ping goes
            unanswered (a tool that outlasts the health check's timeout gets its worker
            recycled), and nothing cancels it. Deadlines: an inline tool is never interrupted
            (``ctx.cancelled`` stays False until it returns) and its result is sent even if the
            call's deadline passed meanwhile; by then the host, which enforces the deadline,
            has ended the call (the caller's cancel scope, e.g. ``trio.fail_after``, fired) and
            drops the late reply. The blocking ``SessionContext`` methods (fresh reads, writes,
            host and worker tool calls) raise ``RuntimeError`` in an inline tool, as in an
            async one; cached reads work.

    Raises:
        ValueError: ``inline=True`` on an async function, a generator or an async generator.
    """

    def mark(fn: F) -> F:
        if inline:
            check_inline(name or fn.__name__, tool_kind(fn))
        setattr(fn, _MARKER, {"name": name or fn.__name__, "description": description, "inline": inline})
        return fn

    return mark(function) if function is not None else mark


_PATH_HELP = "The adapter must be importable from the current directory or PYTHONPATH (package.module:ClassName)"


class AdapterLoadError(ValueError):
    """An adapter path that names no loadable :class:`Adapter` subclass. ``str()`` is one line
    that says what failed and how to fix it.

    Attributes:
        in_module_code: the adapter's module was found but its own code raised while it was
            imported (a bug or a missing dependency there): its traceback (``__cause__``) helps.
    """

    def __init__(self, message: str, *, in_module_code: bool = False) -> None:
        super().__init__(message)
        self.in_module_code: bool = in_module_code


def _split(path: str) -> tuple[str, str]:
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise AdapterLoadError(
            f"adapter {path!r} is not of the form package.module:ClassName (a ':' between the module and "
            f"the class, e.g. 'my_package.models:Classifier'). {_PATH_HELP}"
        )
    return module_name, class_name


def _not_found(path: str, module_name: str, exc: ModuleNotFoundError) -> AdapterLoadError | None:
    """The error to raise if ``exc`` says the path's own module (or a package above it) is missing."""
    missing = exc.name or ""
    if module_name == missing or module_name.startswith(f"{missing}."):
        return AdapterLoadError(f"cannot import module {module_name!r} for adapter {path!r}: {exc}. {_PATH_HELP}")
    return None


def check_adapter_path(path: str) -> None:
    """Check, without running the adapter's module, that ``path`` has the form
    ``"package.module:ClassName"`` and that its module can be found (its parent packages are
    imported). For a command line that starts workers: it says what is wrong before any does.

    Raises:
        AdapterLoadError: the path is not of that form, or its module cannot be found.
    """
    module_name, _ = _split(path)
    try:
        found = importlib.util.find_spec(module_name)
    except ModuleNotFoundError as exc:
        error = _not_found(path, module_name, exc)
        if error is None:
            raise AdapterLoadError(  # a parent package imports something missing
                f"importing the packages of {module_name!r} for adapter {path!r} failed: {type(exc).__name__}: {exc}",
                in_module_code=True,
            ) from exc
        raise error from exc
    except Exception as exc:  # a parent package's own code raised: the worker will say it in full
        raise AdapterLoadError(
            f"importing the packages of {module_name!r} for adapter {path!r} failed: {type(exc).__name__}: {exc}",
            in_module_code=True,
        ) from exc
    if found is None:
        raise AdapterLoadError(
            f"cannot import module {module_name!r} for adapter {path!r}: No module named {module_name!r}. {_PATH_HELP}"
        )


_CHECKED_HASH = 0b11  # a .pyc's flags: hash-based (bit 0), checked against the source (bit 1); PEP 552


def hash_checked_bytecode(module_name: str) -> None:
    """Make the cached bytecode of ``module_name`` (the adapter's module) checked against its
    source's hash, not its mtime and size: a module rewritten within the same second, at the
    same size, is then not served from stale bytecode (what ``Pool.reload`` relies on). Once
    per module: Python keeps a hash-checked ``.pyc`` hash-checked when it rewrites it. With
    ``PYTHONDONTWRITEBYTECODE`` the module's timestamp-checked ``.pyc``, if any, is removed
    instead (it is compiled from source then). Other modules keep Python's usual check.
    Anything in the way (no source, a read-only cache, a source that does not compile) is left
    to the import, which says what is wrong."""
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:
        return
    if spec is None or not spec.has_location or not spec.cached or not (spec.origin or "").endswith(".py"):
        return
    try:
        with open(spec.cached, "rb") as cached:
            flags = int.from_bytes(cached.read(8)[4:8], "little")
        if flags & _CHECKED_HASH == _CHECKED_HASH:
            return
    except OSError:
        if sys.dont_write_bytecode:
            return  # none to mistrust, none to write
    if not sys.dont_write_bytecode:
        import py_compile

        with contextlib.suppress(Exception):
            py_compile.compile(
                str(spec.origin), cfile=spec.cached, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
            )
            return
    with contextlib.suppress(OSError):  # possibly stale: the import compiles the source
        os.remove(spec.cached)


def load_adapter_class(path: str) -> type[Adapter]:
    """Import ``"package.module:ClassName"`` and return the class.

    Raises:
        AdapterLoadError: the path is not of that form, its module cannot be imported, the module
            has no such name, or the name is not an Adapter subclass (the cause is chained).
    """
    module_name, class_name = _split(path)
    if module_name not in sys.modules:
        hash_checked_bytecode(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        error = _not_found(path, module_name, exc)
        if error is not None:  # the path's own module is not there
            raise error from exc
        raise AdapterLoadError(  # the module imports something that is not installed
            f"importing module {module_name!r} for adapter {path!r} failed: {type(exc).__name__}: {exc} "
            "(a dependency of the adapter's module is missing: install it where the workers run)",
            in_module_code=True,
        ) from exc
    except Exception as exc:
        raise AdapterLoadError(
            f"importing module {module_name!r} for adapter {path!r} failed: {type(exc).__name__}: {exc} "
            "(its own code raised: see its traceback)",
            in_module_code=True,
        ) from exc
    cls: Any = module
    for part in class_name.split("."):
        if not hasattr(cls, part):
            found = sorted(
                name for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, Adapter) and value is not Adapter
            )
            has = f"its Adapter subclasses: {', '.join(found)}" if found else "it defines no Adapter subclass"
            raise AdapterLoadError(
                f"module {module_name!r} has no {class_name!r} for adapter {path!r} ({has}). "
                "Give the name of an Adapter subclass in it (package.module:ClassName)"
            )
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise AdapterLoadError(
            f"{path!r} is not a subclass of trio_bridge.worker.Adapter: give the name of an Adapter subclass "
            "(package.module:ClassName)"
        )
    return cls


# The tools of each adapter class's methods, derived once per process (see collect_tools).
_defined: dict[tuple[type, str], ToolDefinition] = {}


def collect_tools(adapter: Adapter) -> dict[str, ToolDefinition]:
    """Derive the tools of an adapter instance, keyed by name.

    A method's tool is derived once per class and process (signature, type hints, validators and
    JSON Schema: ~0.3 ms a tool) and bound to each instance; a fork-server worker inherits what
    its preload derived.
    """
    cls = type(adapter)
    tools: dict[str, ToolDefinition] = {}
    for attr in dir(cls):
        raw = getattr(cls, attr, None)
        marker = getattr(raw, _MARKER, None)
        if marker is None:
            continue
        method = getattr(adapter, attr)
        known = _defined.get((cls, attr))
        # The class's own method (not one set on the instance): the same tool as any instance's.
        shared = getattr(method, "__func__", None) is getattr(raw, "__func__", raw)
        if known is not None and shared:
            definition = dataclasses.replace(known, function=method)
        else:
            definition = define_tool(
                method, marker["name"], marker["description"], context_type=SessionContext, inline=marker.get("inline", False),
            )
            if shared:
                _defined[(cls, attr)] = definition
        if definition.name in tools:
            raise ValueError(f"two tools are named {definition.name!r}")
        tools[definition.name] = definition
    return tools
