"""Adapters of tests/test_idempotency.py: tools whose side effect is a line appended to a file
(so a test counts executions), returning a token made afresh by each execution."""

from __future__ import annotations

import os
import time
import uuid

from trio_bridge.worker import Adapter, tool


def _append(path: str, value: object) -> None:
    with open(path, "a") as file:  # one short write in O_APPEND: lines from several processes never mix
        file.write(f"{value} {os.getpid()}\n")


class Once(Adapter):
    @tool
    def run(self, path: str, value: object = None, seconds: float = 0.0) -> dict:
        """Append ``value`` to ``path``, sleep ``seconds``, return it with a fresh token."""
        _append(path, value)
        time.sleep(seconds)
        return {"value": value, "token": uuid.uuid4().hex}

    @tool
    def fail(self, path: str, message: str) -> None:
        """Append to ``path``, then raise ValueError(message)."""
        _append(path, message)
        raise ValueError(message)
