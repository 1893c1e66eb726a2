"""Reading an option from its ``TRIO_BRIDGE_*`` environment variable: the parsers of the
variables' text, and the one error a value that does not parse (or is out of range) gets, which
names the variable. Which option reads which variable is in ``_options`` (each field's
metadata); the README's "Configuration from the environment" lists them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from trio_bridge._errors import InvalidArgumentError


def optional_whole(text: str) -> int | None:
    """A whole number, or ``None`` for ``none`` or ``off``."""
    return None if text.lower() in ("none", "off") else int(text)


def choice(*allowed: str) -> Callable[[str], str]:
    """A parser of one of ``allowed``."""
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def flag(text: str) -> bool:
    """``1, true, yes, on`` or ``0, false, no, off`` (any case)."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1, true, yes, on, or 0, false, no, off")


def read_variable(
    environ: Mapping[str, str], variable: str, parse: Callable[[str], Any], option: str, check: Callable[[Any], Any],
) -> tuple[bool, Any]:
    """``(True, value)`` of ``variable`` in ``environ``, parsed and checked as ``option``'s
    value; ``(False, None)`` where it is not set or empty.

    Raises:
        InvalidArgumentError: the value does not parse, or ``check`` refuses it (the message
            names the variable, its value and the option).
    """
    raw = environ.get(variable, "").strip()
    if not raw:
        return False, None
    try:
        return True, check(parse(raw))
    except (ValueError, InvalidArgumentError) as exc:
        raise InvalidArgumentError(f"{variable}={raw!r} does not set {option}: {exc}") from None
