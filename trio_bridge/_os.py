"""Operating-system facts both sides ask about."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie counts; one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
