"""trio-bridge: drive a pool of Python worker processes from Trio, over gRPC.

The host API (``open_pool`` and friends) is imported on first use, so that worker processes,
which import ``trio_bridge.worker``, do not pay for Trio at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trio_bridge._errors import (
    DeadlineExceededError,
    DependencyCycleError,
    EncodeError,
    IdempotencyConflictError,
    InvalidArgumentError,
    InvalidVariableError,
    NotAllowedError,
    PoolClosedError,
    PoolInternalError,
    PoolSaturatedError,
    QuotaExceededError,
    SessionExistsError,
    SessionNotFoundError,
    StateUnavailableError,
    StoredObjectLostError,
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
from trio_bridge._version import __version__ as __version__  # (the `as`: a re-export for type checkers)

if TYPE_CHECKING:
    from trio_bridge._host._metrics import PoolStatistics, SessionQueueStatistics
    from trio_bridge._host._options import Lifecycle, LocalWorkers, Monitoring, Recycling, RemoteWorkers, StateLimits
    from trio_bridge._host._pool import Pool, open_pool
    from trio_bridge._host._session import Optimization, Session
    from trio_bridge._host._tools import ParameterInfo, ToolInfo
    from trio_bridge._host._worker import WorkerInfo
    from trio_bridge._state.backend import MemoryBackend, StateBackend
    from trio_bridge._state.calls import Claim
    from trio_bridge._state.redis import RedisBackend
    from trio_bridge._state.sessions import SessionInfo
    from trio_bridge._state.variables import HistoryEntry, Variable, VariableUpdate
    from trio_bridge._wire.tls import TLSConfig

__all__ = [
    "Claim",
    "DeadlineExceededError",
    "DependencyCycleError",
    "EncodeError",
    "HistoryEntry",
    "IdempotencyConflictError",
    "InvalidArgumentError",
    "InvalidVariableError",
    "Lifecycle",
    "LocalWorkers",
    "MemoryBackend",
    "Monitoring",
    "NotAllowedError",
    "Optimization",
    "ParameterInfo",
    "Pool",
    "PoolClosedError",
    "PoolInternalError",
    "PoolSaturatedError",
    "PoolStatistics",
    "QuotaExceededError",
    "Recycling",
    "RedisBackend",
    "RemoteWorkers",
    "Session",
    "SessionExistsError",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionQueueStatistics",
    "StateBackend",
    "StateLimits",
    "StateUnavailableError",
    "StoredObjectLostError",
    "TLSConfig",
    "ToolError",
    "ToolInfo",
    "ToolNotFoundError",
    "TrioBridgeError",
    "Variable",
    "VariableError",
    "VariableLockedError",
    "VariableNotFoundError",
    "VariableUpdate",
    "VersionConflictError",
    "WorkerBusyError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "WorkerStartError",
    "open_pool",
]

# Show the eagerly imported classes (the errors) as ``trio_bridge.X``; the lazily imported ones
# carry ``@public_module`` themselves (after trio's ``fixup_module_metadata``).
for _name in __all__:
    _obj = globals().get(_name)
    if isinstance(_obj, type) and _obj.__module__.startswith(__name__ + "."):
        _obj.__module__ = __name__
del _name, _obj

_LAZY: dict[str, str] = {
    "Session": "trio_bridge._host._session",
    "Optimization": "trio_bridge._host._session",
    "Variable": "trio_bridge._state.variables",
    "VariableUpdate": "trio_bridge._state.variables",
    "HistoryEntry": "trio_bridge._state.variables",
    "SessionInfo": "trio_bridge._state.sessions",
    "StateBackend": "trio_bridge._state.backend",
    "MemoryBackend": "trio_bridge._state.backend",
    "Claim": "trio_bridge._state.calls",
    "RedisBackend": "trio_bridge._state.redis",
    "TLSConfig": "trio_bridge._wire.tls",
    "Lifecycle": "trio_bridge._host._options",
    "Recycling": "trio_bridge._host._options",
    "StateLimits": "trio_bridge._host._options",
    "Monitoring": "trio_bridge._host._options",
    "LocalWorkers": "trio_bridge._host._options",
    "RemoteWorkers": "trio_bridge._host._options",
    "open_pool": "trio_bridge._host._pool",
    "Pool": "trio_bridge._host._pool",
    "PoolStatistics": "trio_bridge._host._metrics",
    "SessionQueueStatistics": "trio_bridge._host._metrics",
    "ToolInfo": "trio_bridge._host._tools",
    "ParameterInfo": "trio_bridge._host._tools",
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
