"""SIGINT/SIGTERM that reached the command line before it could act on them (import-light)."""

from __future__ import annotations

import signal
import threading
from typing import Any

received: list[int] = []
"""Signals received so far, in order."""


def _remember(signum: int, frame: Any) -> None:
    received.append(signum)


def remember_signals() -> dict[int, Any]:
    """Make SIGINT and SIGTERM only append to :data:`received` (main thread only; elsewhere
    Python cannot set handlers). Returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _remember) for signum in (signal.SIGINT, signal.SIGTERM)}
