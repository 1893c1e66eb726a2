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
prefixes and with no access to private attributes.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from trio_bridge._errors import EncodeError, InvalidArgumentError, TrioBridgeError
from trio_bridge._wire.codec import check
from trio_bridge.worker import Adapter, SessionContext, tool

__all__ = ["PythonAdapter", "StoredObjectNotFoundError"]

STORED_PREFIX = "stored."
_REFERENCE = "$stored"


class StoredObjectNotFoundError(TrioBridgeError, KeyError):
    """No stored object of that name in this session on this worker."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PythonAdapter(Adapter):
    """Call functions, classes and methods by dotted path; keep results as named objects.

    Options (``open_pool(..., adapter_options={...})``):
        allow: module prefixes that may be used, e.g. ``["numpy", "sklearn.linear_model"]``
            (``"numpy"`` allows ``numpy.linalg.norm``, not ``numpyx``). Default: none.
    """

    def setup(self) -> None:
        allow = self.options.get("allow", [])
        if isinstance(allow, str) or not all(isinstance(a, str) and a for a in allow):
            raise ValueError("PythonAdapter option 'allow' must be a list of module names")
        self.allow: tuple[str, ...] = tuple(allow)
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
        value = self._store(ctx)[self._check_stored(ctx, name)]
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
        obj = self._resolve(ctx, target)
        args = [self._dereference(ctx, a) for a in args]
        kwargs = {k: self._dereference(ctx, v) for k, v in kwargs.items()}
        if callable(obj):
            result = obj(*args, **kwargs)
        elif args or kwargs:
            raise InvalidArgumentError(f"{target!r} is not callable ({_type_name(obj)}), so it takes no arguments")
        else:
            result = obj
        if store_as is not None:
            self._store(ctx)[store_as] = result
            return {"stored": store_as, "type": _type_name(result)}
        return self._encodable(result, f"the result of {target!r}")

    def _resolve(self, ctx: SessionContext, target: str) -> Any:
        if not isinstance(target, str) or not target:
            raise InvalidArgumentError("the target must be a dotted path")
        parts = target.split(".")
        if any(not p.isidentifier() or p.startswith("_") for p in parts):
            raise InvalidArgumentError(f"{target!r}: each part must be a public identifier (no leading '_')")
        if target.startswith(STORED_PREFIX):
            obj = self._store(ctx)[self._check_stored(ctx, parts[1])]
            return _walk(obj, parts[2:], target)
        if not any(target == a or target.startswith(a + ".") for a in self.allow):
            hint = f"allowed: {', '.join(self.allow)}" if self.allow else "no module is allowed yet"
            raise PermissionError(
                f"{target!r} is outside the allowed modules ({hint}); open the pool with "
                f"adapter_options={{'allow': ['{parts[0]}', ...]}} to allow it"
            )
        for split in range(len(parts), 0, -1):  # the longest importable module prefix
            module_name = ".".join(parts[:split])
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                    continue  # not a module (yet): try a shorter prefix
                raise
            return _walk(module, parts[split:], target)
        raise InvalidArgumentError(f"cannot import any module of {target!r}")

    def _store(self, ctx: SessionContext) -> dict[str, Any]:
        with self._lock:
            return self._stores.setdefault(ctx.session_id, {})

    def _check_stored(self, ctx: SessionContext, name: str) -> str:
        if name not in self._store(ctx):
            raise StoredObjectNotFoundError(
                f"no stored object named {name!r} in this session on this worker "
                f"(stored: {', '.join(sorted(self._store(ctx))) or 'none'})"
            )
        return name

    def _dereference(self, ctx: SessionContext, value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {_REFERENCE}:
            return self._store(ctx)[self._check_stored(ctx, value[_REFERENCE])]
        return value

    @staticmethod
    def _encodable(value: Any, what: str) -> Any:
        try:
            check(value)  # no copy, no shared-memory file: the server encodes it for real
        except EncodeError as exc:
            raise EncodeError(f"{what} cannot be sent back ({exc}); keep it in the worker with store_as='name'") from None
        return value


def _walk(obj: Any, attributes: list[str], target: str) -> Any:
    for attribute in attributes:
        try:
            obj = getattr(obj, attribute)
        except AttributeError:
            raise InvalidArgumentError(f"{target!r}: {_type_name(obj)} has no attribute {attribute!r}") from None
    return obj


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
