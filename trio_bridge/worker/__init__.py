"""The worker side: what runs inside each worker process (asyncio, import-light).

Users import :class:`Adapter`, :func:`tool` and :class:`SessionContext` from here::

    from trio_bridge.worker import Adapter, SessionContext, tool
"""

from trio_bridge.worker._adapter import Adapter, tool
from trio_bridge.worker._context import SessionContext

__all__ = ["Adapter", "SessionContext", "tool"]
