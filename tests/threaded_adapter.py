"""An adapter whose module starts a thread when it is imported (as numpy's BLAS or torch do):
a fork server cannot fork it safely, so its pools spawn."""

from __future__ import annotations

import os
import threading

from trio_bridge.worker import Adapter, tool

_never = threading.Event()
threading.Thread(target=_never.wait, name="started at import", daemon=True).start()


class Threaded(Adapter):
    @tool
    def pid(self) -> int:
        return os.getpid()
