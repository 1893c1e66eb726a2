"""`trio-bridge mcp`: a pool's tools served over the Model Context Protocol on stdio, driven by
the official SDK's own client as an agent would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import trio

from tests.helpers import require
from tests.host_fault_adapters import StrFails
from tests.test_tool_schemas import ADD_SCHEMA
from trio_bridge.testing import open_pool_in_threads

mcp = require("mcp")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SERVER = [sys.executable, "-m", "trio_bridge", "mcp", "tests.adapters:Echo", "--workers", "1"]


def scale(values: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """A host tool for the server under test (``--host-tools tests.test_mcp:scale``).

    Args:
        values: what to scale.
        factor: by how much.
    """
    return values * factor


def _server_and_descendants() -> list[psutil.Process]:
    """The `trio-bridge mcp` process this test started and everything under it."""
    for child in psutil.Process().children():
        try:
            if "mcp" in child.cmdline() and "trio_bridge" in child.cmdline():
                return [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _text(result: Any) -> str:
    assert len(result.content) == 1 and result.content[0].type == "text"
    return result.content[0].text


@pytest.mark.real_process
async def test_an_agent_lists_and_calls_the_tools_and_closing_leaves_no_process(tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=SERVER[0], args=[*SERVER[1:], "--host-tools", "tests.test_mcp:scale"],
        env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT),
    )
    log = tmp_path / "stderr.txt"
    with log.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            listed = {t.name: t for t in (await session.list_tools()).tools}
            assert {"add", "count", "fail", "pid", "scale"} <= set(listed)
            assert listed["add"].description == "Add two integers."
            assert listed["add"].input_schema == ADD_SCHEMA
            assert "list of its chunks" in (listed["count"].description or "")
            assert listed["scale"].input_schema["properties"]["values"]["type"] == "array"  # a host tool's

            added = await session.call_tool("add", {"a": 1})
            assert not added.is_error and json.loads(_text(added)) == 3
            failed = await session.call_tool("fail", {"message": "no good"})
            assert failed.is_error and _text(failed) == "ToolError: tool 'fail' raised ValueError: no good"
            refused = await session.call_tool("add", {"a": "one"})
            assert refused.is_error and "InvalidArgumentError" in _text(refused) and "'a'" in _text(refused)
            unknown = await session.call_tool("nope", {})
            assert unknown.is_error and "nope" in _text(unknown)
            counted = await session.call_tool("count", {"n": 3})
            assert json.loads(_text(counted)) == [0, 1, 2]  # a streaming tool: its chunks
            scaled = await session.call_tool("scale", {"values": [[1, 2], [3, 4.5]], "factor": 2})
            assert json.loads(_text(scaled)) == [[2, 4], [6, 9]]  # nested lists in, an array out (as lists)
            still = await session.call_tool("add", {"a": 40, "b": 2})  # errors did not hurt the server
            assert json.loads(_text(still)) == 42

            worker_pid = json.loads(_text(await session.call_tool("pid", {})))
            processes = _server_and_descendants()
            assert worker_pid in {p.pid for p in processes}
    # the client closed stdin: the server closed its pool in order (no kill needed) and exited
    deadline = time.monotonic() + 10
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(processes), _alive(processes)
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    err = log.read_text()
    assert "the client closed stdin; the pool is closed" in err and "Traceback" not in err, err


@pytest.mark.real_process
def test_ctrl_c_stops_the_server_while_it_waits_for_the_client(tmp_path: Path) -> None:
    # The client keeps stdin open and silent: the server sits in a read of stdin, which Ctrl-C
    # must end at once (the pool then closes in order).
    process = subprocess.Popen(
        SERVER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline().decode()  # the first line: it serves
        assert "serving the tools of tests.adapters:Echo" in line, line
        processes = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        os.kill(process.pid, signal.SIGINT)
        sent = time.monotonic()
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 5
    assert process.returncode == 130, err.decode()
    assert out == b""  # stdout is the protocol's: nothing else went there
    assert "interrupted: the pool was shut down" in err.decode() and "Traceback" not in err.decode()
    assert not _alive(processes)


def test_help_says_what_it_serves_without_raw_markup() -> None:
    import re

    from typer.testing import CliRunner

    from trio_bridge.cli import _app as app

    result = CliRunner().invoke(app, ["mcp", "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Model Context Protocol" in result.stdout and "--host-tools" in result.stdout
    assert not re.search(r"`|\[/?(bold|red|green|yellow)|\[/\]|\*\*", result.stdout), result.stdout


@pytest.mark.real_process
async def test_sighup_reloads_the_adapters_code_and_a_broken_module_keeps_the_old_workers(tmp_path: Path) -> None:
    import trio

    from tests.helpers import wait_for
    from tests.test_reload import ADAPTER, write_module

    write_module(tmp_path, 1)
    params = StdioServerParameters(
        command=SERVER[0], args=["-m", "trio_bridge", "mcp", ADAPTER, "--workers", "2"],
        env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}, cwd=str(ROOT),
    )
    log = tmp_path / "stderr.txt"
    with log.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert json.loads(_text(await session.call_tool("answer", {}))) == 1
            (server, *_) = _server_and_descendants()

            write_module(tmp_path, 2)
            server.send_signal(signal.SIGHUP)
            await wait_for(lambda: "SIGHUP: reloaded reload_target:Versioned (2 worker(s) replaced)" in log.read_text(), timeout=60)
            assert json.loads(_text(await session.call_tool("answer", {}))) == 2  # the next call: the new code

            write_module(tmp_path, 3, broken=True)
            server.send_signal(signal.SIGHUP)
            await wait_for(lambda: "pool.reload() of reload_target:Versioned failed" in log.read_text(), timeout=60)
            await trio.sleep(0.2)
            answers = [json.loads(_text(await session.call_tool("answer", {}))) for _ in range(4)]
            assert answers == [2] * 4  # the old workers serve on
            assert server.is_running()
    err = log.read_text()
    assert err.count("pool.reload() of reload_target:Versioned failed") == 1 and "SyntaxError" in err, err
    assert "the client closed stdin; the pool is closed" in err, err


async def test_the_mcp_server_answers_a_host_tools_base_exception_as_an_error_result():
    """A host tool's BaseException escaped the MCP server's tools/call (it caught Exceptions), and
    an error whose __str__ raised became the SDK's 'Internal server error': now both are results
    with isError, naming the error, and the server goes on."""
    from trio_bridge.mcp import create_server

    async with open_pool_in_threads("tests.host_fault_adapters:HostCaller", size=1) as pool:
        @pool.host_tool
        def host_stop() -> None:
            raise GeneratorExit("stopped")

        @pool.host_tool
        def host_str_fails() -> None:
            raise StrFails()

        with trio.fail_after(20):
            async with mcp.Client(create_server(pool)) as client:
                for name, text in [("host_stop", "GeneratorExit: stopped"), ("host_str_fails", "StrFails: <exception str() failed>")]:
                    result = await client.call_tool(name, {})
                    assert result.is_error and result.content[0].text == text
                assert (await client.call_tool("add", {"a": 1})).content[0].text == "3"
