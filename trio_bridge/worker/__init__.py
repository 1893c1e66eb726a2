"""The worker side: what runs inside each worker process (asyncio, import-light).

Users import :class:`Adapter`, :func:`tool` and :class:`SessionContext` from here::

    from trio_bridge.worker import Adapter, SessionContext, tool
"""

from trio_bridge.worker._adapter import Adapter, tool
from trio_bridge.worker._context import Optimization, SessionContext
from trio_bridge.worker._host_client import SessionInfo

__all__ = ["Adapter", "Optimization", "SessionContext", "SessionInfo", "tool"]

# Show the classes as ``trio_bridge.worker.X`` (reprs, docs, pickling), as trio's fixup_module_metadata.
for _cls in (Adapter, Optimization, SessionContext, SessionInfo):
    _cls.__module__ = __name__
del _cls
