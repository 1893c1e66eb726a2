"""An adapter for the health-listener tests: its ``setup()`` and its one tool each wait for a
file to exist, so a test decides when a worker is ready and when a call ends."""

from __future__ import annotations

import os
import time

from trio_bridge.worker import Adapter, tool

GATE_ENV = "TRIO_BRIDGE_TEST_GATE"  # the file setup() waits for
_LIMIT = 60.0  # seconds: a test that never opens a gate fails instead of hanging


def _wait_for(path: str) -> bool:
    deadline = time.monotonic() + _LIMIT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Gated(Adapter):
    def setup(self) -> None:
        if not _wait_for(os.environ[GATE_ENV]):
            raise RuntimeError(f"{os.environ[GATE_ENV]} never appeared")

    @tool
    def wait_for_file(self, path: str) -> bool:
        """Return once ``path`` exists (False after a minute)."""
        return _wait_for(path)
