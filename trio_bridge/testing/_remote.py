"""Remote workers on one machine, for tests and examples: loopback addresses stand for machines
(a worker on 127.0.0.2, its host on 127.0.0.1), with certificates from ``trustme``
(``pip install 'trio-bridge[examples]'``)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from trio_bridge._wire.tls import TLSConfig

__all__ = ["Certificates", "RemoteWorkerProcess", "write_token_file"]

WORKER_ADDRESS = "127.0.0.2"
HOST_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """A fresh CA and, signed by it, a certificate for the worker's machine (127.0.0.2) and one
    for the host's (127.0.0.1): PEM files in ``directory`` (``ca.pem``, ``ca.key``, ``worker.pem``,
    ``worker.key``, ``host.pem``, ``host.key``). Make them with :meth:`create`; :meth:`issue` adds
    more."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Certificates:
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(directory / "ca.pem")
        ca.private_key_pem.write_to_path(directory / "ca.key")
        certificates = cls(directory)
        certificates.issue("worker", WORKER_ADDRESS)
        certificates.issue("host", HOST_ADDRESS)
        return certificates

    def issue(self, name: str, *identities: str) -> TLSConfig:
        """A certificate ``NAME.pem`` (and key ``NAME.key``) signed by this CA, for ``identities``
        (IP addresses and DNS names, its subject alternative names; at least one), replacing any
        of that name; its :class:`TLSConfig` (mutual: with the CA)."""
        import trustme

        if not identities:
            raise ValueError(f"certificate {name!r}: give at least one IP address or DNS name")
        ca = trustme.CA.from_pem((self.directory / "ca.pem").read_bytes(), (self.directory / "ca.key").read_bytes())
        leaf = ca.issue_cert(*identities)
        leaf.cert_chain_pems[0].write_to_path(self.directory / f"{name}.pem")
        leaf.private_key_pem.write_to_path(self.directory / f"{name}.key")
        return self.tls(name)

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.pem")

    def tls(self, name: str) -> TLSConfig:
        """Certificate ``name``'s :class:`TLSConfig` (mutual: with the CA): ``"worker"``,
        ``"host"``, or one made by :meth:`issue`."""
        return TLSConfig(str(self.directory / f"{name}.pem"), str(self.directory / f"{name}.key"), self.ca)

    def worker_options(self, name: str = "worker") -> list[str]:
        """``trio-bridge worker``'s TLS options for certificate ``name``."""
        tls = self.tls(name)
        return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", self.ca]


def write_token_file(path: Path, token: str) -> Path:
    """Write ``token`` to ``path``, owner-only (mode 600: ``trio-bridge worker`` refuses a token
    file others may read); returns ``path``."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


class RemoteWorkerProcess:
    """A ``trio-bridge worker ADAPTER --listen ADDRESS`` process (its own session and process
    group), with the token in ``token_file`` and TLS when ``certificates`` are given (its
    certificate ``certificate``). ``command_prefix``: argv put before the worker's (e.g. ``ip netns
    exec NS``). ``log``: a file that a thread appends its stderr to, the ready line first (so a
    worker that says much never blocks on a full pipe); without it, what follows the ready line
    stays in ``process.stderr`` for the caller to read. ``start()`` returns once it listens;
    ``kill()`` stops it (SIGKILL); it may be started again, on the same address."""

    def __init__(
        self, adapter: str, address: str, token_file: Path, *, certificates: Certificates | None = None,
        options: tuple[str, ...] = (), cwd: str | None = None, certificate: str = "worker",
        command_prefix: Sequence[str] = (), log: Path | None = None,
    ) -> None:
        self.address: str = address
        self.command: list[str] = [
            *command_prefix, sys.executable, "-m", "trio_bridge", "worker", adapter, "--listen", address,
            "--token-file", str(token_file),
            *(certificates.worker_options(certificate) if certificates is not None else []), *options,
        ]
        self.cwd = cwd
        self.log: Path | None = log
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_line: str = ""
        self._copier: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> RemoteWorkerProcess:
        """Start it and wait for its first line ("serving ADAPTER on ADDRESS"), at most
        ``timeout`` seconds.

        Raises:
            RuntimeError: it said something else first (the line is in the message), or
                nothing within ``timeout`` (it is killed).
        """
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        assert self.process.stderr is not None
        readable, _, _ = select.select([self.process.stderr], [], [], timeout)
        if not readable:
            self.kill()
            raise RuntimeError(f"trio-bridge worker said nothing within {timeout:g} s: {' '.join(self.command)}")
        first = self.process.stderr.readline()
        self.ready_line = first.decode().strip()
        if self.log is not None:
            self._copier = threading.Thread(
                target=_append, args=(first, self.process.stderr, self.log), daemon=True, name="worker-stderr",
            )
            self._copier.start()
        if "serving" not in self.ready_line:
            self.kill()
            raise RuntimeError(f"trio-bridge worker did not start: {self.ready_line!r}")
        return self

    def kill(self) -> None:
        """SIGKILL its process group (what is left of it), reap it, and close its stderr pipe."""
        if self.process is None:
            return
        # The whole group, even when the worker itself is gone: a process its tool left running
        # would hold the stderr pipe open (and the copier thread with it).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self._copier is not None:  # it reads to the end of the pipe, which the kill closed
            self._copier.join(5)
            self._copier = None
        if self.process.stderr is not None:
            self.process.stderr.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def _append(first: bytes, stream: IO[bytes], path: Path) -> None:
    """Append ``first`` and then all of ``stream`` to the file at ``path``, a line at a time."""
    with open(path, "ab") as out:
        out.write(first)
        for line in stream:
            out.write(line)
            out.flush()
