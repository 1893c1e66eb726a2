"""An allowed module for the allowlist tests (``allow: ["tests.allowlist_targets"]``), shaped
the way an attacker would use one: it imports other modules, re-exports builtins and foreign
functions, holds foreign objects, and has functions that hand out what it should not. Its own
honest parts (``add``, ``Model``) must keep working. ``tests.allowlist_foreign`` is outside."""

from __future__ import annotations

import collections
import functools
import itertools
import operator
import os
import subprocess
import types
from typing import Any

import numpy as np

from tests import allowlist_foreign as foreign
from tests.allowlist_foreign import Loud, Reader, Spy


def add(a: float, b: float) -> float:
    return a + b


evaluate = eval  # a builtin, re-exported
getcwd = os.getcwd  # a C function of posix (os)
partial_own = functools.partial(add, 1)  # a partial of our own: fine
partial_foreign = functools.partial(foreign.run, "x")  # a partial of a foreign function
cached_own = functools.lru_cache(add)  # a cache's wrapper of our own: fine
cached_foreign = functools.lru_cache(foreign.run)
loud = Loud()  # a callable instance of a foreign class
spy = Spy()  # a foreign instance met on the way
anonymous = types.FunctionType(add.__code__, {})  # a function of no module
anonymous.__module__ = None  # type: ignore[assignment]
numbers = [1, 2, 3]
alias = list[int]


class Liar:
    """A class that says it is os's: the allowlist believes ``__module__``."""


Liar.__module__ = "os"


def give_os() -> types.ModuleType:
    return os


def give_popen() -> type:
    return subprocess.Popen


def give_run() -> Any:
    return foreign.run


def give_nested_eval() -> list[Any]:
    return [1, {"f": eval}]


def give_object_array() -> np.ndarray:
    return np.array([1, foreign.run], dtype=object)


def give_ufunc() -> np.ufunc:
    return np.sin  # before NumPy 2.2 a ufunc carries no __module__: numpy's by its class


def give_generator() -> Any:
    yield 1


def give_repeat() -> Any:
    """A lazy iterator of an allowed module carrying a foreign function."""
    return itertools.repeat(foreign.run, 1)


def give_deque() -> collections.deque[Any]:
    return collections.deque([1, foreign.run])


def give_defaultdict() -> collections.defaultdict[Any, Any]:
    return collections.defaultdict(foreign.run)


def give_holder() -> Model:
    """An allowed instance holding a foreign function in an attribute."""
    model = Model()
    model.hook = foreign.run  # type: ignore[attr-defined]
    return model


def give_slice(foreign_bound: bool) -> slice:
    return slice(foreign.run if foreign_bound else 1, None)


def give_attrgetter() -> Any:
    return operator.attrgetter("__globals__")


measure = np.testing.measure  # numpy.testing's exec, re-exported from an allowed module


def give_numbers() -> list[Any]:
    return [1, 2.5, "three", None, np.arange(3), {"k": (4, 5)}]


def smuggle(items: list[Any]) -> int:
    """An allowed function that slips a foreign function into a list it is given."""
    items.append(foreign.run)
    return len(items)


class Model:
    """An honest estimator: fit, predict, score, a property."""

    shortcut = staticmethod(foreign.run)  # a foreign function as a class attribute
    plain = staticmethod(add)
    reader = Reader()  # a foreign descriptor

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def fit(self, x: Any) -> Model:
        self.mean_ = float(np.mean(x)) * self.scale
        return self

    def predict(self, x: Any) -> np.ndarray:
        return np.full(len(x), self.mean_)

    def score(self, x: Any) -> float:
        return -float(np.mean((np.asarray(x) - self.mean_) ** 2))

    @property
    def fitted(self) -> bool:
        return "mean_" in vars(self)

    def __call__(self, x: Any) -> np.ndarray:
        return self.predict(x)


class Inheritor(Spy):
    """An allowed class with a foreign base: its own method is fine, inherited code is not."""

    def own(self) -> str:
        return "own"
