"""A test bed of many machines on one: hosts in network namespaces on one switch, links to cut
and heal, a DNS server for the test names, Redis and trio-bridge workers in hosts.

Needs root and iproute2's ``ip`` (Linux network namespaces); without them :class:`NetBed` raises
:class:`NetBedError` saying what is missing (the test fails, it never skips)::

    with NetBed(["w1", "w2", "db"], tmp_path) as bed:
        worker = bed.start_worker("w1", "tests.adapters:Echo", names=["workers.bed.test"])
        bed.dns.set("workers.bed.test", [bed.address("w1")])
        url = bed.redis("db")
        bed.cut("w1")   # w1's packets vanish, silently (no error before a timeout)
        bed.heal("w1")

The layout: one /24 of 10.200-250.x.0 (random per bed, clear of this machine's routes); the
head (this namespace, where pytest and the pool under test run) is ``.1``, the hosts ``.2``,
``.3``, ... in the order given. Each host (the head too) has one veth link to a Linux bridge in a
switch namespace; every host knows every other's MAC address (permanent ARP entries), so ARP never
fails. :meth:`NetBed.cut` takes the switch's end of a host's link down: the host keeps its own
interface up and its routes, and packets are dropped without an answer.

Closing the bed (leaving the ``with``, whatever the body raised) kills every process it started
(SIGTERM to each process group, SIGKILL after ``grace`` seconds, then whatever is left in
its namespaces), stops the DNS server, and deletes the namespaces, the switch and the head's
veth. A bed of an earlier run that was killed (its namespaces are named ``tbnb-PID-...`` and
process PID is gone) is swept away when a new bed starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trio_bridge import TLSConfig
from trio_bridge._os import process_exists
from trio_bridge.testing import Certificates, RedisServer, RemoteWorkerProcess, write_token_file

__all__ = ["GRACE", "HEAD", "DnsServer", "Host", "NetBed", "NetBedError", "sweep"]

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "tbnb"  # namespaces: tbnb-PID-ID-HOST; interfaces: tbID...
HEAD = "head"
SWITCH = "switch"
GRACE = 1.0
"""Seconds the bed's processes have between SIGTERM and SIGKILL when it closes, by default."""
REDIS_PORT = 6379
DNS_PORT = 53


class NetBedError(RuntimeError):
    """The bed cannot be set up here (not root, no ``ip``, no network namespaces) or an ``ip``
    command failed; the message says which and what to do."""


@dataclass(frozen=True)
class Host:
    """One machine of the bed.

    Attributes:
        name: as the test named it (:data:`HEAD` for this namespace).
        address: its IPv4 address on the bed.
        namespace: its network namespace (``ip netns``); ``None`` for the head.
        device: its end of its link (in its namespace).
        port: the switch's end of its link (in the switch's namespace): down while cut.
        mac: ``device``'s MAC address.
    """

    name: str
    address: str
    namespace: str | None
    device: str
    port: str
    mac: str

    @property
    def command_prefix(self) -> list[str]:
        """argv that runs a command in this host: ``ip netns exec NAMESPACE`` (nothing for the head)."""
        return [] if self.namespace is None else ["ip", "netns", "exec", self.namespace]


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetBedError(f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _ip_batch(namespace: str | None, lines: Iterable[str]) -> None:
    """Run ``ip`` commands (one a line, without the ``ip``) in ``namespace`` (None: this one)."""
    _run(["ip", *(["-n", namespace] if namespace else []), "-batch", "-"], stdin="\n".join(lines) + "\n")


def _check_support() -> None:
    if sys.platform != "linux":
        raise NetBedError(f"the network test bed needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise NetBedError(
            "the network test bed needs root (it makes network namespaces and links): run the tests as root, "
            "e.g. sudo, or in a container with CAP_NET_ADMIN and CAP_SYS_ADMIN (docker run --privileged)"
        )
    if shutil.which("ip") is None:
        raise NetBedError("the network test bed needs iproute2's `ip` on PATH (Debian/Ubuntu: apt-get install iproute2)")


def _namespaces() -> list[str]:
    """The names `ip netns list` shows (each line: NAME or NAME (id: N))."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _kill_all_in(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (processes a test started there, however they got there)."""
    with contextlib.suppress(NetBedError):
        for pid in _run(["ip", "netns", "pids", namespace]).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def sweep() -> list[str]:
    """Delete the namespaces (and so the links) of beds whose process is gone (a run killed before
    it could close them): those named ``tbnb-PID-...`` where no process PID exists. Returns the
    namespaces deleted."""
    gone = []
    for name in _namespaces():
        parts = name.split("-")
        if parts[0] == PREFIX and len(parts) >= 4 and parts[1].isdigit() and not process_exists(int(parts[1])):
            gone.append(name)
    for name in gone:
        _kill_all_in(name)
    if gone:
        _ip_batch(None, [f"netns del {name}" for name in gone])
    return gone


def _free_network() -> ipaddress.IPv4Network:
    """A /24 of 10.200-250.x.0 that overlaps no route of this machine (any table)."""
    taken = []
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        words = line.split()
        if words and words[0] in ("local", "broadcast", "unicast", "multicast", "unreachable", "blackhole", "prohibit", "throw", "anycast"):
            words = words[1:]
        if words and words[0] != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.ip_network(words[0], strict=False))
    for _ in range(1000):
        network = ipaddress.IPv4Network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(network.overlaps(other) for other in taken):
            return network
    raise NetBedError("no /24 of 10.200-250.x.0 is free of this machine's routes")


class _Records:
    """The names the DNS server knows (thread-safe): name -> (addresses, ttl)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, tuple[tuple[str, ...], int]] = {}
        self.answering = True

    def resolve(self, request: Any, handler: Any) -> Any:
        from dnslib import QTYPE, RCODE, RR, A

        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            entry = self.names.get(name)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            addresses, ttl = entry
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=ttl))
        return reply


def _handler_class() -> type:
    from dnslib.server import DNSHandler

    class Handler(DNSHandler):
        def handle(self) -> None:
            if self.server.resolver.answering:  # type: ignore[attr-defined]
                super().handle()

    return Handler


class DnsServer:
    """An authoritative DNS server (``dnslib``, in threads of this process) for the names a test
    sets, on UDP and TCP ``address``:``port`` (the bed's: the head's address, port 53, so every
    host reaches it; this namespace's stub resolver does not use it: query it directly).

    Answers: for a name set with addresses, its A records (``ttl`` seconds) and no AAAA; for a name
    set with ``[]``, no record (NOERROR: the name exists, as a headless Service with no ready pod
    may answer); for any other name, NXDOMAIN (see :meth:`remove`).
    """

    def __init__(self, address: str, port: int = DNS_PORT) -> None:
        self.address: str = address
        self.port: int = port
        self._records = _Records()
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []

    def set(self, name: str, addresses: Sequence[str], *, ttl: int = 1) -> None:
        """Answer ``addresses`` (IPv4, as text) for ``name`` from now on, with a TTL of ``ttl``
        seconds; ``[]``: the name exists with no address (NOERROR, empty answer).

        Raises:
            ValueError: an address is not IPv4.
        """
        checked = tuple(str(ipaddress.IPv4Address(address)) for address in addresses)
        with self._records.lock:
            self._records.names[name.rstrip(".").lower()] = (checked, ttl)

    def remove(self, name: str) -> None:
        """Forget ``name``: NXDOMAIN from now on."""
        with self._records.lock:
            self._records.names.pop(name.rstrip(".").lower(), None)

    @property
    def answering(self) -> bool:
        """False: the server receives queries and ignores them (a resolver that does not answer:
        UDP clients wait for their timeout; TCP ones see the connection closed unanswered). True
        by default."""
        return self._records.answering

    @answering.setter
    def answering(self, value: bool) -> None:
        self._records.answering = value

    @property
    def running(self) -> bool:
        """Whether it listens (between :meth:`start` and :meth:`stop`)."""
        return bool(self._servers)

    def start(self) -> None:
        """Listen (UDP and TCP) and answer; no-op while running."""
        from dnslib.server import DNSLogger, DNSServer

        if self._servers:
            return
        quiet = DNSLogger(log="-request,-reply,-truncated,-error", prefix=False)
        handler = _handler_class()
        for tcp in (False, True):
            server = DNSServer(self._records, address=self.address, port=self.port, tcp=tcp, logger=quiet, handler=handler)
            thread = threading.Thread(target=server.server.serve_forever, args=(0.05,), daemon=True, name="netbed-dns")
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)

    def stop(self) -> None:
        """Close its sockets (a resolver that is down: UDP queries get ICMP port unreachable, TCP
        ones a reset); the names stay for the next :meth:`start`. No-op when stopped."""
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()


class NetBed:
    """Hosts ``hosts`` (names of lowercase letters and digits, at most 8 characters, not ``head``
    or ``switch``) and the head, on one switch; files (certificates, the token, Redis's) go in
    ``directory``; ``grace``: seconds its processes have between SIGTERM and SIGKILL on close.
    Set up on ``__enter__``, torn down on ``__exit__`` (see the module's doc).

    Raises:
        ValueError: bad host names (on construction).
        NetBedError: on ``__enter__``, this machine cannot run it (not root, no ``ip``, no network
            namespaces), or an ``ip`` command failed (what it said is in the message).

    Attributes:
        head: this namespace's :class:`Host`.
        hosts: every host by name, the head included.
        network: the bed's /24.
        switch: the switch's namespace.
        dns: the bed's :class:`DnsServer` (started with the bed).
        certificates: a CA of the bed's (``trustme``); see :meth:`tls`.
        token: the token hosts and workers share (32 hex characters); ``token_file`` holds it
            (mode 600).
    """

    def __init__(self, hosts: Sequence[str], directory: Path, *, grace: float = GRACE) -> None:
        names = list(hosts)
        for name in names:
            if not (isinstance(name, str) and name.isalnum() and name.islower() and len(name) <= 8 and name.isascii()):
                raise ValueError(f"host name {name!r}: use 1 to 8 lowercase letters and digits")
        if len(set(names)) != len(names) or {HEAD, SWITCH} & set(names):
            raise ValueError(f"host names {names!r}: give each once, and neither {HEAD!r} nor {SWITCH!r}")
        self.directory: Path = directory
        self.grace: float = grace
        self._names = names
        self._id = secrets.token_hex(3)
        self._namespace_prefix = f"{PREFIX}-{os.getpid()}-{self._id}"
        self.switch: str = f"{self._namespace_prefix}-{SWITCH}"
        self.network: ipaddress.IPv4Network = ipaddress.IPv4Network("0.0.0.0/32")
        self.hosts: dict[str, Host] = {}
        self.head: Host
        self.dns: DnsServer
        self.certificates: Certificates
        self.token: str = secrets.token_hex(16)
        self.token_file: Path = directory / "bed-token"
        self._processes: list[subprocess.Popen[Any]] = []
        self._workers: list[RemoteWorkerProcess] = []
        self._redis: dict[str, RedisServer] = {}
        self._made: list[str] = []  # namespaces made so far
        self._head_link_made = False

    # -- setting up and tearing down

    def __enter__(self) -> NetBed:
        _check_support()
        sweep()
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _set_up(self) -> None:
        self.network = _free_network()
        addresses = self.network.hosts()
        self.head = Host(HEAD, str(next(addresses)), None, f"tb{self._id}h", f"tb{self._id}p0", self._mac(0))
        self.hosts[HEAD] = self.head
        for index, name in enumerate(self._names, 1):
            self.hosts[name] = Host(
                name, str(next(addresses)), f"{self._namespace_prefix}-{name}", f"tb{self._id}v{index}",
                f"tb{self._id}p{index}", self._mac(index),
            )
        others = [host for host in self.hosts.values() if host.namespace is not None]
        self._made = [self.switch, *(host.namespace for host in others if host.namespace)]
        prefix = self.network.prefixlen
        # In this namespace: the namespaces, every link (made with its ends where they belong).
        self._head_link_made = True  # (close deletes it if there)
        try:
            _ip_batch(None, [
                *(f"netns add {namespace}" for namespace in self._made),
                f"link add {self.head.device} address {self.head.mac} type veth peer name {self.head.port} netns {self.switch}",
                *(f"link add {host.device} netns {host.namespace} address {host.mac} type veth peer name {host.port} "
                  f"netns {self.switch}" for host in others),
            ])
        except NetBedError as exc:
            raise NetBedError(
                f"cannot make network namespaces and veth links ({exc}): the bed needs a Linux kernel with network "
                "namespaces, veth and bridge links, and the capabilities CAP_NET_ADMIN and CAP_SYS_ADMIN"
            ) from None
        _ip_batch(self.switch, [
            "link add br0 type bridge", "link set br0 up",
            *(f"link set {host.port} master br0 up" for host in self.hosts.values()),
        ])
        for host in self.hosts.values():
            _ip_batch(host.namespace, [
                *([] if host.namespace is None else ["link set lo up"]),
                f"addr add {host.address}/{prefix} dev {host.device}", f"link set {host.device} up",
                *(f"neigh replace {other.address} lladdr {other.mac} dev {host.device} nud permanent"
                  for other in self.hosts.values() if other is not host),
            ])
        self.dns = DnsServer(self.head.address)
        try:
            self.dns.start()
        except OSError as exc:
            raise NetBedError(
                f"cannot serve DNS on {self.head.address}:{DNS_PORT} ({exc}): does another DNS server listen on port "
                f"{DNS_PORT} of every address (0.0.0.0)? Make it listen on its own addresses only"
            ) from None
        self.certificates = Certificates.create(self.directory)
        write_token_file(self.token_file, self.token)

    def _mac(self, index: int) -> str:
        return f"02:{self._id[0:2]}:{self._id[2:4]}:{self._id[4:6]}:00:{index:02x}"

    def close(self) -> None:
        """Kill the bed's processes, stop its DNS server, delete its namespaces and links (each
        step even when one before it failed). Idempotent; :meth:`__exit__` calls it."""
        with contextlib.ExitStack() as steps:  # (run last first)
            steps.callback(self._delete_links)
            steps.callback(self._end_processes)
            steps.callback(self._stop_servers)

    def _stop_servers(self) -> None:
        with contextlib.ExitStack() as steps:
            with contextlib.suppress(AttributeError):  # (set up stopped before it)
                steps.callback(self.dns.stop)
            for worker in self._workers:
                steps.callback(worker.kill)
            for server in self._redis.values():
                steps.callback(server.stop)
            self._workers = []
            self._redis = {}

    def _delete_links(self) -> None:
        for namespace in self._made:  # whatever runs there, however it got there
            _kill_all_in(namespace)
        links = _run(["ip", "-o", "link", "show"]) if self._head_link_made else ""
        lines = [f"link del {self.head.device}"] if f" {self.head.device}@" in links else []
        existing = set(_namespaces())
        lines += [f"netns del {namespace}" for namespace in self._made if namespace in existing]
        self._made = []
        self._head_link_made = False
        if lines:
            _ip_batch(None, lines)

    def _end_processes(self) -> None:
        running = [process for process in self._processes if process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its group: what it started too
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self._processes.clear()

    # -- links

    def address(self, host: str) -> str:
        """``host``'s IPv4 address on the bed (text). Raises KeyError for an unknown host."""
        return self.hosts[host].address

    def cut(self, host: str) -> None:
        """Cut ``host``'s link at the switch (:data:`HEAD`: the head's, from every host): from now
        on its packets, both ways, are dropped without an answer (connects and sends wait for
        their timeouts). ``host`` keeps its interface up and its routes. Raises KeyError for an
        unknown host."""
        _run(["ip", "-n", self.switch, "link", "set", self.hosts[host].port, "down"])

    def heal(self, host: str) -> None:
        """Undo :meth:`cut`: ``host``'s packets pass again at once."""
        _run(["ip", "-n", self.switch, "link", "set", self.hosts[host].port, "up"])

    # -- processes

    def popen(self, host: str, argv: Sequence[str], *, env: dict[str, str] | None = None, **options: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host`` (``ip netns exec``; in this namespace for the head), in a
        new session (its own process group), with ``env`` (default: this process's environment)
        and ``subprocess.Popen``'s other ``options``. The bed kills it (its group) on close."""
        process = subprocess.Popen([*self.hosts[host].command_prefix, *argv], env=env, start_new_session=True, **options)
        self._processes.append(process)
        return process

    def redis(self, host: str) -> str:
        """Start a Redis-protocol server in ``host`` (on its address, port 6379; files under
        ``directory``), wait until it answers; its URL. One per host: again, the same URL.
        :meth:`redis_server` gives the server (to stop or restart it)."""
        if host not in self._redis:
            directory = self.directory / f"redis-{host}"
            directory.mkdir(exist_ok=True)
            server = RedisServer(directory, host=self.address(host), port=REDIS_PORT, command_prefix=self.hosts[host].command_prefix)
            self._redis[host] = server
            server.start()
        return self._redis[host].url

    def redis_server(self, host: str) -> RedisServer:
        """The server :meth:`redis` started in ``host``. Raises KeyError if none."""
        return self._redis[host]

    # -- trio-bridge

    def tls(self, host: str, names: Sequence[str] = ()) -> TLSConfig:
        """A certificate for ``host`` signed by the bed's CA, for its address and DNS ``names``
        (e.g. a service name the head dials by), replacing its earlier one; its TLSConfig (mutual:
        with the CA). ``bed.tls(HEAD)`` is the head's, for ``open_pool(..., tls=)``."""
        return self.certificates.issue(f"bed-{host}", self.address(host), *names)

    def start_worker(
        self, host: str, adapter: str, *, port: int = 7000, names: Sequence[str] = (), options: Sequence[str] = (),
    ) -> RemoteWorkerProcess:
        """Start ``trio-bridge worker ADAPTER`` in ``host``, listening on its address:``port``,
        with the bed's token and a certificate from :meth:`tls` (``host``, ``names``), in the
        repository (so ``tests.`` adapters import); ``options``: more of its command-line
        options (e.g. ``["--concurrency", "2"]``). Returns once it listens; ``.address`` is
        ``tcp://ADDRESS:PORT``; its stderr goes to ``.log`` (``worker-HOST-PORT.log`` in
        ``directory``). The bed kills it on close; ``kill()`` and ``start()`` it meanwhile as you
        like.

        Raises:
            RuntimeError: the worker said something else than that it serves (in the message).
        """
        self.tls(host, names)
        worker = RemoteWorkerProcess(
            adapter, f"tcp://{self.address(host)}:{port}", self.token_file, certificates=self.certificates,
            certificate=f"bed-{host}", options=tuple(options), cwd=str(ROOT), command_prefix=self.hosts[host].command_prefix,
            log=self.directory / f"worker-{host}-{port}.log",
        )
        self._workers.append(worker)
        return worker.start()
