"""trio-bridge: drive a pool of Python worker processes from Trio, over gRPC.

The host API (``open_pool`` and friends) is imported on first use, so that worker processes,
which import ``trio_bridge.worker``, do not pay for Trio and trio-asyncio at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trio_bridge._errors import (
    DeadlineExceededError,
    DependencyCycleError,
    EncodeError,
    InvalidArgumentError,
    InvalidVariableError,
    PoolClosedError,
    PoolSaturatedError,
    QuotaExceededError,
    SessionNotFoundError,
    ToolError,
    ToolNotFoundError,
    TrioBridgeError,
    VariableError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
    WorkerBusyError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
)

if TYPE_CHECKING:
    from trio_bridge._host._pool import ParameterInfo, Pool, PoolStatistics, ToolInfo, open_pool
    from trio_bridge._host._worker import WorkerInfo

__all__ = [
    "DeadlineExceededError",
    "DependencyCycleError",
    "EncodeError",
    "InvalidArgumentError",
    "InvalidVariableError",
    "ParameterInfo",
    "Pool",
    "PoolClosedError",
    "PoolSaturatedError",
    "PoolStatistics",
    "QuotaExceededError",
    "SessionNotFoundError",
    "ToolError",
    "ToolInfo",
    "ToolNotFoundError",
    "TrioBridgeError",
    "VariableError",
    "VariableLockedError",
    "VariableNotFoundError",
    "VersionConflictError",
    "WorkerBusyError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "WorkerStartError",
    "open_pool",
]

_LAZY = {
    "open_pool": "trio_bridge._host._pool",
    "Pool": "trio_bridge._host._pool",
    "PoolStatistics": "trio_bridge._host._pool",
    "ToolInfo": "trio_bridge._host._pool",
    "ParameterInfo": "trio_bridge._host._pool",
    "WorkerInfo": "trio_bridge._host._worker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_bridge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
