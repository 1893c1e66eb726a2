"""The network test bed (tests/netbed.py): hosts in namespaces that reach each other, links cut
silently and healed, processes that die with the bed, DNS, Redis and trio-bridge workers in hosts."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trio_bridge
from tests.netbed import HEAD, DnsServer, NetBed, NetBedError, sweep
from trio_bridge import RemoteWorkers

pytestmark = pytest.mark.netbed

LISTENER = "import socket, sys, time; s = socket.create_server((sys.argv[1], 9000)); print('ready', flush=True); time.sleep(60)"


def _listen(bed: NetBed, host: str) -> subprocess.Popen:
    """A TCP listener on ``host``'s address, port 9000, started in ``host``."""
    process = bed.popen(host, [sys.executable, "-c", LISTENER, bed.address(host)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def _leftovers(bed: NetBed) -> list[str]:
    """The bed's namespaces and links that still exist."""
    prefix = bed.switch.rsplit("-", 1)[0]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line for line in namespaces.splitlines() if line.startswith(prefix)] + [
        line for line in links.splitlines() if f" {bed.head.device}@" in line
    ]


def _gone(pid: int) -> bool:
    """No process ``pid`` runs (a zombie no one has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.real_process
def test_hosts_reach_each_other_and_a_cut_link_drops_packets_silently_until_healed(tmp_path):
    with NetBed(["w1", "w2"], tmp_path) as bed:
        assert [bed.hosts[name].address for name in (HEAD, "w1", "w2")] == [str(bed.network[i]) for i in (1, 2, 3)]
        _listen(bed, "w1")
        _listen(bed, "w2")
        socket.create_connection((bed.address("w1"), 9000), timeout=2).close()
        bed.cut("w1")
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # no refusal, no 'no route to host': silence until the timeout
            socket.create_connection((bed.address("w1"), 9000), timeout=0.3)
        assert time.monotonic() - started >= 0.3
        socket.create_connection((bed.address("w2"), 9000), timeout=2).close()  # the others are still there
        # ... and from inside another host too
        reach = bed.popen("w2", [sys.executable, "-c", f"import socket; socket.create_connection(('{bed.address('w1')}', 9000), 0.3)"],
                          stderr=subprocess.PIPE, text=True)
        assert reach.wait(10) == 1 and "TimeoutError" in reach.communicate()[1]
        bed.heal("w1")
        socket.create_connection((bed.address("w1"), 9000), timeout=2).close()
    assert _leftovers(bed) == []


@pytest.mark.real_process
def test_a_bed_whose_test_failed_leaves_no_namespace_link_or_process(tmp_path):
    with pytest.raises(RuntimeError, match="the test failed"), NetBed(["w1"], tmp_path, grace=0.2) as bed:
        listener = _listen(bed, "w1")
        # deaf to SIGTERM, and a child in a session of its own (not in the bed's process group)
        deaf = bed.popen("w1", ["sh", "-c", "trap '' TERM; setsid sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert deaf.stdout is not None
        escaped = int(deaf.stdout.readline())
        raise RuntimeError("the test failed")
    assert _leftovers(bed) == []
    assert all(_gone(pid) for pid in (listener.pid, deaf.pid, escaped))


def test_a_bed_whose_set_up_failed_midway_leaves_nothing(tmp_path, monkeypatch):
    def taken(self):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(DnsServer, "start", taken)
    bed = NetBed(["w1", "w2"], tmp_path)
    with pytest.raises(NetBedError, match=r"cannot serve DNS on .*:53 .*Address already in use"):
        bed.__enter__()
    assert bed.hosts["w1"].namespace is not None and _leftovers(bed) == []


def test_a_bed_left_by_a_killed_run_is_swept_away(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = f"tbnb-{dead.pid}-abcdef-w1"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    mine = f"tbnb-{os.getpid()}-abcdef-w1"  # a live run's: kept
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        assert namespace in sweep()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert namespace not in names and mine in names
    finally:
        subprocess.run(["ip", "netns", "del", mine], check=True)


def test_a_machine_that_cannot_run_the_bed_fails_the_test_saying_why(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: 1000)
        with pytest.raises(NetBedError, match="needs root"), NetBed(["w1"], tmp_path):
            pass
    with monkeypatch.context() as patch:
        patch.setenv("PATH", str(tmp_path))
        with pytest.raises(NetBedError, match="iproute2"), NetBed(["w1"], tmp_path):
            pass
    with pytest.raises(ValueError, match="lowercase"):
        NetBed(["Worker_1"], tmp_path)
    with pytest.raises(ValueError, match="neither"):
        NetBed(["head"], tmp_path)


def test_the_dns_server_answers_the_names_the_test_sets_and_can_fall_silent_or_go_down(tmp_path):
    from dnslib import QTYPE, RCODE, DNSRecord

    def ask(name: str, *, tcp: bool = False, qtype: str = "A") -> tuple[str, list[str]]:
        reply = DNSRecord.parse(DNSRecord.question(name, qtype).send(bed.dns.address, bed.dns.port, tcp=tcp, timeout=0.3))
        return RCODE.get(reply.header.rcode), [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]

    with NetBed(["w1", "w2"], tmp_path) as bed:
        assert (bed.dns.address, bed.dns.port) == (bed.head.address, 53)
        assert ask("workers.bed.test") == ("NXDOMAIN", [])
        bed.dns.set("workers.bed.test", [bed.address("w1"), bed.address("w2")])
        assert ask("Workers.Bed.Test.") == ("NOERROR", [bed.address("w1"), bed.address("w2")])
        assert ask("workers.bed.test", tcp=True) == ("NOERROR", [bed.address("w1"), bed.address("w2")])
        assert ask("workers.bed.test", qtype="AAAA") == ("NOERROR", [])
        bed.dns.set("workers.bed.test", [])
        assert ask("workers.bed.test") == ("NOERROR", [])
        bed.dns.remove("workers.bed.test")
        assert ask("workers.bed.test") == ("NXDOMAIN", [])
        with pytest.raises(ValueError):
            bed.dns.set("workers.bed.test", ["not-an-address"])
        bed.dns.set("workers.bed.test", [bed.address("w2")])
        bed.dns.answering = False
        with pytest.raises(TimeoutError):
            ask("workers.bed.test")
        bed.dns.answering = True
        bed.dns.stop()
        with pytest.raises(OSError):  # TCP: refused (UDP: a timeout)
            ask("workers.bed.test", tcp=True)
        bed.dns.start()
        assert ask("workers.bed.test") == ("NOERROR", [bed.address("w2")])


@pytest.mark.real_process
def test_redis_runs_in_its_own_host_and_is_cut_off_with_it(tmp_path):
    import redis

    with NetBed(["db"], tmp_path) as bed:
        url = bed.redis("db")
        assert url == f"redis://{bed.address('db')}:6379/0" and bed.redis("db") == url
        pids = subprocess.run(["ip", "netns", "pids", bed.hosts["db"].namespace or ""], capture_output=True, text=True, check=True)
        assert str(bed.redis_server("db").process.pid) in pids.stdout.split()  # type: ignore[union-attr]
        client = redis.Redis.from_url(url, socket_timeout=0.3, socket_connect_timeout=0.3)
        assert client.ping()
        bed.cut("db")
        with pytest.raises(redis.TimeoutError):
            client.ping()
        bed.heal("db")
        client.connection_pool.disconnect()
        assert client.ping()
        client.close()
        server = bed.redis_server("db").process
    assert server is not None and _gone(server.pid)


@pytest.mark.real_process
async def test_a_worker_in_a_host_serves_the_head_over_tls_under_its_address_and_service_name(tmp_path):
    with NetBed(["w1"], tmp_path) as bed:
        worker = bed.start_worker("w1", "tests.adapters:Echo", names=["workers.bed.test"])
        assert worker.address == f"tcp://{bed.address('w1')}:7000"
        head = bed.tls(HEAD)
        # the service name is in its certificate: a client that dials by that name accepts it
        with socket.create_connection((bed.address("w1"), 7000), timeout=5) as raw, \
                head.client_context().wrap_socket(raw, server_hostname="workers.bed.test") as tls:
            assert tls.version() is not None
        with socket.create_connection((bed.address("w1"), 7000), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
            head.client_context().wrap_socket(raw, server_hostname="other.bed.test")
        remote = RemoteWorkers(addresses=[worker.address], token=bed.token, tls=head)
        async with trio_bridge.open_pool("tests.adapters:Echo", size=1, remote=remote) as pool:
            await pool.wait_for_workers(2)
            pids = {await pool.execute("pid") for _ in range(6)}
            assert worker.pid in pids  # the remote one served calls too
    assert _gone(worker.pid)
    assert worker.log is not None and "serving tests.adapters:Echo" in worker.log.read_text()


@pytest.mark.real_process
def test_closing_the_bed_kills_what_its_processes_started_even_when_they_are_gone(tmp_path):
    with NetBed(["w1"], tmp_path, grace=0.2) as bed:
        parent = bed.popen("w1", ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    assert _gone(child)
