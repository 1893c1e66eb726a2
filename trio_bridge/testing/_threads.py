"""Workers in threads: the real worker code and the real wire, without worker processes.

:func:`open_pool_in_threads` opens a real pool -- :func:`~trio_bridge.open_pool`, with its host
service, gRPC, sessions, host tools and statistics -- whose workers run the real worker side
(your adapter and its ``setup()``, ``SessionContext``, watches, streaming, cancellation), each
on an asyncio loop in a thread of this process instead of in a process of its own. A worker
starts in milliseconds instead of an interpreter's start-up (~0.4 s on a small machine)::

    from trio_bridge.testing import open_pool_in_threads

    async def test_predict():
        async with open_pool_in_threads("app.adapters:Agent", size=2) as pool:
            assert await pool.execute("predict", {"x": [1.0, 2.0]}) == [0, 1]

What a thread is not: a process. Nothing isolates a worker (a tool that calls ``os._exit`` or
crashes the interpreter ends the test run; ``WorkerInfo.pid`` is this process's id); killing
or recycling a worker cancels its server, and a sync tool still running then keeps running in
its thread until it returns; there is no shared memory (arrays travel in-band), no lifeline and
no memory figure (``Recycling.max_memory`` recycles none); what tools print goes to this
process's output. Test crashes, signals and process trees with
real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from trio_bridge._errors import InvalidArgumentError, WorkerCrashedError, WorkerStartError
from trio_bridge._host._options import LocalWorkers, pool_options
from trio_bridge._host._pool import Pool, open_pool_of
from trio_bridge._host._process import WorkerSpec
from trio_bridge._host._worker import WorkerLifecycle, process_crashed_error
from trio_bridge.worker._server import parse_arguments, serve

_EXIT_WAIT = 2.0  # seconds to wait for a stopped worker's thread to report its end
_worker_log = logging.getLogger("trio_bridge.worker")


class ThreadConnector:
    """The connector (``_grpc_worker.Connector``) of a gRPC worker that runs in a thread of this
    process: the real worker server (``trio_bridge.worker._server.serve``) on an asyncio loop of
    its own. Its address is the one the server announces; it is gone when the thread ends (exit
    code 0 after the Shutdown RPC, 1 if the server raised: its traceback is the stderr tail);
    killing it cancels the server (exit code ``-9``, as for a process killed by SIGKILL;
    ``-15`` when the pool closes it). A sync tool still running then keeps running in its thread
    until it returns.

    Made by the pool for each local slot (``open_pool_of(..., local_connector=ThreadConnector)``),
    not by users.
    """

    remote = False
    server_name = None
    start_method = "threads"  # Pool.start_method

    def __init__(self, spec: WorkerSpec, slot: int) -> None:
        self.stderr_tail: list[str] = []  # the server's traceback, if it raised
        self.abandoned: set[str] = set()  # (its calls end with it)
        self._spec = spec
        self._slot = slot
        self._thread: threading.Thread | None = None
        self._lifecycle: WorkerLifecycle | None = None
        self._address: str | None = None
        self._announced = trio.Event()  # it listens (``_address``), or it ended before
        self._exited = trio.Event()
        self._exit_code: int | None = None
        self._lock = threading.Lock()  # the next three are shared with its thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[int] | None = None
        self._stop_code: int | None = None  # the exit code it is being stopped with

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def pid(self) -> int:
        return os.getpid()

    async def open(self, worker_id: str, lifecycle: WorkerLifecycle, nursery: trio.Nursery) -> str:
        command, env = self._spec.command(worker_id, self._slot)
        args = parse_arguments(command[command.index("trio_bridge.worker") + 1:])
        self._lifecycle = lifecycle
        self._thread = threading.Thread(
            target=self._main, args=(worker_id, args, env, trio.lowlevel.current_trio_token()),
            name=f"trio-bridge worker {worker_id}", daemon=True,
        )
        self._thread.start()
        await self._announced.wait()
        if self._address is None:
            raise await self.start_error("exited before it was ready", worker_id, lifecycle)
        return self._address

    # ---- its thread ----
    def _main(self, worker_id: str, args: Any, env: dict[str, str], token: trio.lowlevel.TrioToken) -> None:
        code = 1
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                code = runner.run(self._serve(args, env, token))
        except asyncio.CancelledError:
            with self._lock:
                code = self._stop_code if self._stop_code is not None else -signal.SIGKILL
        except BaseException:
            lines = traceback.format_exc().splitlines()
            for line in lines:
                _worker_log.info("[%s] %s", worker_id, line)
            self.stderr_tail = lines  # read by Trio once it has run _ended
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._ended, code)

    async def _serve(self, args: Any, env: dict[str, str], token: trio.lowlevel.TrioToken) -> int:
        with self._lock:
            if self._stop_code is not None:  # stopped before its loop ran
                return self._stop_code
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
        return await serve(args, env, lambda address: token.run_sync_soon(self._listening, address))

    # ---- back in Trio (token.run_sync_soon keeps their order) ----
    def _listening(self, address: str) -> None:
        self._address = address
        self._announced.set()

    def _ended(self, code: int) -> None:
        self._exit_code = code
        self._announced.set()
        self._exited.set()
        if self._lifecycle is not None:
            self._lifecycle.exit(code)

    def _stop(self, code: int) -> None:
        """Cancel its server (once), to end with ``code``."""
        with self._lock:
            if self._exit_code is not None or self._stop_code is not None:
                return
            self._stop_code = code
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # its loop has just closed
                    self._loop.call_soon_threadsafe(self._task.cancel)

    def kill(self) -> None:
        self._stop(-signal.SIGKILL)

    async def close(self) -> int | None:
        """Cancel its server if it still runs, and wait for its thread to end."""
        thread = self._thread
        if thread is None:
            return None
        self._stop(-signal.SIGTERM)
        await self._exited.wait()
        thread.join()  # it has reported its end, its last step: this returns at once
        return self._exit_code

    async def shutdown(self, grace: float, lifecycle: WorkerLifecycle, ask: Callable[[float], Awaitable[None]]) -> None:
        await ask(grace)

    async def settle(self, lifecycle: WorkerLifecycle, kill: Callable[[], None]) -> None:
        with trio.move_on_after(_EXIT_WAIT):
            await lifecycle.exited.wait()
        if lifecycle.alive:
            kill()

    def crashed_error(self, worker_id: str, pid: int | None, lifecycle: WorkerLifecycle) -> WorkerCrashedError:
        return process_crashed_error(worker_id, pid, lifecycle, self.stderr_tail)

    async def start_error(self, message: str, worker_id: str, lifecycle: WorkerLifecycle, *, unreachable: bool = False) -> WorkerStartError:
        with trio.move_on_after(_EXIT_WAIT):
            await lifecycle.exited.wait()
        return WorkerStartError(
            f"{message} (adapter {self._spec.adapter!r})", worker_id=worker_id, pid=self.pid,
            exit_code=lifecycle.exit_code, stderr_tail="\n".join(self.stderr_tail),
        )

    def sample_memory(self) -> int | None:
        return None  # its memory is this process's


def open_pool_in_threads(adapter: str, **options: Any) -> AbstractAsyncContextManager[Pool]:
    """:func:`~trio_bridge.open_pool` with workers in threads of this process (see the module
    docstring for what differs from processes).

    Args:
        adapter: ``"package.module:ClassName"``, as for ``open_pool``.
        options: any other option of ``open_pool`` except ``LocalWorkers.python`` and
            ``LocalWorkers.shared_memory_threshold`` (threads run this interpreter, and share
            no memory plane).

    Raises:
        InvalidArgumentError: ``python`` or ``shared_memory_threshold`` was given; and as
            ``open_pool``.
    """
    local = options.pop("local", None) or LocalWorkers()
    refused = sorted({"python", "shared_memory_threshold"} & set(options))
    refused += ["LocalWorkers.python"] if isinstance(local, LocalWorkers) and local.python is not None else []
    if isinstance(local, LocalWorkers) and local.shared_memory_threshold not in (None, LocalWorkers().shared_memory_threshold):
        refused.append("LocalWorkers.shared_memory_threshold")
    if refused:
        raise InvalidArgumentError(f"workers in threads take no {' or '.join(refused)} option")
    if isinstance(local, LocalWorkers):  # (anything else: open_pool refuses it)
        local = dataclasses.replace(local, shared_memory_threshold=None)
    # Each local slot's worker runs in a thread (a fork server is never used then).
    return open_pool_of(pool_options(adapter, {**options, "local": local}), local_connector=ThreadConnector)
