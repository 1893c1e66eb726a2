"""The worker process's event loop: uvloop's where it is installed, asyncio's on request."""

from __future__ import annotations

import asyncio

import pytest

import trio_bridge
from tests.helpers import require
from trio_bridge.worker._server import LOOP_ENV, loop_factory

AGENT = "tests.tool_adapters:Agent"


def test_uvloop_where_it_imports_unless_asked_for_asyncio():
    uvloop = require("uvloop")
    assert loop_factory({}) is uvloop.new_event_loop
    assert loop_factory({LOOP_ENV: "asyncio"}) is None  # asyncio.Runner's default loop


def test_asyncio_without_uvloop(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert loop_factory({}) is None


@pytest.mark.real_process
async def test_worker_processes_run_on_the_loop_chosen(monkeypatch):
    uvloop = require("uvloop")
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
        pool.host_tool(lambda word: word.upper(), name="shout")
        assert await pool.execute("loop_type") == f"{uvloop.Loop.__module__}.{uvloop.Loop.__qualname__}"
        # The worker calls the host back over an abstract-namespace socket, which uvloop cannot
        # connect by name (transport._AbstractSocketChannel).
        assert pool.workers()[0].address.startswith("unix:@")
        assert await pool.execute("ask_host", {"name": "shout", "arguments": {"word": "hi"}}) == "HI"
    monkeypatch.setenv(LOOP_ENV, "asyncio")  # workers inherit the host's environment
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
        loop = asyncio.SelectorEventLoop  # asyncio's default on Linux
        assert await pool.execute("loop_type") == f"{loop.__module__}.{loop.__qualname__}"
