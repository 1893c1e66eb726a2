"""Small helpers the tests share."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from trio_bridge.testing import FakeContext


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` (sync or async) until it is true; ``trio.TooSlowError`` after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(interval)


def marks(marker_dir: Path, name: str) -> list[str]:
    """What the test adapters' tool ``name`` left in the marker directory (see conftest's ``marker_dir``)."""
    return [p.read_text() for p in marker_dir.glob(f"{name}.*") if p.suffix != ".tmp"]


async def rpc_refusal(rpc: Any) -> tuple[Any, Any]:
    """Await a grpclib stub coroutine (or drain a server stream) that must fail (asyncio side):
    its status, and the ErrorInfo in the status details."""
    from grpclib.exceptions import GRPCError

    from trio_bridge._wire.errors import info_of

    try:
        if hasattr(rpc, "__aiter__"):
            async for _ in rpc:
                pass
        else:
            await rpc
    except GRPCError as exc:
        info = info_of(exc)
        assert info is not None, f"no ErrorInfo in the details of {exc!r}"
        return exc.status, info
    raise AssertionError("the RPC succeeded")


def require(module: str) -> Any:
    """Import ``module``, a part the suite needs (from ``pip install -e '.[dev]'``): missing, the
    test fails saying so, never skips (CI must have it)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is missing ({exc}): install the test dependencies, pip install -e '.[dev]'")


async def sleep(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


def whoami(ctx: FakeContext) -> str:
    return ctx.worker_id


FAKE_TOOLS = {"sleep": sleep, "whoami": whoami}
"""Tools for ``trio_bridge.testing.open_fake_pool``: ``sleep(seconds)`` (on the Trio clock) and ``whoami``."""
