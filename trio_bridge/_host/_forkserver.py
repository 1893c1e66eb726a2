"""How a pool starts its local workers: forked by a preloaded *fork server*, or spawned.

``start_method`` uses multiprocessing's terms:

- ``"spawn"``: each worker is a fresh interpreter, ``python -m trio_bridge.worker ...``
  (:meth:`WorkerProcess.spawn`): it pays the interpreter's start-up and every import (~0.3-0.5 s
  on a small machine, more when several start at once).
- ``"forkserver"``: one process per pool (``python -m trio_bridge.worker._forkserver``) imports
  the worker's server module and the adapter's module once; each worker -- and each replacement
  of a crashed one -- is a ``fork()`` of it, which then runs the adapter's ``setup()`` and serves
  (milliseconds). Before it reports, the fork server forks as many *spares* as the pool has
  workers; afterwards it keeps one in reserve: the pool's first workers and each replacement
  are assigned a spare, without waiting for a fork. See ``trio_bridge/worker/_forkserver.py``
  for the fork server's side and its protocol.

Measured on 2 busy cores (tests.adapters:Echo, pool open -> ready): 1 worker ~0.55 s either way
(the fork server's imports are a worker's); 8 workers 0.5-0.85 s instead of 1.8-2.6 s; a killed
worker replaced (kill -> ready, no backoff) in ~40 ms instead of ~0.4-0.6 s.

The default (``start_method=None``) is ``"forkserver"`` where it is safe, else ``"spawn"``.
A pool spawns its workers instead of forking them when:

- the user asks for ``"spawn"``;
- the platform is not Linux (the fork server and its workers rely on ``PR_SET_PDEATHSIG``),
  or lacks ``os.fork``/``socket.send_fds``;
- the pool's launcher is not the default one, or the pool has no local workers (workers in
  threads, ``trio_bridge.testing.open_pool_in_threads``, have no launcher at all);
- the fork server has **more than one thread** once it has imported the worker's server module
  and the adapter's module (counted by the kernel, ``/proc/self/task``: native threads that
  torch or a tool library start at import count too) -- forking a process with other threads
  can copy a lock some thread held, and the child then hangs on it. It checks again before each
  fork. (OpenBLAS, numpy's and scipy's BLAS, would start such threads as it loads: the fork server
  holds it at one thread while it imports, whatever ``OPENBLAS_NUM_THREADS`` the host's
  environment or the pool's ``env`` sets, and each forked worker then sets its BLAS threads to
  what a spawned worker would have, from its own environment -- by default the pool's share of
  the CPUs, ``LocalWorkers(library_threads=...)``: ``trio_bridge/worker/_threads.py``; where an
  OpenBLAS is loaded and threadpoolctl cannot set its threads, it does not fork.);
- the fork server did not report within ``startup_timeout`` (its imports hung);
- while the pool runs, the fork server died or could not fork (it is killed and started again,
  up to ``_MAX_RESTARTS`` times per pool; workers are spawned meanwhile, and after that).

An explicit ``"forkserver"`` that falls back logs a warning; the default logs at INFO. Either
way ``Pool.start_method`` says how the pool starts its workers now.

``Pool.reload`` (:func:`fresh_code`) starts a new fork server -- a fresh preload of the adapter's
module, whose verdict decides the start method from then on, as the first one's did -- and the
reload's workers fork from it. The old fork server stays up while any worker it forked runs (a
fork server's workers die with it), and is closed once the host has let go of the last of them;
a reload that fails makes the old one current again.

What a forked worker keeps of a spawned one's guarantees: it leads its own session and process
group (the host signals its whole tree); it dies with the host (``PR_SET_PDEATHSIG`` to the fork
server, which dies with the host, and the worker's stdin lifeline: the host holds the only write
end); what is left of its group is killed before it is reaped -- the fork server reaps it only
once the host has read its exit status and let go, so its group id cannot be reused while the
host may still signal it; its exit code (``-N``: killed by signal N) and stderr reach the host as
before. If the fork server itself dies, each of its workers dies (their death signal), their
groups are killed by the host, and their status is reported as killed by SIGKILL (the real
status died with the fork server).

What differs: the worker's environment is applied when it starts, so a variable that the
interpreter reads at start-up (``PYTHONHASHSEED``, ``PYTHONMALLOC``...) or that the adapter's
module reads at import time is the pool's, not the worker's (and the workers share the fork
server's ``str`` hash seed; ``OPENBLAS_NUM_THREADS`` reads ``"1"`` during that import, whatever
the environment says, and the worker's own value applies after the fork); modules imported by
the adapter's module are shared copy-on-write.
Random state is not shared: Python reseeds ``random`` after ``fork()``, and each worker reseeds
numpy's legacy global ``RandomState`` from the OS (other libraries that keep a random state
without reseeding after ``fork()`` would start with the same state in every worker).

The pool secret never is in the fork server's environment (which its workers'
``/proc/PID/environ`` shows): it travels in each worker's request, over a socket, and the worker
takes it out of ``os.environ`` before the adapter's code runs, as a spawned one does.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from trio_bridge._host._process import LaunchedWorker, WorkerProcess, read_lines
from trio_bridge._os import process_exists
from trio_bridge._wire.contract import HOST_PID_ENV, SECRET_ENV, SECRET_ON_STDIN_ENV

StartMethod = Literal["forkserver", "spawn"]
START_METHODS: tuple[str, ...] = ("forkserver", "spawn")

_logger = logging.getLogger("trio_bridge")
_server_log = logging.getLogger("trio_bridge.worker")
_PID_TIMEOUT = 5.0  # seconds the fork server may take to answer a fork request
_CLOSE_WAIT = 2.0  # seconds the fork server gets to exit once the pool closed
_MAX_RESTARTS = 3  # fork servers started after the first one died, per pool
_RESTART_DELAY = 0.5  # seconds before a dead fork server is started again


class ForkedWorker:
    """A worker forked by the fork server, as a local worker's connector sees a worker process
    (:class:`~trio_bridge._host._process.LaunchedWorker`).

    Attributes:
        pid: its process id, also its process group id.
        stdout, stderr: Trio streams of its output.
        returncode: ``None`` while it runs; then its exit status (``-N``: killed by signal N).
    """

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int, status: socket.socket) -> None:
        self.pid = pid
        self.stdout = trio.lowlevel.FdStream(stdout)
        self.stderr = trio.lowlevel.FdStream(stderr)
        self.returncode: int | None = None
        self._stdin: int | None = stdin  # the lifeline's write end (held, never written)
        self._status: socket.socket | None = status
        status.setblocking(False)
        self._lock = trio.Lock()  # one task watches; the others wait their turn
        self.released = trio.Event()
        """Set once the host has let go of it (its fork server may then be closed)."""
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)

    def __repr__(self) -> str:
        return f"<ForkedWorker pid={self.pid} returncode={self.returncode}>"

    async def wait(self) -> int:
        """Wait until it exits and the fork server has killed what was left of its group;
        return its status. Several tasks may wait at once."""
        async with self._lock:
            if self.returncode is None:
                self.returncode = await self._watch()
                self._let_go()
        return self.returncode

    async def _watch(self) -> int:
        status = self._status
        assert status is not None
        while True:
            await trio.lowlevel.wait_readable(status)
            try:
                report = status.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                report = b""
            if report.startswith(b"X"):
                return int(report[1:])
            if not report:
                return await self._orphaned()

    async def _orphaned(self) -> int:
        """The fork server died: its worker dies by its death signal (SIGKILL). Kill what is
        left of its group at once (while any of the group lives -- tools' processes -- the
        kernel keeps the group id theirs: it cannot have been reused), and wait until the
        worker is gone. Its real status died with the server: it is reported as killed by
        SIGKILL."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with trio.move_on_after(_CLOSE_WAIT):
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                while process_exists(self.pid):
                    await trio.sleep(0.02)
        return -signal.SIGKILL

    def _let_go(self) -> None:
        """Close the status socket: the fork server reaps the worker (or, if it still runs,
        kills its group first)."""
        if self._status is not None:
            trio.lowlevel.notify_closing(self._status)
            self._status.close()
            self._status = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self.released.set()

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the worker's process group (the worker and what its tools started).
        A worker forked a moment ago may not lead its group yet: then it gets the signal alone.
        (Its pid is still ours: the fork server reaps it only once this object let go of it.)"""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)
        except PermissionError:
            pass

    async def aclose(self) -> None:
        """Close the pipes (the worker sees EOF on stdin: its lifeline ends it) and let go of it."""
        if self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None
        self._let_go()
        for stream in (self.stdout, self.stderr):
            await stream.aclose()


class _Spare:
    """A worker the fork server forked ahead of time: it waits for its assignment (its
    arguments, environment and pipes) on ``assigner``; the fork server reports on ``status``."""

    def __init__(self, pid: int, assign: socket.socket, status: socket.socket) -> None:
        self.pid = pid
        self.assigner = assign
        self.status = status

    def assign(self, request: bytes) -> ForkedWorker:
        """Send it ``request`` with new pipes; it becomes that worker.

        Raises:
            OSError: it is gone.
        """
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            self.assigner.setblocking(False)  # an empty socket buffer: the message always fits at once
            socket.send_fds(self.assigner, [request], [stdin_r, stdout_w, stderr_w])
        except BaseException:
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
            self.assigner.close()
        return ForkedWorker(self.pid, stdin_w, stdout_r, stderr_r, self.status)

    def close(self) -> None:
        """Let go of it unassigned: it exits (EOF), and the fork server reaps it."""
        self.assigner.close()
        self.status.close()


class _Server:
    """One fork server process, from the host's side."""

    def __init__(self, popen: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.control = control
        assert popen.stderr is not None
        self.stderr = trio.lowlevel.FdStream(os.dup(popen.stderr.fileno()))
        popen.stderr.close()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.pidfd = os.pidfd_open(self.pid)
        self.waiting = trio.Lock()
        self.spares: collections.deque[_Spare] = collections.deque()  # forked, waiting to be assigned
        self.forked: list[ForkedWorker] = []  # its workers the host has not let go of (pruned as it forks)
        self.retired = trio.Event()
        """Set once no worker is to be forked by it any more (a reload started another): it is
        closed once the host has let go of each of its workers."""
        self._spare_asked = False

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @classmethod
    def start(cls, python: str, adapter: str, env: dict[str, str], spares: int) -> _Server:
        """Spawn it (synchronously, in this thread: its death signal follows this thread); it
        forks ``spares`` workers ahead of the first requests."""
        control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            popen = subprocess.Popen(
                [python, "-m", "trio_bridge.worker._forkserver", "--adapter", adapter, "--spares", str(spares)],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is for the host only
            )
        except BaseException:
            control.close()
            raise
        finally:
            theirs.close()
        control.setblocking(False)
        return cls(popen, control)

    async def read_control(self, verdict: Callable[[dict[str, Any]], None]) -> None:
        """Read what it sends: spares (``S<pid>`` with their two sockets) as they are forked,
        and its verdict, given to ``verdict()``: ``{"fork": True, "pid": N}`` or ``{"fork":
        False, "reason": ...}`` (also if it exits first). Returns when it closes the socket."""
        decided = False
        while True:
            await trio.lowlevel.wait_readable(self.control)
            try:
                message, fds, _, _ = socket.recv_fds(self.control, 65536, 2)
            except BlockingIOError:
                continue
            except OSError:
                message, fds = b"", []
            if message.startswith(b"S") and len(fds) == 2:
                self.spares.append(_Spare(int(message[1:]), socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])))
                self._spare_asked = False
                continue
            for fd in fds:
                os.close(fd)
            if not message:
                if not decided:
                    code = await self.wait()
                    tail = "; ".join(self.stderr_tail)
                    verdict({"fork": False, "reason": f"the fork server exited ({code}){': ' + tail if tail else ''}"})
                return
            try:
                said = json.loads(message)
            except ValueError:
                said = None
            if not decided:
                decided = True
                verdict(said if isinstance(said, dict) else {"fork": False, "reason": f"the fork server said {message[:100]!r}"})

    async def read_stderr(self) -> None:
        """Log what the fork server itself writes (its workers have pipes of their own)."""
        def line(text: str) -> None:
            self.stderr_tail.append(text)
            _server_log.info("[forkserver %d] %s", self.pid, text)

        await read_lines(self.stderr, line)

    async def wait(self) -> int:
        """Wait until it exits; reap it; its status. Several tasks may wait at once."""
        async with self.waiting:
            if self.popen.returncode is None:
                if self.pidfd is not None:
                    await trio.lowlevel.wait_readable(self.pidfd)
                else:
                    while self.popen.poll() is None:
                        await trio.sleep(0.05)
            return self.popen.wait()

    def launch(self, command: list[str], env: dict[str, str]) -> ForkedWorker:
        """A worker running ``command``'s arguments with ``env``: a spare if there is one
        (nothing to wait for), else a fork now (a round trip). Keeps one spare in reserve.

        Raises:
            OSError: it did not fork one (it is gone, slow, or refused: see the message).
            ValueError: ``command`` does not run ``trio_bridge.worker``.
        """
        args = command[command.index("trio_bridge.worker") + 1:]
        request = json.dumps({"args": args, "env": env, "cwd": os.getcwd()}).encode()
        self.forked = [worker for worker in self.forked if not worker.released.is_set()]
        try:
            while self.spares:
                spare = self.spares.popleft()
                try:
                    worker = spare.assign(request)
                    break
                except OSError:
                    spare.close()  # it died unassigned: the fork server reaps it
            else:
                worker = self.fork(request)
            self.forked.append(worker)
            return worker
        finally:
            if not self.spares:
                self._ask_for_spare()

    def _ask_for_spare(self) -> None:
        if self._spare_asked:
            return
        self._spare_asked = True
        with contextlib.suppress(OSError):  # it is gone: nothing to ask
            self.control.send(b"spare")

    def fork(self, request: bytes) -> ForkedWorker:
        """Ask for a worker forked now (``request``: the JSON its spare would get).

        Raises:
            OSError: it did not fork one (it is gone, slow, or refused: see the message).
        """
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        status, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours = [stdin_w, stdout_r, stderr_r]
        try:
            try:
                self.control.setblocking(True)
                self.control.settimeout(_PID_TIMEOUT)
                socket.send_fds(self.control, [request], [stdin_r, stdout_w, stderr_w, theirs.fileno()])
            finally:
                self.control.setblocking(False)
                for fd in (stdin_r, stdout_w, stderr_w):
                    os.close(fd)
                theirs.close()
            status.settimeout(_PID_TIMEOUT)
            try:
                reply = status.recv(4096)
            except TimeoutError:
                raise OSError(f"the fork server did not fork within {_PID_TIMEOUT:g} s") from None
            if reply.startswith(b"P"):
                return ForkedWorker(int(reply[1:]), stdin_w, stdout_r, stderr_r, status)
            if reply.startswith(b"E"):
                raise OSError(f"the fork server refused: {reply[1:].decode(errors='replace')}")
            raise OSError("the fork server is gone")
        except BaseException:
            status.close()
            for fd in ours:
                os.close(fd)
            raise

    def kill(self) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()

    async def aclose(self) -> None:
        """EOF on its control socket: it kills and reaps whatever workers it still has, and
        exits; killed if it has not within a moment."""
        while self.spares:
            self.spares.popleft().close()
        if self.control.fileno() != -1:
            trio.lowlevel.notify_closing(self.control)
            self.control.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_WAIT):
                await self.wait()
            self.kill()
            await self.wait()
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            await self.stderr.aclose()


class ForkServerLauncher:
    """A pool's launcher (``launch(command, env)``): forks workers from the pool's fork server
    while it can, spawns them otherwise. Made by :func:`open_launcher`.

    A reload (:func:`fresh_code`) starts a new fork server -- a fresh preload of the adapter's
    module -- from which the new workers fork; the old one runs on for the workers it forked,
    and is closed once the host has let go of the last of them (a fork server's workers die
    with it).

    Attributes:
        start_method: how workers start now: ``"forkserver"`` or ``"spawn"``.
        reason: why it spawns (``""`` while it forks).
    """

    def __init__(
        self, *, python: str, adapter: str, env: dict[str, str], requested: StartMethod | None, spares: int = 1
    ) -> None:
        self._python = python
        self._spares = spares  # forked ahead: the first workers (and replacements) need not wait for a fork
        self._adapter = adapter
        self._env = env
        self._requested = requested
        self._server: _Server | None = None  # the one new workers fork from
        self._forking: set[_Server] = set()  # every fork server that forks, until it is closed
        self._settled = trio.Event()
        self._closing = False
        self._restarts = 0
        self._startup_timeout = 0.0
        self._nursery: trio.Nursery | None = None  # each fork server's task (run's)
        self.start_method: str = "spawn"
        self.reason: str = "the fork server is starting"

    def __repr__(self) -> str:
        return f"<ForkServerLauncher {self.start_method} {self._adapter}{' (' + self.reason + ')' if self.reason else ''}>"

    def __call__(self, command: list[str], env: dict[str, str]) -> LaunchedWorker:
        """Start a worker: a fork if the fork server is up, else a spawn.

        Raises:
            OSError: the interpreter could not be spawned.
        """
        server = self._server
        if self.start_method == "forkserver" and server is not None:
            try:
                return server.launch(command, env)
            except (OSError, ValueError) as exc:
                self._spawn_from_now_on(f"it could not fork ({exc})")
                server.kill()
        return WorkerProcess.spawn(command, env)

    def _spawn_from_now_on(self, reason: str, *, answer: bool = False) -> None:
        """Spawn workers from now on, because of ``reason``; said at INFO where nothing was
        asked for and nothing broke (``answer``: a fork server's answer as it starts, the first
        or a reload's), else as a warning."""
        self.start_method = "spawn"
        self.reason = reason
        surprise = self._requested == "forkserver" or (self._settled.is_set() and not answer)
        _logger.log(logging.WARNING if surprise else logging.INFO, "workers of %s start by spawn: %s", self._adapter, reason)

    async def settle(self) -> None:
        """Wait until the first fork server has said whether it can fork (at most the pool's
        ``startup_timeout``); from then on ``start_method`` is known. Called before any worker
        starts."""
        await self._settled.wait()

    async def run(self, startup_timeout: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a fork server running for the pool: start it, learn whether it forks, and
        start it again (up to ``_MAX_RESTARTS`` times) if it dies while it does. Each fork
        server runs in a task of this one's; cancelling it closes them all."""
        self._startup_timeout = startup_timeout
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._start_server()
            self._settled.set()
            await trio.sleep_forever()

    async def _start_server(self, *, gap: bool = False) -> _Server | None:
        """Start a fork server (it imports the adapter's module afresh) in a task of its own,
        and wait for its verdict: if it forks, new workers fork from it (it is returned); else
        they are spawned (``None``). ``gap``: only to fill the place of one that died -- if
        another has taken it meanwhile (a reload's), this one is retired at once."""
        assert self._nursery is not None
        try:
            server = _Server.start(self._python, self._adapter, self._env, self._spares)
        except OSError as exc:
            self._server = None
            self._spawn_from_now_on(f"the fork server could not start ({exc})", answer=True)
            return None
        said: dict[str, Any] = await self._nursery.start(self._keep, server)
        if gap and self._server is not None:
            server.retired.set()
            return None
        if not said.get("fork"):
            self._server = None
            self._spawn_from_now_on(str(said.get("reason", "the fork server refused")), answer=True)
            return None
        self._server = server
        self.start_method, self.reason = "forkserver", ""
        _logger.info("workers of %s start by forkserver (pid %d)", self._adapter, server.pid)
        return server

    async def _keep(self, server: _Server, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
        """One fork server's life: read what it says and report its verdict
        (``task_status.started(verdict)``); one that forks runs until it dies (the one workers
        fork from is then started again) or until it is retired and the host has let go of
        each of its workers. Then it is closed."""
        said: list[dict[str, Any]] = []
        decided = trio.Event()

        def verdict(message: dict[str, Any]) -> None:
            said.append(message)
            decided.set()

        code: int | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.read_stderr)
                nursery.start_soon(server.read_control, verdict)
                with trio.move_on_after(self._startup_timeout):
                    await decided.wait()
                message = said[0] if said else {"fork": False, "reason": f"the fork server did not report within {self._startup_timeout:g} s"}
                forks = bool(message.get("fork"))
                if forks:
                    self._forking.add(server)
                    nursery.start_soon(_close_when_idle, server, nursery.cancel_scope)
                else:
                    server.kill()  # it exits by itself when it refuses; a hung one is killed
                task_status.started(message)
                if forks:
                    code = await server.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._forking.discard(server)
            current = self._server is server
            if current:
                self._server = None
            await server.aclose()
        if code is not None and current and not self._closing:
            await self._restart(server, code)

    async def _restart(self, server: _Server, code: int) -> None:
        """The fork server new workers fork from died (``code``): start another, up to
        ``_MAX_RESTARTS`` times per pool."""
        if self._restarts >= _MAX_RESTARTS:
            self._spawn_from_now_on(f"the fork server died ({code}) {self._restarts + 1} times")
            return
        self._restarts += 1
        self._spawn_from_now_on(f"the fork server (pid {server.pid}) died ({code}); starting another")
        await trio.sleep(_RESTART_DELAY)
        if not self._closing and self._server is None:
            await self._start_server(gap=True)

    async def preload_again(self) -> Renewal:
        """For a reload: start a new fork server, which imports the adapter's module afresh,
        and wait for its verdict (at most ``startup_timeout``); from then on new workers fork
        from it (or are spawned, if it does not fork). The previous one runs on for its
        workers. Pass what it returns to :meth:`keep` or :meth:`revert`."""
        renewal = Renewal(self._server, self.start_method, self.reason)
        await self._start_server()
        return renewal

    def keep(self) -> None:
        """The reload is done: every fork server but the one new workers fork from (the
        previous one; one started meanwhile because the previous died) is closed once the host
        has let go of its last worker."""
        self._retire_all_but(self._server)

    def revert(self, renewal: Renewal) -> None:
        """The reload failed: workers fork from the previous fork server again (if it still
        runs: it has the code that worked), and the others are closed once the host has let go
        of their workers."""
        previous = renewal.previous
        if previous is None or previous.running:  # (gone meanwhile: the current one stays, there is no other)
            self._server, self.start_method, self.reason = previous, renewal.start_method, renewal.reason
        self._retire_all_but(self._server)

    def _retire_all_but(self, current: _Server | None) -> None:
        for server in self._forking:
            if server is not current:
                server.retired.set()

    def close(self) -> None:
        """The pool is closing (its workers are stopped by then): a fork server that dies is not
        replaced. The caller then cancels :meth:`run`, which closes the fork servers."""
        self._closing = True


@dataclass
class Renewal:
    """What a reload's :meth:`ForkServerLauncher.preload_again` replaced: the fork server before
    (``previous``), with its start method and reason."""

    previous: _Server | None
    start_method: str
    reason: str


async def _close_when_idle(server: _Server, scope: trio.CancelScope) -> None:
    """Once ``server`` is retired and the host has let go of each of its workers, cancel
    ``scope`` (its task then closes it)."""
    await server.retired.wait()
    for worker in list(server.forked):
        await worker.released.wait()
    scope.cancel()


def fork_server_environment(env: dict[str, str]) -> dict[str, str]:
    """The fork server's environment: the host's with the pool's ``env`` on top (the native
    libraries' thread counts included, ``_library_threads``: what the adapter's module loads reads
    a spawned worker's), the host's cwd
    first on ``PYTHONPATH`` (as a spawned worker gets it), and the host's pid (its death signal).
    Never a pool secret (a host's own environment might hold one): the fork server imports the
    adapter's module, and every forked worker's ``/proc/PID/environ`` shows this environment."""
    environment = dict(os.environ)
    environment.update(env)
    for name in (SECRET_ENV, SECRET_ON_STDIN_ENV):
        environment.pop(name, None)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), environment.get("PYTHONPATH", "")] if p)
    environment[HOST_PID_ENV] = str(os.getpid())
    return environment


def unsafe_reason(requested: StartMethod | None, default_launcher: bool, local_workers: int) -> str:
    """Why this pool spawns without trying a fork server (``""``: try one)."""
    if requested == "spawn":
        return "start_method='spawn'"
    if not default_launcher:
        return "a launcher of its own"
    if local_workers == 0:
        return "no local workers"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform}): no PR_SET_PDEATHSIG"
    if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
        return "no os.fork or socket.send_fds"
    return ""


@asynccontextmanager
async def open_launcher(
    base: Callable[[list[str], dict[str, str]], LaunchedWorker], *, requested: StartMethod | None, python: str,
    adapter: str, env: dict[str, str], local_workers: int, startup_timeout: float,
) -> AsyncIterator[Callable[[list[str], dict[str, str]], LaunchedWorker]]:
    """The launcher for a pool's local workers, for the block: ``base`` (the context's
    launcher) or a :class:`ForkServerLauncher` whose fork server runs for the block (the caller
    awaits its ``settle()`` before starting workers). Enter it in the thread that runs Trio."""
    reason = unsafe_reason(requested, base == WorkerProcess.spawn, local_workers)
    if reason:
        level = logging.WARNING if requested == "forkserver" else logging.DEBUG
        _logger.log(level, "workers of %s start by spawn: %s", adapter, reason)
        yield base
        return
    launch = ForkServerLauncher(
        python=python, adapter=adapter, env=fork_server_environment(env), requested=requested, spares=local_workers
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(launch.run, startup_timeout)
        try:
            yield launch
        finally:
            launch.close()
            nursery.cancel_scope.cancel()  # run() closes the fork server (shielded) as it ends


def start_method_of(launch: Callable[..., Any]) -> str:
    """``"forkserver"`` or ``"spawn"`` for a pool's launcher; what it (or a pool's local
    connector factory) calls itself otherwise (its ``start_method``; ``"custom"`` if nothing)."""
    if launch == WorkerProcess.spawn:
        return "spawn"
    return str(getattr(launch, "start_method", "custom"))


async def settle(launch: Callable[..., Any]) -> None:
    """Before a pool's workers start: wait until its launcher knows its start method."""
    if isinstance(launch, ForkServerLauncher):
        await launch.settle()


@asynccontextmanager
async def fresh_code(launch: Callable[..., Any]) -> AsyncIterator[None]:
    """For a reload (``Pool.reload``): workers started in the block import the adapter's code
    afresh. A pool with a fork server starts a new one first (a fresh preload) and forks them
    from it; if the block ends normally, the previous one is closed once its last worker has
    exited; if it raises, the previous one forks again (the new one is closed once its workers
    have exited). Spawned workers are fresh interpreters: nothing to do."""
    if not isinstance(launch, ForkServerLauncher):
        yield
        return
    renewal = await launch.preload_again()
    try:
        yield
    except BaseException:
        launch.revert(renewal)
        raise
    launch.keep()

