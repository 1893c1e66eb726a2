"""Remote workers: workers the host did not start, reached over TCP (and TLS) at an address.

A remote worker is a ``trio-bridge worker ADAPTER --listen tcp://HOST:PORT`` process on another
machine (or another loopback address standing for one). :class:`RemoteDial` is the connector
(``_grpc_worker.Connector``) of the gRPC worker that reaches it: its address is known, nothing
is started. It "exits" when the worker stops using it: the pool closes (it detaches, exit code
0), or the pool drops it because its connection was lost (exit code ``-9``: the worker's death
reason says why) -- the remote process itself keeps running, and the slot's next worker dials
it again (so a worker that comes back rejoins the pool).

The ``trio-bridge worker`` command imports this module, so it stays
import-light: it does not import the host's asyncio boundary (``trio_bridge._aio``, ``_grpc_worker``).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from trio_bridge._errors import InvalidArgumentError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._options import tcp_address

if TYPE_CHECKING:
    from trio_bridge._host._worker import WorkerLifecycle


_DRAIN_POLL = 0.05  # seconds between looks at a remote worker's calls while the pool closes


class RemoteDial:
    """The connector of a gRPC worker on another machine, at ``address`` (``tcp:HOST:PORT``)."""

    remote = True
    pid = None  # its process is another machine's: the worker learns its pid from Describe

    def __init__(self, address: str) -> None:
        self.address: str = address
        self._lifecycle: WorkerLifecycle | None = None
        self._exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self._lifecycle is not None

    async def open(self, worker_id: str, lifecycle: WorkerLifecycle, nursery: trio.Nursery) -> str:
        self._lifecycle = lifecycle
        await trio.lowlevel.checkpoint()
        return self.address

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
