"""No listener without authentication, and the secret stays where it belongs: the worker module
refuses an address beyond loopback without a secret (and plain TCP there without ``--insecure``);
``trio-bridge worker`` refuses a token file others may read; a worker's tools, and the processes
they start, never find the pool secret in their environment, spawned or forked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from typer.testing import CliRunner

import trio_bridge
from trio_bridge import InvalidArgumentError, LocalWorkers, RemoteWorkers
from trio_bridge._host._options import pool_options
from trio_bridge._host._pool import open_pool_of
from trio_bridge._host._process import WorkerProcess
from trio_bridge._wire.contract import READY_PREFIX, SECRET_ENV, SECRET_METADATA
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.transport import open_channel
from trio_bridge.cli import _app as app
from trio_bridge.testing import RemoteWorkerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "a-secret-for-the-tests-0123456789"


# ---- the secret in a worker ----


def host_answer() -> str:
    return "from the host"


def spawn_with_the_secret_in_the_environment(command: list[str], env: dict[str, str]) -> WorkerProcess:
    """A launcher that hands the secret in the environment, as the wire contract still allows
    (another host, the conformance client): ``/proc/PID/environ`` then keeps it."""
    return WorkerProcess(subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
    ))


@pytest.mark.real_process
@pytest.mark.parametrize("start_method", ["spawn", "forkserver", "environment"])
async def test_neither_the_adapter_nor_a_tools_subprocess_sees_the_pool_secret(start_method):
    custom = start_method == "environment"
    options = pool_options("tests.auth_adapters:Snoop", {"size": 1, "local": LocalWorkers(start_method=None if custom else start_method)})
    launch = spawn_with_the_secret_in_the_environment if custom else WorkerProcess.spawn
    async with open_pool_of(options, launch) as pool:
        assert pool.start_method == ("custom" if custom else start_method)
        pool.host_tool(host_answer)
        seen = await pool.execute("snoop")
        assert await pool.execute("ask_host") == "from the host"  # the worker still holds the secret
        secret = pool._spec.secret
    assert (seen["at_import"], seen["in_setup"], seen["in_tool"]) == (False, False, False)
    # `env` in a tool's subprocess; and what the worker started with (/proc/PID/environ), which
    # other processes of this user can read: clean unless the secret came in the environment.
    assert f"{SECRET_ENV}=" not in seen["env_command"] and secret not in seen["env_command"]
    assert "TRIO_BRIDGE_WORKER_ID" in seen["env_command"]  # the rest of the environment is there
    assert (secret in seen["proc_environ"]) == (start_method == "environment")


@pytest.mark.real_process
def test_a_worker_given_its_secret_on_stdin_still_refuses_calls_without_it():
    """What a spawning host does (``TRIO_BRIDGE_SECRET_ON_STDIN=1``), by hand: the secret comes
    as stdin's first line, and is required all the same."""
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | {"TRIO_BRIDGE_SECRET_ON_STDIN": "1"}
    with _worker_process(["--listen", "tcp:127.0.0.1:0"], env, stdin=f"{SECRET}\n") as address:
        assert _ping(address, None) == Status.UNAUTHENTICATED
        assert _ping(address, SECRET) is None


@pytest.mark.real_process
def test_the_worker_modules_help_does_not_wait_for_a_secret_on_stdin(tmp_path):
    """``--help`` (or a usage error) answers at once, even where the secret is to come on stdin
    and stdin stays open with nothing on it."""
    env = dict(os.environ) | {"TRIO_BRIDGE_SECRET_ON_STDIN": "1"}
    with (tmp_path / "out").open("w+b") as out, subprocess.Popen(
        [sys.executable, "-m", "trio_bridge.worker", "--help"], env=env, stdin=subprocess.PIPE, stdout=out,
    ) as process:
        try:
            code = process.wait(timeout=60)  # stdin stays open: a worker reading it would wait for good
        finally:
            process.kill()
        out.seek(0)
        assert code == 0 and b"--listen" in out.read()


# ---- the worker module: which addresses need what ----


@pytest.mark.real_process
@pytest.mark.parametrize(
    ("secret", "flags", "says"),
    [
        (None, [], f"{SECRET_ENV} is not set"),
        (None, ["--insecure"], f"{SECRET_ENV} is not set"),  # --insecure allows plain TCP, never no secret
        ("short", ["--insecure"], f"{SECRET_ENV} has 5 characters"),
        (SECRET, [], "plain TCP"),
    ],
)
def test_the_worker_module_refuses_to_listen_beyond_loopback_unprotected(secret, flags, says):
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | ({SECRET_ENV: secret} if secret else {})
    # An adapter that does not exist: the refusal comes before the adapter is imported (else exit code 3).
    result = subprocess.run(
        [sys.executable, "-m", "trio_bridge.worker", "--adapter", "no_such_module_xyz:Adapter",
         "--listen", "tcp:0.0.0.0:0", "--standalone", "--no-lifeline", *flags],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "reachable from other machines" in result.stderr
    assert result.stdout == ""  # no ready line: it never listened
    fix = "--tls-cert and --tls-key, or --insecure" if secret == SECRET else f"set {SECRET_ENV} to the hosts' token"
    assert fix in result.stderr and ("tcp:127.0.0.1" in result.stderr or secret == SECRET)


@pytest.mark.real_process
def test_the_worker_module_listens_beyond_loopback_with_a_secret_and_insecure_and_asks_for_it():
    env = {**os.environ, SECRET_ENV: SECRET}
    with _worker_process(["--listen", "tcp:0.0.0.0:0", "--insecure"], env) as address:
        assert address.startswith("tcp:0.0.0.0:")
        loopback = f"tcp:127.0.0.1:{address.rpartition(':')[2]}"
        assert _ping(loopback, None) == Status.UNAUTHENTICATED
        assert _ping(loopback, SECRET) is None


@pytest.mark.real_process
@pytest.mark.parametrize("listen", ["tcp:127.0.0.1:0", "tcp:localhost:0", f"unix:@trio-bridge-test-auth-{os.getpid()}"])
def test_the_worker_module_listens_locally_without_a_secret(listen):
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    with _worker_process(["--listen", listen], env) as address:
        assert _ping(address, None) is None


# ---- a pool's listener for remote workers ----


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "need a token"),
        ({"insecure": True}, "need a token"),  # insecure=True allows plain TCP, never no token
        ({"token": "short", "insecure": True}, "at least 16 characters"),
        ({"token": SECRET}, "plain TCP beyond this machine (tcp:0.0.0.0:0): give RemoteWorkers(tls=TLSConfig(...)), or RemoteWorkers(insecure=True)"),
    ],
)
async def test_a_pool_refuses_to_listen_beyond_loopback_unprotected(options, says):
    with pytest.raises(InvalidArgumentError, match=re.escape(says)):
        async with trio_bridge.open_pool("tests.adapters:Echo", size=1, remote=RemoteWorkers(listen="tcp://0.0.0.0:0", **options)):
            pytest.fail("the pool opened")


# ---- trio-bridge worker: the token file ----

runner = CliRunner()


def _token_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def _said(output: str) -> str:
    """The CLI's words, without the error panel's frame and line breaks."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_trio_bridge_worker_refuses_a_token_file_others_may_read_or_write(tmp_path, mode):
    path = _token_file(tmp_path, SECRET + "\n", mode)
    result = runner.invoke(
        app, ["worker", "tests.adapters:Echo", "--listen", "tcp://127.0.0.1:0", "--token-file", str(path)],
        terminal_width=1000,
    )
    assert result.exit_code == 2, result.output
    said = _said(result.output)
    assert str(path) in said and f"mode {mode:04o}" in said and f"chmod 600 {path}" in said


@pytest.mark.parametrize(("text", "says"), [("", "is empty"), ("\n  \n", "is empty"), ("short-token", "has 11 characters")])
def test_trio_bridge_worker_refuses_an_empty_or_short_token(tmp_path, text, says):
    path = _token_file(tmp_path, text, 0o600)
    result = runner.invoke(
        app, ["worker", "tests.adapters:Echo", "--listen", "tcp://127.0.0.1:0", "--token-file", str(path)],
        terminal_width=1000,
    )
    assert result.exit_code == 2, result.output
    assert says in _said(result.output) and str(path) in _said(result.output)


@pytest.mark.real_process
def test_trio_bridge_worker_starts_with_an_owner_only_token_file(tmp_path):
    path = _token_file(tmp_path, SECRET + "\n", 0o600)
    worker = RemoteWorkerProcess(
        "tests.adapters:Echo", f"tcp://127.0.0.2:{free_port('127.0.0.2')}", path, cwd=str(ROOT),
    ).start()
    try:
        assert "serving tests.adapters:Echo" in worker.ready_line
        assert _ping(worker.address, None) == Status.UNAUTHENTICATED
        assert _ping(worker.address, SECRET) is None
    finally:
        worker.kill()


def test_trio_bridge_worker_refuses_plain_tcp_beyond_loopback_without_insecure(tmp_path):
    path = _token_file(tmp_path, SECRET, 0o600)
    result = runner.invoke(
        app, ["worker", "tests.adapters:Echo", "--listen", "tcp://0.0.0.0:0", "--token-file", str(path)], terminal_width=1000,
    )
    assert result.exit_code == 2, result.output
    assert "plain TCP beyond this machine (tcp:0.0.0.0:0)" in _said(result.output)
    assert "give --tls-cert and --tls-key, or --insecure" in _said(result.output)


@pytest.mark.real_process
def test_trio_bridge_worker_with_insecure_serves_plain_tcp_beyond_loopback_and_asks_for_the_token(tmp_path):
    path = _token_file(tmp_path, SECRET, 0o600)
    port = free_port("0.0.0.0")
    worker = RemoteWorkerProcess(
        "tests.adapters:Echo", f"tcp://0.0.0.0:{port}", path, options=("--insecure",), cwd=str(ROOT),
    ).start()
    try:
        assert _ping(f"tcp:127.0.0.1:{port}", None) == Status.UNAUTHENTICATED
        assert _ping(f"tcp:127.0.0.1:{port}", SECRET) is None
    finally:
        worker.kill()


# ---- helpers ----


@contextlib.contextmanager
def _worker_process(args: list[str], env: dict[str, str], *, stdin: str = "") -> Iterator[str]:
    """``python -m trio_bridge.worker --adapter tests.adapters:Echo --standalone ARGS`` with
    ``env`` and ``stdin`` written on its stdin (held open: EOF is its lifeline's "the host is
    gone"), for the block: yields the address on its ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_bridge.worker", "--adapter", "tests.adapters:Echo", "--standalone", *args],
        env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(stdin.encode())
        process.stdin.flush()
        line = process.stdout.readline().decode()
        if not line.startswith(READY_PREFIX):
            process.kill()
            pytest.fail(f"the worker did not start: {line!r}; stderr: {process.communicate()[1]!r}")
        yield line.removeprefix(READY_PREFIX).strip()
    finally:
        process.kill()
        process.communicate()


def _ping(address: str, secret: str | None) -> Status | None:
    """Ping the worker at ``address`` (``tcp:HOST:PORT`` or ``unix:...``), sending ``secret``:
    ``None`` if it answered, else the status it refused with."""

    async def ping() -> Status | None:
        channel: Channel = open_channel(address)
        try:
            stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: secret} if secret else None)
            await stub.ping(pb.PingRequest(), timeout=10)
            return None
        except GRPCError as exc:
            return exc.status
        finally:
            channel.close()

    return asyncio.run(ping())
