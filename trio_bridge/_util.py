"""Small typing helpers for the public API (after trio's ``_util.py``)."""

from __future__ import annotations

from abc import ABCMeta
from typing import Any, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=type)


class NoPublicConstructor(ABCMeta):
    """Metaclass of public classes that users get from the library, never construct:
    ``Pool(...)`` raises ``TypeError``; the library uses ``Pool._create(...)``."""

    def __call__(cls, *args: object, **kwargs: object) -> Any:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor: get one from the library "
            "(e.g. trio_bridge.open_pool)"
        )

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc, no-any-return]


def public_module(cls: C) -> C:
    """Show a class re-exported from ``trio_bridge`` as ``trio_bridge.X`` (reprs, docs, pickling)."""
    cls.__module__ = "trio_bridge"
    return cls
