"""The worker side: what runs inside each worker process (asyncio, import-light).

Users import :class:`Adapter`, :func:`tool` and :class:`SessionContext` from here::

    from trio_bridge.worker import Adapter, SessionContext, tool
"""

from typing import Any

from trio_bridge.worker._adapter import Adapter, tool
from trio_bridge.worker._context import SessionContext, WorkerOptimization

__all__ = ["Adapter", "SessionContext", "WorkerOptimization", "tool"]

# Show the classes as ``trio_bridge.worker.X`` (reprs, docs, pickling), as trio's fixup_module_metadata.
for _cls in (Adapter, SessionContext, WorkerOptimization):
    _cls.__module__ = __name__
del _cls

# Names of the previous release, kept for one release: name -> (module, its name there, what to use).
_DEPRECATED = {
    "Optimization": ("trio_bridge.worker._context", "WorkerOptimization", "trio_bridge.worker.WorkerOptimization"),
    "SessionInfo": ("trio_bridge._state.sessions", "SessionInfo", "trio_bridge.SessionInfo (the host's and the worker's are one class)"),
}


def __getattr__(name: str) -> Any:
    if name not in _DEPRECATED:
        raise AttributeError(f"module 'trio_bridge.worker' has no attribute {name!r}")
    import importlib
    import warnings

    module, attribute, instead = _DEPRECATED[name]
    warnings.warn(
        f"trio_bridge.worker.{name} is deprecated and goes in the next release: use {instead}",
        DeprecationWarning, stacklevel=2,
    )
    return getattr(importlib.import_module(module), attribute)
