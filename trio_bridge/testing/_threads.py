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
its thread until it returns; there is no shared memory (arrays travel in-band) and no lifeline;
what tools print goes to this process's output. Test crashes, signals and process trees with
real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import threading
import traceback
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._host._options import LocalWorkers, pool_options
from trio_bridge._host._pool import Pool, open_pool_of
from trio_bridge._wire.contract import READY_PREFIX, WORKER_ID_ENV
from trio_bridge.worker._server import parse_arguments, serve


class ThreadWorker:
    """A worker in a thread of this process, as a local worker's connector
    (``_process.LocalProcess``) sees a worker process: the ready line on ``stdout`` (the real
    worker's own), ``stderr`` closed at the end, an exit code, signals (which cancel its
    server: ``-N`` is the exit code, as for a process killed by signal N).

    Made by the pool (its launcher: ``launch(command, env)``), not by users.
    """

    own_group = False  # nothing to signal as a group, nothing for the janitor
    start_method = "threads"  # Pool.start_method

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._args = parse_arguments(command[command.index("trio_bridge.worker") + 1:])
        self._env = env
        self.pid: int = os.getpid()
        self.returncode: int | None = None
        stdout, self._stdout = os.pipe()
        stderr, self._stderr = os.pipe()
        self.stdout: trio.lowlevel.FdStream = trio.lowlevel.FdStream(stdout)
        self.stderr: trio.lowlevel.FdStream = trio.lowlevel.FdStream(stderr)
        self._token = trio.lowlevel.current_trio_token()
        self._exited = trio.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[int] | None = None
        self._signal: int | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"trio-bridge worker {env.get(WORKER_ID_ENV, '')}", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        code = 1
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                code = runner.run(self._serve())
        except asyncio.CancelledError:
            code = -(self._signal or signal.SIGTERM)
        except BaseException:
            os.write(self._stderr, traceback.format_exc().encode())
        finally:
            os.close(self._stdout)
            os.close(self._stderr)
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._ended, code)

    async def _serve(self) -> int:
        with self._lock:
            if self._signal is not None:
                return -self._signal
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
        return await serve(self._args, self._env, self._announce)

    def _announce(self, address: str) -> None:
        os.write(self._stdout, f"{READY_PREFIX}{address}\n".encode())

    def _ended(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    async def wait(self) -> int:
        """Wait until its thread has ended; its exit code."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, signum: int) -> None:
        """Any signal ends it: its server is cancelled (sync tools still running are left to finish)."""
        with self._lock:
            if self.returncode is not None or self._signal is not None:
                return
            self._signal = signum
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # its loop has just closed
                    self._loop.call_soon_threadsafe(self._task.cancel)

    async def aclose(self) -> None:
        for stream in (self.stdout, self.stderr):
            await stream.aclose()


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
    # The pool's launcher starts its local workers in threads (a fork server is never used then).
    return open_pool_of(pool_options(adapter, {**options, "local": local}), launch=ThreadWorker)
