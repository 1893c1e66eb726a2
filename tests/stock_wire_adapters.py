"""An adapter that says which of the wire's fast paths its worker uses (tests/test_stock_wire.py)."""

from __future__ import annotations

import sys

from tests.adapters import Echo
from trio_bridge.worker import SessionContext, tool


class StockWire(Echo):
    @tool
    def wire(self) -> dict:
        """Each fast path's state in this worker, and whether our HTTP/2 module was ever imported."""
        from trio_bridge._wire import overrides

        paths: dict[str, bool] = {name: path.on for name, path in overrides.FAST_PATHS.items()}
        return {**paths, "http2_loaded": "trio_bridge._wire.http2" in sys.modules}

    @tool
    def ask_host(self, ctx: SessionContext, name: str, arguments: dict) -> object:
        """A host tool's result, through the worker's channel to the host (an abstract socket)."""
        return ctx.call_host_tool(name, **arguments)
