"""The `trio-bridge` command as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from trio_bridge.cli import app

runner = CliRunner()


def test_tools_lists_parameters_types_defaults_and_streaming_flags():
    result = runner.invoke(app, ["tools", "tests.adapters:Echo"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows: dict[str, list[str]] = {}
    name = ""
    for line in result.output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 4:
            name = cells[0] or name  # a parameter on a continuation line belongs to the row above
            rows.setdefault(name, []).append(cells)
    add = rows["add"]
    assert [c[2] for c in add] == ["a: int", "b: int = 2"] and add[0][3] == "Add two integers."
    assert rows["count"][0][1] == "yes" and add[0][1] == ""
    assert rows["count"][0][2] == "n: int"


def test_tools_with_a_bad_adapter_path_says_why():
    result = runner.invoke(app, ["tools", "no_such_module_xyz:Thing"])
    assert result.exit_code == 1
    assert "No module named 'no_such_module_xyz'" in result.output


@pytest.mark.real_process
def test_run_a_tool_with_typed_arguments():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add", "--arg", "a=40", "--json", '{"b": 2}'])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "42"


@pytest.mark.real_process
def test_run_a_streaming_tool_prints_each_chunk():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "async_count", "--arg", "n=3"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["{'i':", "0}", "{'i':", "1}", "{'i':", "2}"]


@pytest.mark.real_process
def test_run_reports_tool_errors_and_exits_1():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "fail", "--arg", "message=boom"])
    assert result.exit_code == 1
    assert "ToolError" in result.output and "boom" in result.output


@pytest.mark.real_process
def test_the_built_in_example_trains_and_classifies_accurately():
    result = runner.invoke(app, ["run", "--workers", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    accuracy = float(re.search(r"accuracy (\d\.\d+)", result.output).group(1))
    assert accuracy >= 0.9
    served = re.findall(r"│ w\d+\s+│ \d+\s+│ (\d+)\s+│", result.output)
    assert len(served) == 2 and all(int(n) > 0 for n in served)  # both workers classified batches


@pytest.mark.real_process
def test_the_sweep_example_shows_every_call_used_the_current_value():
    result = runner.invoke(app, ["run", "--example", "sweep", "--workers", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    used, total = map(int, re.search(r"(\d+)/(\d+) calls used the value current at their start", result.output).groups())
    assert used == total == 56
    assert "VariableLockedError" in result.output


@pytest.mark.real_process
def test_the_cluster_example_shares_a_session_between_two_hosts_and_a_remote_worker():
    result = runner.invoke(app, ["run", "--example", "cluster"], terminal_width=200)
    assert result.exit_code == 0, result.output  # it checks each value itself, and exits 1 otherwise
    assert "every value crossed the hosts intact" in result.output


@pytest.mark.real_process
def test_the_tools_example_and_host_tools_from_the_command_line():
    result = runner.invoke(app, ["run", "--example", "tools", "--workers", "2"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "host   streaming tool tail" in result.output and "worker tool research" in result.output
    result = runner.invoke(app, [
        "run", "trio_bridge.examples.agent:Researcher", "research", "--arg", "topic=dog", "--workers", "2",
        "--host-tools", "trio_bridge.examples.agent:lookup,trio_bridge.examples.agent:tail",
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "'related': ['canine', 'puppy', 'hound', 'wolf', 'terrier']" in result.output


def test_host_tools_option_says_what_it_cannot_load():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "pid", "--host-tools", "trio_bridge.examples.agent:nope"])
    assert result.exit_code == 2 and "cannot load 'trio_bridge.examples.agent:nope'" in result.output


@pytest.mark.real_process
@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_run_stops_cleanly_on_a_signal_while_a_call_runs(signum, status, word):
    # A real process: the CLI installs its own handlers (SIGTERM too) and shuts the pool down.
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_bridge", "run", "tests.adapters:Echo", "sleep", "--arg", "seconds=60",
         "--shutdown-timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's background job ignores it
    )
    try:
        host = psutil.Process(process.pid)
        deadline = time.monotonic() + 30
        workers: list[psutil.Process] = []
        while not workers and time.monotonic() < deadline:
            workers = [p for p in host.children() if "trio_bridge.worker" in " ".join(p.cmdline())]
            time.sleep(0.05)
        assert workers, "no worker started"
        time.sleep(1.5)  # the worker is ready and the call runs
        os.kill(process.pid, signum)
        sent = time.monotonic()
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 1 + 1 + 1.5  # shutdown_timeout + 1, and a margin for a loaded machine
    assert process.returncode == status, err.decode()
    assert f"{word}: the pool was shut down" in err.decode() and "Traceback" not in err.decode()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
