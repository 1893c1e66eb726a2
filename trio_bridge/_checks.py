"""Checks of one option's value, shared by the option groups (``_host/_options.py``) and the
state backends' constructors: each returns the value, or raises :class:`InvalidArgumentError`
naming the option (``name``) and what it must be."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import short_repr


def positive_seconds(name: str, value: Any) -> float:
    """``value``, a finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidArgumentError(f"{name} must be a number of seconds > 0, not {short_repr(value)}")
    return value


def whole(least: int) -> Callable[[str, Any], int]:
    """The check of a whole number >= ``least``."""

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(f"{name} must be a whole number >= {least}, not {short_repr(value)}")
        return value

    return check
