"""Ready-made adapters. :class:`PythonAdapter`: call any Python in the workers.

Open a pool with it and say which modules may be used (nothing is allowed by default)::

    async with trio_bridge.open_pool(
        "trio_bridge.adapters:PythonAdapter", adapter_options={"allow": ["numpy", "sklearn"]}
    ) as pool:
        await pool.call("numpy.linalg.norm", [3, 4])                          # 5.0
        async with pool.session() as session:
            await session.call("sklearn.linear_model.LogisticRegression", store_as="clf", max_iter=500)
            await session.call("stored.clf.fit", X, y)
            predictions = await session.call("stored.clf.predict", X_test)

Objects kept with ``store_as`` live in the worker that serves the session (its calls go to that
worker, strictly), are listed by ``list_stored``, fetched by ``retrieve`` when they can be
encoded, dropped by ``delete_stored`` and when the session ends. Arguments may name a stored
object as ``{"$stored": "name"}``. This is the seeds' ``Snakepit.Python`` (call a dotted path,
keep named objects, call their methods, run a pipeline), restricted by an allowlist of module
trees that bounds every object a call reaches (see :class:`PythonAdapter`), and with no access
to private attributes.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import operator
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import Any

from trio_bridge._errors import EncodeError, InvalidArgumentError, NotAllowedError, TrioBridgeError
from trio_bridge._wire.codec import check
from trio_bridge.worker import Adapter, SessionContext, tool

__all__ = ["PythonAdapter", "StoredObjectNotFoundError"]

STORED_PREFIX = "stored."
# functools' C cache wrapper class, named without its private name: what it calls is checked
_LRU_CACHE_WRAPPER: type = type(functools.lru_cache(maxsize=None)(len))
_REFERENCE = "$stored"


class StoredObjectNotFoundError(TrioBridgeError, KeyError):
    """No stored object of that name in this session on this worker."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PythonAdapter(Adapter):
    """Call functions, classes and methods by dotted path; keep results as named objects.

    Options (``open_pool(..., adapter_options={...})``):
        allow: the module trees that may be used, e.g. ``["numpy", "sklearn.linear_model"]``
            (``"numpy"`` allows ``numpy`` and its submodules, not ``numpyx``). Default: none.

    The allowlist bounds what a call *reaches*, not how its target is spelt. A target is
    resolved one attribute at a time, and every object met on the way, the target, each
    ``{"$stored": name}`` argument (with what it holds) and each result (before it is returned
    or stored; the call has run then) must belong to an allowed module tree:

    - a module by its name; a class by its ``__module__``; a function by the module that
      defines it (``__module__``; for a C function also the module it is bound to, for a
      method the class that defines it and the object it is bound to); any other object by
      its class (and the class that defines its ``__call__``);
    - plain data belongs to no module and always passes: ``None``, bools, numbers, ``str``,
      ``bytes``, lists, tuples, dicts and sets of passing objects, NumPy arrays and scalars
      (an object array by its items). Its methods are its type's: ``list.append`` and
      ``str.format`` are ``builtins``, ``ndarray.sum`` is ``numpy``;
    - reading an attribute that would run code (a property, another descriptor, a class's
      ``__getattr__`` or ``__getattribute__``) is refused *before* it runs when that code is
      outside (the descriptors of ``enum``, ``functools`` and ``types`` are the language's:
      the function they wrap is checked instead);
    - private and dunder names (a leading ``_``) are refused in every path;
    - what reaches objects by a string it is given, or runs code, counts as ``builtins``:
      whole modules (``importlib``, ``inspect``, ``pickle``, ``marshal``, ``pkgutil``, ``runpy``,
      ``code``, ``timeit``, ``pdb``, ``ctypes``...) and objects of otherwise plain ones, found
      by their public names wherever a release defines them (``operator.attrgetter`` and
      ``methodcaller``, ``string.Formatter``, ``typing.get_type_hints``, ``numpy.info``,
      ``numpy.bmat``, ``numpy.r_``, ``numpy.lib.add_newdoc``; NumPy 1's ``lookfor``, ``who``
      and ``compat.npy_load_module``...);
    - subtrees of an allowed package that run or build code (``numpy.testing``, whose
      ``measure`` execs its argument, ``numpy.f2py``, ``numpy.distutils``, ``numpy.ctypeslib``,
      ``logging.config``, ``unittest.mock``, ``xmlrpc.server``) are refused unless an ``allow``
      entry names the subtree (or a module in it) itself, judged by the module an object
      belongs to, so a re-export elsewhere is refused too;
    - an object whose items are made only when it is read (an iterator: ``map``, ``zip``,
      generators, ``itertools``', NumPy's ``nditer`` and ``flat``) is refused as an argument,
      a stored object or a result, since what it yields would pass no check. What other
      objects hold is checked with them: container items, a ``deque``'s, a ``defaultdict``'s
      factory, an ``itemgetter``'s keys, a ``slice``'s bounds; an instance's attributes are
      checked when a path reads them.

    So ``numpy`` does not lead to the ``os``, ``subprocess``, ``sys`` or ``builtins`` it
    imports; ``eval``, ``exec``, ``compile``, ``open``, ``getattr``, ``__import__``... are
    refused unless ``builtins`` itself is allowed (which allows any code); a method an allowed
    class inherits from another tree is refused (allow ``sklearn``, not just
    ``sklearn.linear_model``, for ``score``, which ``sklearn.base`` defines); and neither a stored object nor a result can
    hand out a way round. A private C module counts as its public one (``_json`` as ``json``,
    ``posix`` as ``os``). A refusal raises :class:`~trio_bridge.NotAllowedError` naming the
    module that is not allowed and how to allow it.

    What it does not protect: what allowed modules do themselves. The allowlist is not a
    sandbox: a caller may do whatever the allowed trees offer, and an allowed function may do
    anything inside. Allowing ``numpy`` allows ``numpy.save`` and ``ndarray.tofile`` (write
    any file the worker may), ``numpy.load(..., allow_pickle=True)`` (unpickle, which runs
    code: with ``tofile``, a way to run anything), ``numpy.fromfile`` and ``numpy.load``
    (read any file the worker may), ``numpy.loadtxt``, ``numpy.genfromtxt``,
    ``numpy.fromregex`` and ``numpy.lib.npyio.DataSource`` (read any file, and fetch
    ``http://`` and ``ftp://`` URLs from the worker's network, keeping a copy in its working
    directory: server-side request forgery). An allowed higher-order function
    (``functools.reduce``, ``operator.call``, a ufunc's ``reduce``) passes what an allowed
    callable returns on to the next call unchecked, so an allowed function that returns an
    object from outside is a way out through them. Allow the narrowest trees that do the job
    (``numpy.linalg`` rather than ``numpy``: arrays are data either way) before handing the pool to a caller
    you do not trust (an LLM's tool calls, a network client). Trusted as they report
    themselves: ``__module__`` (NumPy's functions say ``numpy``), a module's own
    ``__getattr__``, and the code an allowed object runs once called (its metaclass, base
    classes, internals). Naming a submodule of an allowed tree imports it, running its
    import-time code.
    """

    def setup(self) -> None:
        allow = self.options.get("allow", [])
        if isinstance(allow, str) or not isinstance(allow, list | tuple) or not all(_is_dotted(a) for a in allow):
            raise ValueError(
                f"PythonAdapter option 'allow' must be a list of module names like 'numpy' or "
                f"'sklearn.linear_model', not {allow!r}"
            )
        self.allow: tuple[str, ...] = tuple(allow)
        self._allowlist = _Allowlist(self.allow)
        self._stores: dict[str, dict[str, Any]] = {}  # session id -> name -> object
        self._lock = threading.Lock()

    def on_session_end(self, session_id: str) -> None:
        with self._lock:
            self._stores.pop(session_id, None)

    # ---- tools ----
    @tool
    def call(
        self, ctx: SessionContext, target: str, args: list[Any] | None = None, kwargs: dict[Any, Any] | None = None, store_as: str | None = None
    ) -> Any:
        """Call (or read) ``target``: a dotted path in an allowed module, or ``stored.NAME[.attr...]``.

        Args:
            target: e.g. ``"numpy.linalg.norm"`` or ``"stored.clf.predict"``.
            args: positional arguments.
            kwargs: keyword arguments.
            store_as: keep the result in the worker under this name (needs a session) and
                return ``{"stored": name, "type": "module.Class"}`` instead of the result.

        Raises:
            NotAllowedError: the target, an object on the way to it, a stored argument or the
                result is outside the allowed modules.
        """
        return self._run(ctx, {"call": target, "args": args or [], "kwargs": kwargs or {}, "store_as": store_as})

    @tool
    def pipeline(self, ctx: SessionContext, steps: list[Any]) -> list[Any]:
        """Run several ``call`` steps in one round trip, in order; later steps may use objects
        earlier ones stored. Each step is ``{"call": target, "args": [...], "kwargs": {...},
        "store_as": name}`` (all but ``call`` optional). Returns each step's result."""
        results: list[Any] = []
        for index, step in enumerate(steps):
            if not isinstance(step, dict) or not isinstance(step.get("call"), str):
                raise InvalidArgumentError(f"step {index} must be a dict with a 'call' target")
            unknown = set(step) - {"call", "args", "kwargs", "store_as"}
            if unknown:
                raise InvalidArgumentError(f"step {index} has unknown keys {sorted(unknown)}")
            try:
                results.append(self._run(ctx, step))
            except Exception as exc:
                exc.add_note(f"in pipeline step {index}: {step['call']}")
                raise
        return results

    @tool
    def retrieve(self, ctx: SessionContext, name: str) -> Any:
        """The stored object itself (it must be encodable: arrays, numbers, lists, dicts...)."""
        store = self._store(ctx)
        value = store[_check_stored(store, name)]
        self._allowlist.check_value(value, f"stored object {name!r}")
        return self._encodable(value, f"stored object {name!r}")

    @tool
    def list_stored(self, ctx: SessionContext) -> dict[str, str]:
        """Stored objects of this session: name -> type."""
        return {name: _type_name(value) for name, value in sorted(self._store(ctx).items())}

    @tool
    def delete_stored(self, ctx: SessionContext, name: str) -> bool:
        """Drop a stored object; False if there was none of that name."""
        return self._store(ctx).pop(name, None) is not None

    # ---- internals ----
    def _run(self, ctx: SessionContext, step: dict[str, Any]) -> Any:
        target, store_as = step["call"], step.get("store_as")
        args, kwargs = step.get("args") or [], step.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidArgumentError("args must be a list and kwargs a dict")
        if store_as is not None:
            if not ctx.session_id:
                raise InvalidArgumentError("store_as keeps objects per session: call it in a session")
            if not isinstance(store_as, str) or not store_as.isidentifier():
                raise InvalidArgumentError(f"store_as must be an identifier, not {store_as!r}")
        store = self._store(ctx)
        obj = self._resolve(target, store)
        args = [self._dereference(store, a, f"argument {i}") for i, a in enumerate(args)]
        kwargs = {k: self._dereference(store, v, f"argument {k!r}") for k, v in kwargs.items()}
        if callable(obj):
            result = obj(*args, **kwargs)
        elif args or kwargs:
            raise InvalidArgumentError(f"{target!r} is not callable ({_type_name(obj)}), so it takes no arguments")
        else:
            result = obj
        self._allowlist.check_value(result, f"the result of {target!r}", ran=callable(obj))
        if store_as is not None:
            self._store(ctx)[store_as] = result
            return {"stored": store_as, "type": _type_name(result)}
        return self._encodable(result, f"the result of {target!r}")

    def _resolve(self, target: str, store: Mapping[str, Any]) -> Any:
        """The object ``target`` names, checked at every step (see the class docstring).

        Raises:
            InvalidArgumentError: a malformed target, or a missing attribute.
            NotAllowedError: the target or an object on the way is outside the allowlist.
            StoredObjectNotFoundError: ``stored.NAME`` names no stored object.
        """
        if not isinstance(target, str) or not target:
            raise InvalidArgumentError("the target must be a dotted path")
        parts = target.split(".")
        if any(not p.isidentifier() or p.startswith("_") for p in parts):
            raise InvalidArgumentError(f"{target!r}: each part must be a public identifier (no leading '_')")
        allowlist = self._allowlist
        if target.startswith(STORED_PREFIX):
            path = f"stored.{parts[1]}"
            obj = store[_check_stored(store, parts[1])]
            allowlist.check(obj, f"{target!r}: {path} is")
            return allowlist.walk(obj, parts[2:], path, target)
        outside = allowlist.outside_prefix(parts)
        if outside is not None:
            raise allowlist.refusal(f"{target!r} is in the module {outside!r}", outside, named=True)
        for split in range(len(parts), 0, -1):  # the longest importable module prefix
            module_name = ".".join(parts[:split])
            if not allowlist.inside(module_name):
                break  # import nothing outside the allowed trees
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                    continue  # not a module (yet): try a shorter prefix
                raise
            allowlist.check(module, f"{target!r}: {module_name} is")
            return allowlist.walk(module, parts[split:], module_name, target)
        raise InvalidArgumentError(f"cannot import any module of {target!r}")

    def _store(self, ctx: SessionContext) -> dict[str, Any]:
        with self._lock:
            return self._stores.setdefault(ctx.session_id, {})

    def _dereference(self, store: Mapping[str, Any], value: Any, what: str) -> Any:
        if isinstance(value, dict) and set(value) == {_REFERENCE}:
            name = value[_REFERENCE]
            if not isinstance(name, str):
                raise InvalidArgumentError(f"{what}: {{{_REFERENCE!r}: name}} needs a str name, not {type(name).__name__}")
            stored = store[_check_stored(store, name)]
            self._allowlist.check_value(stored, f"{what}, stored object {name!r},")
            return stored
        return value

    @staticmethod
    def _encodable(value: Any, what: str) -> Any:
        try:
            check(value)  # no copy, no shared-memory file: the server encodes it for real
        except EncodeError as exc:
            raise EncodeError(f"{what} cannot be sent back ({exc}); keep it in the worker with store_as='name'") from None
        return value


def _check_stored(store: Mapping[str, Any], name: str) -> str:
    if name not in store:
        raise StoredObjectNotFoundError(
            f"no stored object named {name!r} in this session on this worker "
            f"(stored: {', '.join(sorted(store)) or 'none'})"
        )
    return name


def _type_name(value: Any) -> str:
    return _qualified(type(value))


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module (its parent package, above an allowed tree, is imported)."""
    try:
        return name in sys.modules or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _is_dotted(name: object) -> bool:
    return isinstance(name, str) and all(part.isidentifier() for part in name.split("."))


# ---------------------------------------------------------------------------------------------
# The allowlist: which module an object belongs to, found without running the object's code.
# Type-level facts are read through ``type``'s own descriptors and class dicts, never through
# an attribute lookup a class could override; an object's own attributes only through C slots.

_TYPE_MRO = type.__dict__["__mro__"]
_TYPE_DICT = type.__dict__["__dict__"]
_TYPE_MODULE = type.__dict__["__module__"]
_TYPE_QUALNAME = type.__dict__["__qualname__"]
_GENERIC_ORIGIN = types.GenericAlias.__dict__["__origin__"]
_PARTIAL_FIELDS = tuple(functools.partial.__dict__[f] for f in ("func", "args", "keywords"))
_DEFAULT_FACTORY = collections.defaultdict.__dict__["default_factory"]
_SLICE_FIELDS = tuple(slice.__dict__[f] for f in ("start", "stop", "step"))
_LAZY = frozenset({types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType})
_SLOTS = (types.GetSetDescriptorType, types.MemberDescriptorType)
_C_DESCRIPTORS = (
    types.MethodDescriptorType, types.ClassMethodDescriptorType, types.WrapperDescriptorType,
    types.GetSetDescriptorType, types.MemberDescriptorType,
)
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_DATA = _SCALARS | {bytearray, list, tuple, dict, set, frozenset, range, slice, type(...), type(NotImplemented)}
_CONTAINERS = (list, tuple, set, frozenset)
_MACHINERY = frozenset({"enum", "functools", "types"})  # descriptors of the language's own
_MAX_DEPTH = 12  # an object reached only through more wrappers than this is refused, unknown
# Modules whose objects are another module's, under a private or platform name.
_ALIASES = {
    "posix": "os", "nt": "os", "posixpath": "os.path", "ntpath": "os.path", "_thread": "threading",
    "_sre": "re", "_collections_abc": "collections.abc", "_pydecimal": "decimal",
    "_pydatetime": "datetime", "_pyio": "io", "_frozen_importlib": "importlib",
    "_frozen_importlib_external": "importlib",
}

# Subtrees of allowed packages that run code given as strings, or build and load code
# (numpy.testing.measure execs its argument, f2py and distutils run compilers, ctypeslib loads
# libraries, logging.config.dictConfig calls callables it is given by name, unittest.mock
# patches names, xmlrpc.server resolves dotted names): refused unless an allow entry names the
# subtree itself, or a module in it.
_GUARDED_SUBTREES = frozenset({
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib", "logging.config", "unittest.mock",
    "xmlrpc.server",  # resolve_dotted_attribute: getattr by dotted string
})
# Modules whose business is running code or reaching objects by caller-given strings (names,
# attribute paths, pickles, code objects): they count as builtins, refused unless 'builtins' is.
_RUNS_CODE = frozenset({
    "bdb", "code", "codeop", "copyreg", "cProfile", "ctypes", "distutils", "doctest", "ensurepip", "idlelib",
    "imp", "importlib", "inspect", "lsprof", "marshal", "multiprocessing", "pdb", "pickle", "pkgutil", "profile",
    "pydoc", "runpy", "shelve", "site", "timeit", "tkinter", "trace", "webbrowser", "zipimport",
})
# And the objects of that kind in otherwise plain modules, by their public names
# ("module:attribute"), found by identity when the module is imported: where a release defines
# them moves (numpy.r_'s class is numpy.lib.index_tricks' in NumPy 1.26, _index_tricks_impl's in
# 2.x), their public names stay. A class stands for its methods, instances and subclasses, an
# instance (numpy.r_) for its class and that class's bases. A name a release lacks counts for
# nothing there.
_REACHES_BY_STRING = (
    "operator:attrgetter", "operator:methodcaller",  # getattr by dotted string, dunders included
    "string:Formatter",  # get_field reads "0.__globals__"
    "logging:Formatter", "logging:StrFormatStyle",  # style="{": str.format's attribute walk
    "typing:get_type_hints", "typing:ForwardRef", "typing:evaluate_forward_ref",  # eval strings
    "annotationlib:ForwardRef", "annotationlib:call_evaluate_function", "annotationlib:get_annotations",
    "numpy:info",  # info(toplevel=) imports by name
    "numpy:bmat", "numpy:r_", "numpy:c_",  # read names from the caller's frame (r_["a, b"] is bmat's)
    "numpy:add_newdoc", "numpy.lib:add_newdoc",  # imports by name, then rewrites a C docstring
    "numpy:test", "scipy:test",  # PytestTester: numpy.test(tests=[path]) runs a file
    "numpy:lookfor",  # NumPy < 2: imports modules by name
    "numpy:who",  # NumPy < 2: reads the caller's frame
    "numpy.compat:npy_load_module",  # NumPy < 2: runs a Python file as a module
)


class _ByString:
    """The (canonical module, qualified name) of each ``_REACHES_BY_STRING`` object found in the
    imported modules, worked out again when those modules change (imported, reloaded)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = tuple(name.partition(":")[::2] for name in names)
        self._modules = tuple(dict.fromkeys(module for module, _ in self._names))
        self._state: tuple[tuple[Any, ...], dict[str, frozenset[str]]] | None = None

    def keys(self) -> dict[str, frozenset[str]]:
        """Canonical module -> the first parts of the qualified names that reach by string."""
        seen = tuple(sys.modules.get(module) for module in self._modules)
        state = self._state  # one read: another thread may replace it meanwhile
        if state is not None and all(a is b for a, b in zip(seen, state[0], strict=True)):
            return state[1]
        keys, complete = self._find(dict(zip(self._modules, seen, strict=True)))
        self._state = (seen, keys) if complete else None  # one still being imported: look again next time
        return keys

    def _find(self, modules: dict[str, Any]) -> tuple[dict[str, frozenset[str]], bool]:
        keys: dict[str, set[str]] = collections.defaultdict(set)
        complete = True
        for module_name, attribute in self._names:
            module = modules[module_name]
            if module is None:
                continue
            namespace = _instance_dict(module) or {}
            spec = namespace.get("__spec__")
            complete = complete and not getattr(spec, "_initializing", False)
            if attribute not in namespace:
                continue  # not in this release
            obj = namespace[attribute]
            cls = type(obj)
            if issubclass(cls, type):
                classes: tuple[type, ...] = (obj,)
            elif (own := _own_module(obj)) is not None and (qualname := _own_str(obj, "__qualname__")) is not None:
                keys[_canonical(own)].add(qualname.partition(".")[0])  # a function, by what it says of itself
                continue
            else:
                classes = tuple(k for k in _mro(cls) if k is not object)  # an instance: its class and bases
            for klass in classes:
                module_of = _class_module(klass)
                if module_of is not None:
                    keys[_canonical(module_of)].add(_TYPE_QUALNAME.__get__(klass).partition(".")[0])
        return {module: frozenset(names) for module, names in keys.items()}, complete


_BY_STRING = _ByString(_REACHES_BY_STRING)


def _guarded_subtree(module: str) -> str | None:
    """The code-running subtree (``_GUARDED_SUBTREES``) the canonical ``module`` is in, or None."""
    return next((tree for tree in _GUARDED_SUBTREES if module == tree or module.startswith(tree + ".")), None)


def _runs_code(module: str) -> bool:
    """Whether the canonical ``module`` counts as builtins (``_RUNS_CODE``, or builtins itself)."""
    top = module.partition(".")[0]
    return top == "builtins" or top in _RUNS_CODE


def _canonical(module: str) -> str:
    """``module`` under its public name: ``_json`` -> ``json``, ``posix.x`` -> ``os.x``."""
    top, dot, rest = module.partition(".")
    if top in _ALIASES:
        top = _ALIASES[top]
    elif top.startswith("_") and not top.startswith("__"):
        top = top[1:]  # a C accelerator (_json, _decimal, _heapq...) is its public module's
    return top + dot + rest


class _Allowlist:
    """The allowed module trees, and the checks of what a call reaches against them."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        self.allow = allow
        self._trees = tuple(sorted({_canonical(a) for a in allow}))

    def inside(self, module: str) -> bool:
        """Whether ``module`` is in an allowed tree: a module that runs code counts as builtins,
        and a guarded subtree (numpy.testing) is in only a tree at or below it."""
        name = _canonical(module)
        if _runs_code(name):
            name = "builtins"
        guarded = _guarded_subtree(name)
        return any(
            (name == tree or name.startswith(tree + "."))
            and (guarded is None or tree == guarded or tree.startswith(guarded + "."))
            for tree in self._trees
        )

    def outside_prefix(self, parts: list[str]) -> str | None:
        """The first prefix of a dotted path that is neither inside an allowed tree nor above
        one (``sklearn.base`` of ``sklearn.base.clone`` when only ``sklearn.linear_model`` is
        allowed), or None."""
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if self.inside(prefix):
                continue  # a longer prefix may still be a guarded subtree (numpy.testing)
            name = _canonical(prefix)
            if not any(tree.startswith(name + ".") for tree in self._trees):
                parent = ".".join(parts[: end - 1])
                # a guarded subtree (numpy.distutils) is named even where a release lacks it
                return prefix if end == 1 or _is_module(prefix) or self.inside(parent) else parent
            if end == len(parts):
                return prefix  # above an allowed tree, not in one
        return None

    def check(self, obj: Any, subject: str) -> None:
        """Refuse ``obj`` unless it belongs to an allowed tree (or is plain data); ``subject``
        starts the message: ``"'numpy.f2py.os': numpy.f2py.os is"``."""
        for origin in _origins(obj):
            if origin is None or not self.inside(origin):
                raise self.refusal(f"{subject} {_describe(obj)}", origin, obj)

    def walk(self, obj: Any, attributes: list[str], path: str, target: str) -> Any:
        """Follow ``attributes`` from ``obj`` (found at ``path``), checking before each lookup
        that it runs no code from outside, and each object it yields."""
        for attribute in attributes:
            for origin in _lookup_origins(obj, attribute):
                if origin is None or not self.inside(origin):
                    raise self.refusal(f"{target!r}: reading {path}.{attribute} runs code", origin)
            try:
                obj = getattr(obj, attribute)
            except AttributeError:
                raise InvalidArgumentError(f"{target!r}: {_describe(obj)} has no attribute {attribute!r}") from None
            path = f"{path}.{attribute}"
            self.check(obj, f"{target!r}: {path} is")
        return obj

    def check_value(self, value: Any, what: str, *, ran: bool = False) -> None:
        """:meth:`check` ``value`` and all it holds as data (container items, object arrays'
        items): what is stored, passed or returned."""
        numpy = sys.modules.get("numpy")
        stack, seen = [value], {}  # seen keeps what it holds alive, so ids are not reused
        while stack:
            item = stack.pop()
            if type(item) in _SCALARS or id(item) in seen:
                continue
            seen[id(item)] = item
            for origin in _origins(item):
                if origin is None or not self.inside(origin):
                    held = "is" if item is value else "holds"
                    done = "; the call ran, and its result was neither returned nor stored" if ran else ""
                    raise self.refusal(f"{what} {held} {_describe(item)}", origin, item, done)
            cls = type(item)
            if _is_lazy(cls):
                held = "is" if item is value else "holds"
                done = "; the call ran, and its result was neither returned nor stored" if ran else ""
                raise NotAllowedError(
                    f"{what} {held} {_describe(item)}, an iterator: what it yields is made only when it is "
                    f"read, past the allowlist's check, so it is refused as an argument, a stored object or a "
                    f"result; call something that returns a list or an array instead{done}"
                )
            if issubclass(cls, dict):
                stack.extend(dict.keys(item))
                stack.extend(dict.values(item))
                if issubclass(cls, collections.defaultdict):
                    stack.append(_DEFAULT_FACTORY.__get__(item, cls))
            elif issubclass(cls, _CONTAINERS):
                base = next(c for c in _CONTAINERS if issubclass(cls, c))
                stack.extend(base.__iter__(item))
            elif issubclass(cls, collections.deque):
                stack.extend(collections.deque.__iter__(item))
            elif issubclass(cls, operator.itemgetter):
                stack.extend(operator.itemgetter.__reduce__(item)[1])  # its keys
            elif cls is slice:
                stack.extend(field.__get__(item, slice) for field in _SLICE_FIELDS)
            elif numpy is not None and issubclass(cls, numpy.ndarray | numpy.void):
                array = issubclass(cls, numpy.ndarray)
                dtype = (numpy.ndarray if array else numpy.generic).dtype.__get__(item)
                if numpy.dtype.hasobject.__get__(dtype):  # its items are any objects: check them
                    stack.append(numpy.ndarray.tolist(item) if array else numpy.void.item(item))

    def refusal(self, subject: str, origin: str | None, obj: Any = None, tail: str = "", *, named: bool = False) -> NotAllowedError:
        """The error for ``subject`` (``"'x.y': x.y is the function f"``), from module ``origin``
        (None: unknown), naming the module and how to allow it; ``named``: subject names it."""
        allowed = ", ".join(self.allow) if self.allow else "none yet"
        if origin is None:
            return NotAllowedError(
                f"{subject}, and which module defines it cannot be told, so the allowlist refuses it "
                f"(allowed: {allowed}){tail}"
            )
        public = _canonical(origin)
        if origin == "builtins" and obj is not None and _reaches_by_string(obj):
            where = ", which reaches attributes or names by string (as getattr does), so counts as builtins"
        elif named or issubclass(type(obj), types.ModuleType):
            where = ""
        else:
            where = f", from module {origin!r}" + ("" if public == origin else f" (part of {public!r})")
        guarded = _guarded_subtree(public)
        if _runs_code(public):
            how = (
                "builtins (eval, exec, open, getattr, __import__...), and what runs code or reaches objects by "
                "string (importlib, inspect, pickle, pkgutil, runpy, timeit, operator.attrgetter...), are refused "
                "unless 'builtins' itself is allowed, which lets callers run any code"
            )
        elif guarded is not None:
            how = (
                f"{guarded!r} runs or builds code from what it is given, so an allowed package does not allow it: "
                f"name it, adapter_options={{'allow': [..., {guarded!r}]}}, to let callers run any code"
            )
        else:
            how = (
                f"to allow it, open the pool with adapter_options={{'allow': [..., {public!r}]}} "
                f"(callers may then use all that {public!r} offers)"
            )
        return NotAllowedError(f"{subject}{where}, outside the allowed modules ({allowed}); {how}{tail}")


def _is_lazy(cls: type) -> bool:
    """Whether instances of ``cls`` make their items when read: iterators (``__next__``: map,
    zip, itertools', NumPy's), generators, coroutines, asynchronous iterators."""
    return cls in _LAZY or any(_find(cls, name) is not None for name in ("__next__", "__anext__"))


def _mro(cls: type) -> tuple[type, ...]:
    return _TYPE_MRO.__get__(cls)


def _find(cls: type, name: str) -> tuple[type, Any] | None:
    """Where ``name`` is defined on ``cls``'s MRO, as (the defining class, the raw value)."""
    for klass in _mro(cls):
        namespace = _TYPE_DICT.__get__(klass)
        if name in namespace:
            return klass, namespace[name]
    return None


def _class_module(cls: type) -> str | None:
    try:
        module = _TYPE_MODULE.__get__(cls)
    except AttributeError:
        return None
    return module if type(module) is str else None


def _qualified(cls: type) -> str:
    module, name = _class_module(cls), _TYPE_QUALNAME.__get__(cls)
    return name if module in (None, "builtins") else f"{module}.{name}"


def _instance_dict(obj: Any) -> dict[str, Any] | None:
    """``obj.__dict__`` when a C slot holds it (no code of the object's class runs)."""
    found = _find(type(obj), "__dict__")
    if found is None or type(found[1]) not in _SLOTS:
        return None
    namespace = found[1].__get__(obj, type(obj))
    return namespace if type(namespace) is dict else None


def _own_module(obj: Any) -> str | None:
    """The ``__module__`` ``obj`` carries itself, as functions and function-like objects do (C,
    Cython and NumPy functions, ufuncs, caches' wrappers), rather than its class's."""
    return _own_str(obj, "__module__")


def _own_str(obj: Any, name: str) -> str | None:
    """The str attribute ``name`` ``obj`` carries itself (a C slot or its own ``__dict__``)."""
    found = _find(type(obj), name)
    if found is not None and type(found[1]) in _SLOTS:
        value = found[1].__get__(obj, type(obj))
    else:
        namespace = _instance_dict(obj)
        value = namespace.get(name) if namespace is not None else None
    return value if type(value) is str else None


def _reaches_by_string(obj: Any) -> bool:
    """Whether ``obj`` is one of ``_REACHES_BY_STRING`` or of theirs (a function by its own module
    and qualified name; a class, an instance or a method of one by the classes of its MRO)."""
    cls = type(obj)
    keys: list[tuple[str | None, str | None]] = []
    if issubclass(cls, type):
        keys += [(_class_module(k), _TYPE_QUALNAME.__get__(k)) for k in _mro(obj)]
    elif callable(obj) and (module := _own_module(obj)) is not None:
        keys.append((module, _own_str(obj, "__qualname__")))
    keys += [(_class_module(k), _TYPE_QUALNAME.__get__(k)) for k in _mro(cls)]
    table = _BY_STRING.keys()
    for module, qualname in keys:
        names = table.get(_canonical(module)) if module is not None else None
        if names is not None and qualname is not None and qualname.partition(".")[0] in names:
            return True
    return False


def _is_data(obj: Any) -> bool:
    cls = type(obj)
    if cls in _DATA:
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and (
        cls is numpy.ndarray or (issubclass(cls, numpy.generic) and _class_module(cls) == "numpy")
    )


def _defining_module(owner: Any, name: str) -> str | None:
    """The module of the class that defines the method ``name`` bound to ``owner``."""
    classes = _mro(type(owner))
    if issubclass(type(owner), type):
        classes = _mro(owner) + classes  # a class method, or the metaclass's (type.mro)
    for klass in classes:
        if name in _TYPE_DICT.__get__(klass):
            return _class_module(klass)
    return None


def _origins(obj: Any, depth: int = 0) -> Iterator[str | None]:
    """The modules ``obj`` belongs to (None: cannot be told), lazily: a caller that stops at
    the first one outside reads nothing more of it."""
    if depth > _MAX_DEPTH:
        yield None
        return
    cls = type(obj)
    if _is_data(obj):
        return
    if _reaches_by_string(obj):
        yield "builtins"  # operator.attrgetter and its kind: getattr by another name
    if issubclass(cls, types.ModuleType):
        if cls is not types.ModuleType:
            yield _class_module(cls)
        namespace = _instance_dict(obj)
        name = namespace.get("__name__") if namespace is not None else None
        yield name if type(name) is str else None
    elif issubclass(cls, type):
        yield _class_module(obj)
    elif cls is types.BuiltinFunctionType:
        owner = obj.__self__
        if owner is None or issubclass(type(owner), types.ModuleType):  # a module's C function
            if owner is not None:
                yield from _origins(owner, depth + 1)
            yield _own_module(obj)
        else:  # a C method bound to a class or an instance (builtins' data types' included)
            yield from _origins(owner, depth + 1)
            yield _defining_module(owner, obj.__name__)
    elif cls is types.MethodType or cls is types.MethodWrapperType:
        yield from _origins(obj.__self__, depth + 1)
        if cls is types.MethodType:
            yield from _origins(obj.__func__, depth + 1)
        else:
            yield _defining_module(obj.__self__, obj.__name__)
    elif cls in _C_DESCRIPTORS:
        yield _class_module(obj.__objclass__)
    elif cls is staticmethod or cls is classmethod:
        yield from _origins(obj.__func__, depth + 1)
    elif cls is property:
        for accessor in (obj.fget, obj.fset, obj.fdel):
            if accessor is not None:
                yield from _origins(accessor, depth + 1)
    elif cls is types.FunctionType:
        yield _own_module(obj)
    elif cls is types.GenericAlias:  # list[int], numpy.typing.NDArray: what it subscripts
        yield from _origins(_GENERIC_ORIGIN.__get__(obj, cls), depth + 1)
    elif issubclass(cls, functools.partial):  # what it calls, and what it holds for the call
        if cls is not functools.partial:
            yield _class_module(cls)
        func, args, keywords = (field.__get__(obj, cls) for field in _PARTIAL_FIELDS)
        for held in (func, *args, *(keywords.values() if type(keywords) is dict else ())):
            yield from _origins(held, depth + 1)
    elif callable(obj) and (own := _own_module(obj)) is not None:
        yield own  # a function-like object of C, Cython or NumPy, or a wrapper that copied one's
        call = _find(cls, "__call__")
        if call is None or type(call[1]) is not types.WrapperDescriptorType:
            yield _class_module(call[0]) if call is not None else None  # Python code calls it
        if issubclass(cls, _LRU_CACHE_WRAPPER):
            namespace = _instance_dict(obj) or {}
            if "__wrapped__" in namespace:
                yield from _origins(namespace["__wrapped__"], depth + 1)
    else:  # an instance: its class's, and its __call__'s
        yield _class_module(cls)
        if callable(obj):
            found = _find(cls, "__call__")
            yield _class_module(found[0]) if found is not None else None


def _lookup_origins(obj: Any, name: str) -> Iterator[str | None]:
    """The modules whose code ``getattr(obj, name)`` may run, found before it runs."""
    cls = type(obj)
    if cls is types.ModuleType:
        return  # a module's own __getattr__, if any, is its own code
    hook = _find(cls, "__getattribute__")
    if hook is not None:
        yield from _hook_origins(*hook)
    on_type = _find(cls, name)  # for a class: on its metaclass
    if on_type is not None:
        yield from _descriptor_origins(on_type[1], on_class=False)
    on_class = _find(obj, name) if issubclass(cls, type) else None
    if on_class is not None:
        yield from _descriptor_origins(on_class[1], on_class=True)
    if on_type is None and on_class is None:  # found in the instance's dict, or __getattr__ runs
        hook = _find(cls, "__getattr__")
        if hook is not None:
            yield from _hook_origins(*hook)


def _hook_origins(owner: type, hook: Any) -> Iterator[str | None]:
    """The modules of an attribute hook (``__getattr__``, ``__getattribute__``) ``owner`` defines."""
    module = _class_module(owner)
    slot = type(hook) is types.WrapperDescriptorType  # C code: its class's own
    if module is not None and (_canonical(module) in _MACHINERY or (slot and module == "builtins")):
        return  # the interpreter's own lookup (str, property...), enum's lookup of members
    yield module
    if not slot:
        yield from _origins(hook)


def _descriptor_origins(value: Any, *, on_class: bool, depth: int = 0) -> Iterator[str | None]:
    """The modules whose code reading the class attribute ``value`` runs (its ``__get__``)."""
    cls = type(value)
    if depth > _MAX_DEPTH:
        yield None
    elif cls is property:
        if not on_class and value.fget is not None:  # on the class, a property returns itself
            yield from _origins(value.fget)
    elif cls is classmethod:  # 3.11-3.12 chain a wrapped descriptor's __get__
        yield from _descriptor_origins(value.__func__, on_class=on_class, depth=depth + 1)
    elif cls in _C_DESCRIPTORS or cls is staticmethod:
        return  # C slots, and functions, which bind without running code
    elif (getter := _find(cls, "__get__")) is not None:
        if type(getter[1]) is types.WrapperDescriptorType and _own_module(value) is not None:
            return  # a C or Cython function binds without running code
        module = _class_module(getter[0])
        if module is not None and _canonical(module) in _MACHINERY:  # cached_property, enum's
            namespace = _instance_dict(value) or {}
            for field in ("fget", "func"):
                if namespace.get(field) is not None:
                    for origin in _origins(namespace[field]):  # (Enum.value's getter: enum's own)
                        if origin is None or _canonical(origin) not in _MACHINERY:
                            yield origin
        else:
            yield module


def _describe(obj: Any) -> str:
    """``obj`` in a message, read without running its code."""
    cls = type(obj)
    if issubclass(cls, types.ModuleType):
        namespace = _instance_dict(obj) or {}
        return f"the module {namespace.get('__name__', '?')!r}"
    if issubclass(cls, type):
        return f"the class {_qualified(obj)}"
    if cls is types.BuiltinFunctionType and not (obj.__self__ is None or issubclass(type(obj.__self__), types.ModuleType)):
        return f"the method {obj.__qualname__}"
    if cls is types.FunctionType or cls is types.BuiltinFunctionType:
        return f"the function {obj.__qualname__}"
    if cls is types.MethodType:
        return f"a method bound to a {_qualified(type(obj.__self__))} ({_describe(obj.__func__)})"
    return f"a {_qualified(cls)} object"
