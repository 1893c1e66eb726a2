"""Remote workers: workers the host did not start, reached over TCP (and TLS) at an address.

A remote worker is a ``trio-bridge worker ADAPTER --listen tcp://HOST:PORT`` process on another
machine (or another loopback address standing for one). To a worker handle it looks like a
worker process whose ready line is its address: :class:`RemoteWorker` is the
:class:`~trio_bridge._host._process.LaunchedWorker` for it. It "exits" when the handle stops
using it: the pool closes (it detaches, exit code 0), or the pool stops it because its
connection was lost (exit code ``-9``: the handle's death reason says why) -- the remote process
itself keeps running, and the slot's next worker dials it again (so a worker that comes back
rejoins the pool).

The ``trio-bridge worker`` command imports this module, so it stays
import-light: it does not import the host's asyncio boundary (``trio_bridge._aio``, ``_worker``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import trio

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._host._options import RemoteWorkers, tcp_address
from trio_bridge._wire.contract import READY_PREFIX
from trio_bridge._wire.tls import TLSConfig
from trio_bridge._wire.transport import advertised_address


class RemoteWorker:
    """The :class:`~trio_bridge._host._process.LaunchedWorker` of a remote worker at ``address``."""

    own_group = False  # nothing of it runs here: no process group, nothing for the janitor
    remote = True

    def __init__(self, address: str) -> None:
        self.address = address
        self.pid: int = 0  # not ours; the handle takes the real one from Describe
        self.returncode: int | None = None
        ready, write = os.pipe()
        os.write(write, f"{READY_PREFIX}{address}\n".encode())
        os.close(write)
        self.stdout: trio.lowlevel.FdStream = trio.lowlevel.FdStream(ready)
        stderr, self._stderr = os.pipe()  # closed at the end: nothing is ever written to it
        self.stderr: trio.lowlevel.FdStream = trio.lowlevel.FdStream(stderr)
        self._exited = trio.Event()

    @classmethod
    def launcher(cls, address: str) -> Callable[[list[str], dict[str, str]], RemoteWorker]:
        """A ``launch(command, env)`` that, instead of starting anything, reaches ``address``."""
        return lambda command, env: cls(address)

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, signum: int) -> None:
        """Stop using it: SIGTERM detaches (exit code 0), anything else drops it (``-signum``)."""
        if self.returncode is not None:
            return
        self.returncode = 0 if signum == signal.SIGTERM else -signum
        os.close(self._stderr)
        self._exited.set()

    async def aclose(self) -> None:
        for stream in (self.stdout, self.stderr):
            await stream.aclose()


@dataclass(frozen=True)
class RemoteSetup:
    """A pool's remote workers and how it reaches them (made by :func:`remote_setup`)."""

    addresses: tuple[str, ...]  # "tcp:HOST:PORT" of each remote worker: one slot each
    token: str
    tls: TLSConfig | None
    listen: str | None  # "tcp:HOST:PORT" where remote workers call the host back (port 0: any)
    advertise: str | None  # "HOST" or "HOST:PORT" they use for it (default: the listen host)

    @property
    def client_context(self) -> SSLContext | None:
        return self.tls.client_context() if self.tls is not None else None

    @property
    def server_context(self) -> SSLContext | None:
        return self.tls.server_context() if self.tls is not None else None

    def callback_address(self, bound: str) -> str:
        """Where remote workers call the host: ``advertise``, with the bound port if it has none."""
        return advertised_address(self.advertise, bound)


def remote_setup(remote: RemoteWorkers) -> RemoteSetup | None:
    """How a pool reaches the remote workers of ``remote`` (checked when it was made); ``None``
    when it has none and does not listen."""
    if not remote.addresses and remote.listen is None:
        return None
    assert remote.token is not None  # RemoteWorkers refuses addresses or listen without one
    return RemoteSetup(tuple(remote.addresses), remote.token, remote.tls, remote.listen, remote.advertise)


def check_joining(address: str, adapter_path: str, tools: list[str], *, adapter: str, known: Mapping[str, Any]) -> str:
    """A joining worker's address, normalized, if the pool takes it.

    Raises:
        InvalidArgumentError: the address is not ``tcp:HOST:PORT``; the worker serves another
            adapter; or its tools are not the ones the pool's workers have.
    """
    address = tcp_address("address", address)
    if adapter_path != adapter:
        raise InvalidArgumentError(f"this pool serves {adapter!r}, not {adapter_path!r}")
    if known and set(tools) != set(known):
        raise InvalidArgumentError(
            f"its tools ({', '.join(sorted(tools))}) are not the pool's ({', '.join(sorted(known))}): another version of {adapter!r}?"
        )
    return address
