"""The public API as users and type checkers see it (after trio's ``_tests/test_exports.py``):
every exported name resolves, exported classes show their public module, classes the library
makes cannot be constructed by users, and the package's type completeness stays high."""

from __future__ import annotations

import importlib
import pathlib
import pickle
import sys
import types

import pytest

import trio_bridge
import trio_bridge.worker
from trio_bridge._util import NoPublicConstructor

ROOT = pathlib.Path(__file__).resolve().parent.parent
PUBLIC_MODULES = [trio_bridge, trio_bridge.worker]


def _exports() -> list[tuple[types.ModuleType, str]]:
    return [(module, name) for module in PUBLIC_MODULES for name in module.__all__]


def _exported_classes() -> list[tuple[types.ModuleType, type]]:
    found = []
    for module, name in _exports():
        value = getattr(module, name)
        if isinstance(value, type):
            found.append((module, value))
    return found


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_has_unique_public_names(module: types.ModuleType) -> None:
    assert len(set(module.__all__)) == len(module.__all__)
    assert all(isinstance(name, str) and not name.startswith("_") for name in module.__all__)


@pytest.mark.parametrize(("module", "name"), _exports(), ids=lambda x: getattr(x, "__name__", x))
def test_every_exported_name_resolves(module: types.ModuleType, name: str) -> None:
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import {name}", namespace)  # the way users import it
    assert namespace[name] is getattr(module, name)


def test_lazy_names_are_the_real_objects() -> None:
    """``trio_bridge.__getattr__`` hands out the objects its TYPE_CHECKING imports name."""
    lazy = trio_bridge._LAZY
    assert set(lazy) <= set(trio_bridge.__all__)
    for name, module_name in lazy.items():
        assert getattr(trio_bridge, name) is getattr(importlib.import_module(module_name), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trio_bridge.nope  # noqa: B018


@pytest.mark.parametrize(("module", "cls"), _exported_classes(), ids=lambda x: getattr(x, "__name__", x))
def test_exported_classes_show_the_public_module(module: types.ModuleType, cls: type) -> None:
    assert cls.__module__ == module.__name__, f"{cls.__qualname__}: apply trio_bridge._util.public_module"
    assert getattr(sys.modules[cls.__module__], cls.__qualname__) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


NO_PUBLIC_CONSTRUCTOR = {
    "trio_bridge.Pool",
    "trio_bridge.Session",
    "trio_bridge.Optimization",
    "trio_bridge.worker.SessionContext",
    "trio_bridge.worker.WorkerOptimization",
}


def test_library_made_classes_have_no_public_constructor() -> None:
    found = {f"{module.__name__}.{cls.__qualname__}" for module, cls in _exported_classes() if isinstance(cls, NoPublicConstructor)}
    assert found == NO_PUBLIC_CONSTRUCTOR


@pytest.mark.parametrize(
    "cls",
    [
        trio_bridge.Pool,
        trio_bridge.Session,
        trio_bridge.Optimization,
        trio_bridge.worker.SessionContext,
        trio_bridge.worker.WorkerOptimization,
        importlib.import_module("trio_bridge.worker._context").Variables,
        importlib.import_module("trio_bridge.worker._context").HostTools,
    ],
    ids=lambda c: c.__qualname__,
)
def test_no_public_constructor_raises(cls: type) -> None:
    with pytest.raises(TypeError, match="no public constructor"):
        cls()
    with pytest.raises(TypeError, match="no public constructor"):
        cls("a", b=1)


def test_tool_returns_the_function() -> None:
    def f(self: object, x: int) -> int:
        return x

    assert trio_bridge.worker.tool(f) is f
    assert trio_bridge.worker.tool(description="d")(f) is f


@pytest.mark.parametrize(
    ("old", "new"),
    [("Optimization", "trio_bridge.worker.WorkerOptimization"), ("SessionInfo", "trio_bridge.SessionInfo")],
)
def test_the_worker_names_of_the_previous_release_still_import_with_a_deprecation_warning(old: str, new: str) -> None:
    """``trio_bridge.worker.Optimization`` and ``.SessionInfo`` shared their names with the
    host's classes; they stay one release, saying what to use."""
    module, name = new.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=f"trio_bridge.worker.{old} is deprecated.*use {new}"):
        assert getattr(trio_bridge.worker, old) is getattr(importlib.import_module(module), name)
    with pytest.warns(DeprecationWarning):
        exec(f"from trio_bridge.worker import {old}", {})  # the way users import it
    assert old not in trio_bridge.worker.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trio_bridge.worker.nope  # noqa: B018
