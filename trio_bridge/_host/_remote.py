"""Remote workers: workers the host did not start, reached over TCP (and TLS) at an address.

A remote worker is a ``trio-bridge worker ADAPTER --listen tcp://HOST:PORT`` process on another
machine (or another loopback address standing for one). :class:`RemoteDial` is the connector
(``_grpc_worker.Connector``) of the gRPC worker that reaches it: its address is known, nothing
is started. It "exits" when the worker stops using it: the pool closes (it detaches, exit code
0), or the pool drops it because its connection was lost (exit code ``-9``: the worker's death
reason says why) -- the remote process itself keeps running, and the slot's next worker dials
it again (so a worker that comes back rejoins the pool). Each dial first opens a TCP connection
within ``RemoteWorkers.connect_timeout``: behind a network partition a connect waits for the
kernel (minutes); a short bound and the slot's backoff make it rejoin within seconds of the heal.

A slot's dials share one :class:`RemoteTarget`: its address, the name its certificate must carry
(a ``dns://`` name's, else the address's host), and the calls the host sent over a connection it
has since lost, which the next dial asks the worker to cancel (``DescribeRequest.cancel_calls``).

The ``trio-bridge worker`` command imports this module, so it stays
import-light: it does not import the host's asyncio boundary (``trio_bridge._aio``, ``_grpc_worker``).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from trio_bridge._errors import InvalidArgumentError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._options import tcp_address
from trio_bridge._wire.transport import parse_address

if TYPE_CHECKING:
    from trio_bridge._host._worker import WorkerLifecycle


_DRAIN_POLL = 0.05  # seconds between looks at a remote worker's calls while the pool closes


@dataclass(eq=False)
class RemoteTarget:
    """One remote slot's worker, across its dials.

    Attributes:
        address: ``tcp:HOST:PORT``.
        server_name: the name its TLS certificate must carry (``None``: the address's host).
        abandoned: ids of calls this host sent it over a connection since lost (a partition,
            a failed health check) that it may still run: the next dial has them cancelled.
    """

    address: str
    server_name: str | None = None
    abandoned: set[str] = field(default_factory=set)


class RemoteDial:
    """The connector of a gRPC worker on another machine, at ``target.address``; each
    :meth:`open` opens a TCP connection within ``connect_timeout`` seconds first."""

    remote = True
    pid = None  # its process is another machine's: the worker learns its pid from Describe

    def __init__(self, target: RemoteTarget, connect_timeout: float) -> None:
        self.address: str = target.address
        self.server_name: str | None = target.server_name
        self.abandoned: set[str] = target.abandoned  # shared with the slot's next dials
        self._connect_timeout = connect_timeout
        self._lifecycle: WorkerLifecycle | None = None
        self._exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self._lifecycle is not None

    async def open(self, worker_id: str, lifecycle: WorkerLifecycle, nursery: trio.Nursery) -> str:
        """Its address, once a TCP connection to it opened (and was closed again: grpclib
        makes its own), so that an unreachable worker fails the dial in ``connect_timeout``.

        Raises:
            WorkerStartError: no connection within ``connect_timeout``, or it was refused.
        """
        self._lifecycle = lifecycle
        _, host, port = parse_address(self.address)
        failure = f"no TCP connection within {self._connect_timeout:g} s (RemoteWorkers.connect_timeout)"
        with trio.move_on_after(self._connect_timeout):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                failure = f"no TCP connection ({exc.strerror or exc})"
            else:
                await stream.aclose()
                return self.address
        raise await self.start_error(failure, worker_id, lifecycle, unreachable=True)

    def _end(self, exit_code: int) -> None:
        """Stop using it: 0 (detached) or -9 (dropped)."""
        if self._lifecycle is None or self._exit_code is not None:
            return
        self._exit_code = exit_code
        self._lifecycle.exit(exit_code)

    def kill(self) -> None:
        self._end(-signal.SIGKILL)

    async def close(self) -> int | None:
        self._end(0)
        return self._exit_code

    async def shutdown(self, grace: float, lifecycle: WorkerLifecycle, ask: Callable[[float], Awaitable[None]]) -> None:
        """The remote worker keeps running: let this host's calls on it finish, then detach."""
        with trio.move_on_after(grace):
            while lifecycle.busy:
                await trio.sleep(_DRAIN_POLL)
        self._end(0)

    async def settle(self, lifecycle: WorkerLifecycle, kill: Callable[[], None]) -> None:
        await trio.lowlevel.checkpoint()  # no exit status to wait for: it is dropped at once
        if lifecycle.alive:
            kill()

    def crashed_error(self, worker_id: str, pid: int | None, lifecycle: WorkerLifecycle) -> WorkerCrashedError:
        message = f"lost connection to worker at {self.address}"
        if lifecycle.death_reason:
            message += f" ({lifecycle.death_reason})"
        return WorkerCrashedError(message, worker_id=worker_id, pid=pid)

    async def start_error(self, message: str, worker_id: str, lifecycle: WorkerLifecycle, *, unreachable: bool = False) -> WorkerStartError:
        await trio.lowlevel.checkpoint()
        where = f"cannot reach worker at {self.address}: " if unreachable else f"worker at {self.address} "
        return WorkerStartError(f"{where}{message}", worker_id=worker_id)

    def sample_memory(self) -> int | None:
        return None  # the host cannot see its process


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
