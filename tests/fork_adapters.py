"""Adapters for the fork-server tests (``tests/test_fork_server.py``)."""

from __future__ import annotations

import os
import sys

from tests.adapters import Echo
from trio_bridge.worker import tool


class Forked(Echo):
    """``tests.adapters:Echo`` plus tools that show how the worker was started and how it dies."""

    @tool
    def identity(self) -> dict:
        return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0)}

    @tool
    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    @tool
    def crash(self, message: str, code: int) -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(code)

    @tool
    def die_by(self, message: str, signum: int) -> None:
        print(message, file=sys.stderr, flush=True)
        os.kill(os.getpid(), signum)

