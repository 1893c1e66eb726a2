"""``open_pool``'s options from ``TRIO_BRIDGE_*`` environment variables: an option the call
leaves at its default takes its variable's value when that is set (a deployment sets them; the
program's own arguments win). The defaults in ``open_pool``'s signature are marked with
:func:`default` so that a value the caller passed -- even one equal to the default -- is told
apart from one it left out; ``None`` defaults count as left out."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from trio_bridge._errors import InvalidArgumentError

T = TypeVar("T")


class _DefaultInt(int):
    __slots__ = ()


class _DefaultFloat(float):
    __slots__ = ()


class _DefaultStr(str):
    __slots__ = ()


def default(value: T) -> T:
    """``value``, marked as a default of ``open_pool``'s signature (it prints and compares as
    itself)."""
    for plain, marked in ((int, _DefaultInt), (float, _DefaultFloat), (str, _DefaultStr)):
        if type(value) is plain:
            return marked(value)  # type: ignore[return-value]
    return value


def _optional_whole(text: str) -> int | None:
    return None if text.lower() in ("none", "off") else int(text)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1, true, yes, on, or 0, false, no, off")


#: option -> (variable, parser); the README's "Configuration from the environment" lists them
VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "size": ("TRIO_BRIDGE_WORKERS", int),
    "concurrency": ("TRIO_BRIDGE_CONCURRENCY", int),
    "max_queue": ("TRIO_BRIDGE_MAX_QUEUE", int),
    "startup_timeout": ("TRIO_BRIDGE_STARTUP_TIMEOUT", float),
    "shutdown_timeout": ("TRIO_BRIDGE_SHUTDOWN_TIMEOUT", float),
    "cancel_grace": ("TRIO_BRIDGE_CANCEL_GRACE", float),
    "health_check_interval": ("TRIO_BRIDGE_HEALTH_CHECK_INTERVAL", float),
    "heartbeat_interval": ("TRIO_BRIDGE_HEARTBEAT_INTERVAL", float),
    "no_worker_timeout": ("TRIO_BRIDGE_NO_WORKER_TIMEOUT", float),
    "transport": ("TRIO_BRIDGE_TRANSPORT", _choice("unix", "tcp")),
    "shared_memory_threshold": ("TRIO_BRIDGE_SHARED_MEMORY_THRESHOLD", _optional_whole),
    "state": ("TRIO_BRIDGE_STATE", str),
    "start_method": ("TRIO_BRIDGE_START_METHOD", _choice("forkserver", "spawn")),
    "max_calls_per_worker": ("TRIO_BRIDGE_MAX_CALLS_PER_WORKER", int),
    "max_worker_age": ("TRIO_BRIDGE_MAX_WORKER_AGE", float),
    "max_worker_memory": ("TRIO_BRIDGE_MAX_WORKER_MEMORY", int),
    "metrics_address": ("TRIO_BRIDGE_METRICS_ADDRESS", str),
    "status_public": ("TRIO_BRIDGE_STATUS_PUBLIC", _flag),
    "gpus_per_worker": ("TRIO_BRIDGE_GPUS_PER_WORKER", int),
}


def left_at_default(value: Any) -> bool:
    return value is None or isinstance(value, (_DefaultInt, _DefaultFloat, _DefaultStr))


def with_environment(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``options`` (``open_pool``'s arguments by name), each left at its default replaced by its
    variable's value where that is set and not empty.

    Raises:
        InvalidArgumentError: a variable's value does not parse (the message names the variable).
    """
    environ = os.environ if environ is None else environ
    resolved = dict(options)
    forgotten = VARIABLES.keys() - resolved.keys()
    if forgotten:  # a bug of ours: such an option would never read its variable
        raise TypeError(f"with_environment() needs every option of VARIABLES; missing: {', '.join(sorted(forgotten))}")
    for name, (variable, parse) in VARIABLES.items():
        if not left_at_default(resolved[name]):
            continue
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        try:
            resolved[name] = parse(raw)
        except ValueError as exc:
            raise InvalidArgumentError(f"{variable}={raw!r} does not set {name}: {exc}") from None
    return resolved
