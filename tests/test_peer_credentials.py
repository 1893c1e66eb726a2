"""Unix peers checked: a process of another uid that connects to a pool's host socket or to a
worker's socket (Linux's abstract namespace: no file permissions keep it out) is closed on before
the server's first byte, health checks included; our own uid is served; ``allowed_uids`` lets
another uid in. The other uid is a real process (``nobody``, 65534) running a grpcio client."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import trio

from tests.test_standard_services import grpcio_target
from trio_bridge import LocalWorkers, open_pool
from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.auth import PeerCheck, parse_allowed_uids
from trio_bridge._wire.transport import parse_address

NOBODY = 65534

# Becomes uid UID (if not -1) once grpcio is loaded (the interpreter may live where that uid
# cannot read: /root), then: a grpcio health check (grpc.health.v1, no secret: b"" is an empty
# HealthCheckRequest, b"\x08\x01" the reply SERVING), and a raw connection: how many bytes the
# server sends first (its HTTP/2 SETTINGS), 0 or "reset" when it closes at once.
CLIENT = r"""
import json, os, socket, sys
import grpc

target, path, port, uid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
path = "\0" + path[1:] if path.startswith("@") else path
seen = {"pid": os.getpid()}
with grpc.insecure_channel(target) as channel:
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    if uid != -1:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    seen["uid"] = os.getuid()
    try:
        reply = check(b"", timeout=10)
        seen["health"] = "SERVING" if reply == b"\x08\x01" else reply.hex()
    except grpc.RpcError as exc:
        seen["health"] = exc.code().name
raw = socket.socket(socket.AF_UNIX) if port == 0 else socket.socket(socket.AF_INET)
raw.settimeout(10)
raw.connect(path if port == 0 else (path, port))
try:
    seen["first bytes"] = len(raw.recv(100))
except ConnectionResetError:
    seen["first bytes"] = "reset"
raw.close()
print(json.dumps(seen))
"""


async def ask(address: str, *, uid: int | None) -> dict:
    """Run the client (as ``uid``; ``None``: ours) against ``address``: what it saw, and its pid."""
    if uid is not None and os.geteuid() != 0:
        pytest.fail("this test runs a client as another uid (setuid): run it as root")
    _, where, port = parse_address(address)
    if where.startswith("\0"):
        where = "@" + where[1:]  # an abstract name (argv cannot hold NUL)
    result = await trio.run_process(
        [sys.executable, "-c", CLIENT, grpcio_target(address), where, str(port), str(-1 if uid is None else uid)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    seen = json.loads(result.stdout)
    assert seen["uid"] == (os.getuid() if uid is None else uid)
    return seen


def refused(seen: dict) -> bool:
    return seen["health"] == "UNAVAILABLE" and seen["first bytes"] in (0, "reset")


@pytest.mark.real_process
async def test_a_process_of_another_uid_is_refused_by_the_host_and_the_worker(caplog):
    caplog.set_level(logging.WARNING, logger="trio_bridge.wire")
    async with open_pool("tests.adapters:Echo", size=1) as pool:
        (worker,) = pool.workers()
        assert worker.address.startswith("unix:@")  # abstract: no file permissions to rely on
        at_host = await ask(pool._spec.host_address, uid=NOBODY)
        at_worker = await ask(worker.address, uid=NOBODY)
        assert await pool.execute("echo", {"value": 1}) == 1  # the pool serves on
    assert refused(at_host), at_host
    assert refused(at_worker), at_worker
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_bridge.wire"]
    assert any(f"pid {at_host['pid']}, uid {NOBODY}" in line for line in lines), lines  # the host's own line


@pytest.mark.real_process
async def test_our_own_uid_is_served():
    async with open_pool("tests.adapters:Echo", size=1) as pool:
        (worker,) = pool.workers()
        at_host = await ask(pool._spec.host_address, uid=None)
        at_worker = await ask(worker.address, uid=None)
    for seen in (at_host, at_worker):
        assert seen["health"] == "SERVING" and isinstance(seen["first bytes"], int) and seen["first bytes"] > 0, seen


@pytest.mark.real_process
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
async def test_allowed_uids_lets_another_uid_in(start_method):
    async with open_pool("tests.adapters:Echo", size=1, local=LocalWorkers(allowed_uids=[NOBODY], start_method=start_method)) as pool:
        assert pool.start_method == start_method  # the variable reaches forked workers too
        (worker,) = pool.workers()
        at_host = await ask(pool._spec.host_address, uid=NOBODY)
        at_worker = await ask(worker.address, uid=NOBODY)
    assert at_host["health"] == at_worker["health"] == "SERVING", (at_host, at_worker)


@pytest.mark.real_process
async def test_tcp_is_not_checked_by_uid():
    """A worker on TCP: the secret (and TLS) guard it, not the peer's uid."""
    async with open_pool("tests.adapters:Echo", size=1, transport="tcp") as pool:
        (worker,) = pool.workers()
        seen = await ask(worker.address, uid=NOBODY)
    assert seen["health"] == "SERVING", seen


async def test_allowed_uids_must_be_uids():
    for bad in (["1001"], [-1], [True], "1001", 1001):
        with pytest.raises(InvalidArgumentError, match="allowed_uids"):
            async with open_pool("tests.adapters:Echo", size=1, local=LocalWorkers(allowed_uids=bad)):  # type: ignore[arg-type]
                pass


def test_the_workers_variable_parses_or_names_itself():
    assert parse_allowed_uids("") == frozenset()
    assert parse_allowed_uids("1001, 1002,") == {1001, 1002}
    for bad in ("nobody", "-1", "1001;1002", "²"):
        with pytest.raises(ValueError, match="TRIO_BRIDGE_ALLOWED_UIDS"):
            parse_allowed_uids(bad)


def test_root_and_our_own_uid_are_always_allowed():
    assert PeerCheck().allowed == {os.getuid(), 0}
    assert PeerCheck([NOBODY]).allowed == {os.getuid(), 0, NOBODY}
