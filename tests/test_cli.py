"""The `trio-bridge` command as a user runs it."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

import trio_bridge
from trio_bridge.cli import _app as app

runner = CliRunner()


def test_tools_lists_parameters_types_defaults_descriptions_and_streaming_flags():
    result = runner.invoke(app, ["tools", "tests.adapters:Echo"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]
    at = lines.index("add(a, b)")
    assert lines[at + 1:at + 4] == ["    Add two integers.", "    a  int      the first term.", "    b  int = 2  the second term."]
    assert "count(n, delay)  streaming" in lines and "add(a, b)  streaming" not in lines


def test_tools_renders_docstrings_as_plain_text_and_wraps_them():
    result = runner.invoke(app, ["tools", "trio_bridge.examples.digits:Digits"], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert "``" not in result.output and ":class:" not in result.output
    words = " ".join(result.output.split())  # wrapped, not cut: every word of the docstrings is there
    assert 'The test split, never used in training: {"images": (n, 8, 8) float32, "labels": (n,) int64}.' in words
    assert "(n, 8, 8) or (n, 64) pixel values 0..16." in words
    assert "…" not in result.output and all(len(line) <= 60 for line in result.output.splitlines())


def test_plain_strips_rest_inline_markup():
    from trio_bridge.cli import _plain

    assert _plain("``x`` and :class:`~trio_bridge.Pool`, :func:`f`, `t`, **b**, *e*, a * b") == "x and Pool, f, t, b, e, a * b"


def test_tools_with_a_bad_adapter_path_says_why_in_one_line():
    result = runner.invoke(app, ["tools", "no_such_module_xyz:Thing"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: cannot import module 'no_such_module_xyz' for adapter 'no_such_module_xyz:Thing': No module named "
        "'no_such_module_xyz'. The adapter must be importable from the current directory or PYTHONPATH "
        "(package.module:ClassName)"
    ]


@pytest.mark.parametrize(
    ("adapter", "says"),
    [
        ("no.such:Adapter", "error: cannot import module 'no.such' for adapter 'no.such:Adapter': No module named 'no'. "
         "The adapter must be importable from the current directory or PYTHONPATH (package.module:ClassName)"),
        ("tests.adapters", "error: adapter 'tests.adapters' is not of the form package.module:ClassName"),
        ("tests.no_such_module:Adapter", "error: cannot import module 'tests.no_such_module' for adapter"),
    ],
)
@pytest.mark.parametrize("tool", [[], ["add"]], ids=["no tool", "a tool"])
def test_run_with_a_bad_adapter_path_says_so_in_one_line_before_any_worker_starts(adapter, says, tool):
    result = runner.invoke(app, ["run", adapter, *tool], terminal_width=300)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(says)


@pytest.mark.real_process
def test_run_with_a_class_its_module_lacks_says_so_in_one_line_and_verbose_adds_the_worker_output():
    result = runner.invoke(app, ["run", "tests.adapters:Nope", "add"], terminal_width=300)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert re.match(r"error: WorkerStartError: worker w0: module 'tests.adapters' has no 'Nope' for adapter "
                    r"'tests.adapters:Nope' \(its Adapter subclasses: .*Echo.*\)\. Give the name of an Adapter subclass", line)
    result = runner.invoke(app, ["run", "tests.adapters:BrokenSetup", "add"], terminal_width=300)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "the worker's last line: RuntimeError: the model file is missing" in result.output
    verbose = runner.invoke(app, ["run", "tests.adapters:BrokenSetup", "add", "--verbose"], terminal_width=300)
    assert verbose.exit_code == 1 and "Traceback (most recent call last)" in verbose.output


@pytest.mark.real_process
def test_run_a_tool_with_typed_arguments():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add", "--arg", "a=40", "--args", '{"b": 2}'])
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
            workers = [p for p in host.children() if "trio_bridge.worker" in _command_line(p)]
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


def _command_line(process: psutil.Process) -> str:
    """Its command line; empty once it is gone (a child may exit between listing and reading)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


# --- --version, --json, doctor, environment variables, help text -------------------------------


def test_version_is_the_packaged_one():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"trio-bridge {trio_bridge.__version__}\n"
    assert trio_bridge.__version__ == importlib.metadata.version("trio-bridge")  # what hatch packaged


COMMANDS = ["run", "tools", "mcp", "worker", "top", "doctor"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=lambda c: " ".join(c) or "trio-bridge")
def test_help_shows_no_raw_markup_and_flags_as_flags(command):
    result = runner.invoke(app, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert not re.search(r"`|\[/?(bold|red|green|yellow)|\[/\]|\*\*", result.stdout), result.stdout
    assert "<bool>" not in result.stdout  # a flag takes no value
    assert re.search(r"--help\s+Show this message", result.stdout)


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"], terminal_width=100)
    listed = [m.group(1) for m in re.finditer(r"^│ (\w+) ", result.stdout, re.M)]
    assert listed == COMMANDS
    intro = " ".join(result.stdout.split("╭")[0].split())
    assert all(re.search(rf"\b{c}\b", intro.removeprefix("Usage: root [OPTIONS] COMMAND [ARGS]...")) for c in COMMANDS), intro


def test_tools_json_is_one_document_with_parameters_as_lists():
    result = runner.invoke(app, ["tools", "tests.adapters:Echo", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["adapter"] == "tests.adapters:Echo"
    tools = {t["name"]: t for t in document["tools"]}
    assert [t["name"] for t in document["tools"]] == sorted(tools)
    assert tools["add"] == {
        "name": "add", "description": "Add two integers.", "streaming": False,
        "parameters": [
            {"name": "a", "type": "int", "required": True, "default": None, "description": "the first term."},
            {"name": "b", "type": "int", "required": False, "default": 2, "description": "the second term."},
        ],
    }
    assert tools["count"]["streaming"] is True


def test_tools_takes_the_adapter_from_the_environment():
    result = runner.invoke(app, ["tools", "--json"], env={"TRIO_BRIDGE_ADAPTER": "tests.adapters:Echo"})
    assert result.exit_code == 0, result.output
    assert "add" in {t["name"] for t in json.loads(result.stdout)["tools"]}


def test_run_options_come_from_the_environment():
    # Checked before any worker starts: a bad value from the environment is a usage error.
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add"], env={"TRIO_BRIDGE_WORKERS": "0"})
    assert result.exit_code == 2 and "--workers" in result.output
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add"], env={"TRIO_BRIDGE_HOST_TOOLS": "trio_bridge.examples.agent:nope"})
    assert result.exit_code == 2 and "cannot load 'trio_bridge.examples.agent:nope'" in result.output


def test_environment_variables_are_named_in_the_help():
    result = runner.invoke(app, ["worker", "--help"], terminal_width=200)
    for name in ("TRIO_BRIDGE_ADAPTER", "TRIO_BRIDGE_LISTEN", "TRIO_BRIDGE_TOKEN_FILE", "TRIO_BRIDGE_TLS_CERT", "TRIO_BRIDGE_CONCURRENCY"):
        assert name in result.stdout
    assert "TRIO_BRIDGE_WORKERS" in runner.invoke(app, ["run", "--help"], terminal_width=200).stdout


def test_run_json_needs_a_tool_and_json_arguments_moved_to_args():
    result = runner.invoke(app, ["run", "--json"])
    assert result.exit_code == 2 and "give ADAPTER and TOOL" in result.output
    # `--json '{...}'` (the arguments, in 0.2) is refused loudly: the JSON is not silently ignored
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add", "--json", '{"a": 1}'])
    assert result.exit_code == 2


@pytest.mark.real_process
def test_run_json_prints_one_document():
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "add", "--arg", "a=40", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == 42
    result = runner.invoke(app, ["run", "tests.adapters:Echo", "async_count", "--arg", "n=3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.real_process
def test_run_json_turns_arrays_bytes_and_nan_into_plain_json():
    result = runner.invoke(app, ["run", "tests.cli_adapters:Awkward", "values", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {  # strict JSON: json.loads would take a bare NaN, jq would not
        "matrix": [[0, 1, 2], [3, 4, 5]], "scores": [0.5, "NaN"], "count": 7, "pair": [1, "b"],
        "raw": "AP9oaQ==", "limits": ["Infinity", "-Infinity"],
    }
    assert "NaN," not in result.stdout and "Infinity," not in result.stdout.replace('"Infinity",', "")
    result = runner.invoke(app, ["run", "tests.cli_adapters:Awkward", "rows", "--arg", "n=2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [{"i": 0, "row": [0.0, 0.0]}, {"i": 1, "row": [1.0, 1.0]}]


def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, str]]]:
    result = runner.invoke(app, ["doctor", "--json", *args], env=env)
    document = json.loads(result.stdout)
    assert document["ok"] == (result.exit_code == 0)
    return result.exit_code, {c["name"]: c for c in document["checks"]}


def test_doctor_passes_here_with_a_verdict_for_each_check():
    code, checks = _doctor()
    assert code == 0, checks
    expected = {"python", "/dev/shm", "fork server"} | {
        f"dependency {d}" for d in (
            "trio", "grpclib", "h2", "hyperframe", "betterproto2", "numpy", "pydantic", "protobuf", "psutil",
            "prometheus-client", "uvloop",
        )
    } | {f"wire {path}" for path in ("codec", "http2", "coalesce", "calls", "worker_calls", "abstract")}
    assert set(checks) == expected
    assert all(c["status"] in ("ok", "warn") and c["detail"] for c in checks.values())
    assert checks["dependency trio"]["detail"].startswith(importlib.metadata.version("trio"))
    h2 = f"h2 {importlib.metadata.version('h2')} (tested >="
    assert checks["wire http2"]["status"] == "ok" and checks["wire http2"]["detail"].startswith("on: ") and h2 in checks["wire http2"]["detail"]


def test_doctor_says_which_fast_path_of_the_wire_is_off_and_why(monkeypatch):
    from trio_bridge._wire import overrides

    monkeypatch.setattr(overrides, "FAST_PATHS", overrides._decide("1"))  # as TRIO_BRIDGE_STOCK_WIRE=1 at import
    code, checks = _doctor()
    assert code == 0  # slower, not broken
    for path in ("codec", "http2", "coalesce", "calls", "worker_calls"):
        assert checks[f"wire {path}"]["status"] == "warn", checks
        assert checks[f"wire {path}"]["detail"].startswith("off (TRIO_BRIDGE_STOCK_WIRE=1): the stock code path is used")
    assert checks["wire abstract"]["status"] == "ok"


def test_doctor_fails_on_an_unreachable_redis_and_names_the_check():
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
        result = runner.invoke(app, ["doctor", "--redis", url, "--timeout", "1"])
        assert result.exit_code == 1
        assert re.search(r"^redis\s+fail\s", result.stdout, re.MULTILINE) and "refused" in result.stdout, result.stdout
        assert "1 check(s) failed: redis" in result.stdout
        code, checks = _doctor(env={"TRIO_BRIDGE_REDIS_URL": url})  # the same, from the environment
    assert code == 1 and checks["redis"]["status"] == "fail"


def test_doctor_reaches_a_real_redis(redis_server):
    code, checks = _doctor("--redis", redis_server.url)
    assert code == 0 and checks["redis"]["status"] == "ok" and "reachable" in checks["redis"]["detail"]


def test_doctor_says_whether_an_address_can_be_bound():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, checks = _doctor("--address", f"tcp://127.0.0.1:{taken.getsockname()[1]}")
    assert code == 1 and checks["address"]["status"] == "fail" and "in use" in checks["address"]["detail"]
    code, checks = _doctor("--address", "127.0.0.1:0")
    assert code == 0 and checks["address"]["status"] == "ok"


def test_doctor_checks_tls_files(tmp_path):
    import trustme

    from trio_bridge.testing import Certificates

    certificates = Certificates.create(tmp_path)
    worker = certificates.tls("worker")
    code, checks = _doctor("--tls-cert", worker.cert, "--tls-key", worker.key, "--tls-ca", certificates.ca)
    assert code == 0 and [checks[n]["status"] for n in ("tls cert", "tls key", "tls ca")] == ["ok", "ok", "ok"]

    code, checks = _doctor("--tls-cert", worker.cert, "--tls-key", str(tmp_path / "host.key"))
    assert code == 1 and checks["tls key"]["status"] == "fail" and checks["tls cert"]["status"] == "ok"

    ca = trustme.CA()
    expired = ca.issue_cert("127.0.0.2", not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
    expired.cert_chain_pems[0].write_to_path(tmp_path / "expired.pem")
    expired.private_key_pem.write_to_path(tmp_path / "expired.key")
    code, checks = _doctor("--tls-cert", str(tmp_path / "expired.pem"), "--tls-key", str(tmp_path / "expired.key"))
    assert code == 1 and checks["tls cert"]["status"] == "fail" and "expired" in checks["tls cert"]["detail"]

    code, checks = _doctor("--tls-ca", str(tmp_path / "missing.pem"))
    assert code == 1 and "cannot read" in checks["tls ca"]["detail"]


def test_an_error_of_the_command_itself_reaches_the_user_as_itself():
    # The signal listener is a system task iterating a receiver that main()'s end closes: it
    # must not turn main()'s own error into a TrioInternalError (it did, for any non-TrioBridgeError).
    from trio_bridge.cli import _run_until_signal

    async def main() -> None:
        raise RuntimeError("no Redis server here")

    with pytest.raises(RuntimeError, match=r"^no Redis server here$"):
        _run_until_signal(main, [])


def test_the_built_in_example_without_scikit_learn_names_the_extra_to_install():
    hide = "import sys; sys.modules['sklearn'] = None; sys.argv = ['trio-bridge', 'tools', 'trio_bridge.examples.digits:Digits']"
    result = subprocess.run(
        [sys.executable, "-c", f"{hide}; from trio_bridge.__main__ import main; main()"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "the digits example needs scikit-learn" in result.stderr and "pip install 'trio-bridge[examples]'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
