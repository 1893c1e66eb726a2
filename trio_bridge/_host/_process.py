"""One worker's operating-system process: spawn, pipes, exit, signals to its process group; and
:class:`LocalProcess`, the connector of a gRPC worker that is a process of this machine (its
command and environment, the ready line, the stderr tail, the janitor, the exit status).

Spawned from the thread that runs Trio, not from Trio's thread cache (which is what
``trio.lowlevel.open_process`` uses): the worker asks the kernel for ``PR_SET_PDEATHSIG``,
which fires when the *thread* that forked it exits, and a cached thread exits after 10 s idle.
The worker leads its own session and process group (so a Ctrl-C in the terminal reaches the
host only, which then shuts workers down in order), and everything a tool starts joins that
group: signalling the group stops the worker's whole tree. When the worker exits, what is left
of its group is killed before the worker is reaped, so the group id cannot have been reused.
A tool that calls ``setsid()`` (or ``start_new_session=True``) leaves the group, and only its
own code can clean that up.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trio_bridge._errors import WorkerCrashedError, WorkerStartError
from trio_bridge._host._worker import process_crashed_error
from trio_bridge._wire.contract import (
    ADAPTER_OPTIONS_ENV,
    EXIT_ADAPTER_IMPORT,
    HOST_ADDRESS_ENV,
    HOST_PID_ENV,
    READY_PREFIX,
    SECRET_ENV,
    SECRET_ON_STDIN_ENV,
    WORKER_ID_ENV,
    WORKER_MESSAGE_PREFIX,
)

if TYPE_CHECKING:
    from trio_bridge._host._janitor import Janitor
    from trio_bridge._host._worker import WorkerLifecycle
    from trio_bridge._wire.shared_memory import SharedMemoryPlane

_STDERR_TAIL_LINES = 40
_EXIT_REPORT_WAIT = 2.0  # seconds to wait for a dying worker's exit status
_STDERR_WAIT = 0.5  # seconds to wait for the last lines of a dying worker's stderr
# What workers write to stderr (tracebacks, tools' print()s): INFO records, "[w3] line".
_worker_log = logging.getLogger("trio_bridge.worker")


class LaunchedWorker(Protocol):
    """What a local worker's connector (:class:`LocalProcess`) needs of the process it started:
    a :class:`WorkerProcess`, or a fork server's ``ForkedWorker``. It leads a process group of
    its own (signalled and watched as a whole)."""

    pid: int
    stdout: Any  # a Trio receive stream: the ready line
    stderr: Any  # a Trio receive stream: closed when the worker ends
    returncode: int | None

    async def wait(self) -> int: ...

    def signal_group(self, signum: int) -> None: ...

    async def aclose(self) -> None: ...



class WorkerProcess:
    """A running worker process, owned by one :class:`LocalProcess`.

    Attributes:
        pid: the process id, also its process group id.
        stdin: the lifeline's write end (held; nothing is written after the secret's line).
        stdout, stderr: Trio streams of its output.
        returncode: ``None`` while it runs; then its exit status (``-N``: killed by signal N).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        assert popen.stdout is not None and popen.stderr is not None
        self.stdout = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
        self.stderr = trio.lowlevel.FdStream(os.dup(popen.stderr.fileno()))
        popen.stdout.close()
        popen.stderr.close()
        self.returncode: int | None = None
        self._exited = trio.Event()
        self._watching = False
        self._pidfd: int | None = None
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: not Linux
            self._pidfd = os.pidfd_open(self.pid)

    @classmethod
    def spawn(cls, command: list[str], env: dict[str, str]) -> WorkerProcess:
        """Start ``command`` (synchronously, in this thread: ~1 ms with vfork).

        The pool secret (``env``'s ``SECRET_ENV``) goes as the first line on its stdin
        (``SECRET_ON_STDIN_ENV=1``), not in its environment, which ``/proc/PID/environ`` would
        show every process of this user for the worker's whole life.

        Raises:
            OSError: the interpreter could not be started.
        """
        secret = env.get(SECRET_ENV)
        if secret is not None:
            env = {**{k: v for k, v in env.items() if k != SECRET_ENV}, SECRET_ON_STDIN_ENV: "1"}
        popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True,
        )
        if secret is not None:
            assert popen.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # it died already: its exit says why
                popen.stdin.write(secret.encode() + b"\n")  # an empty pipe: never blocks
                popen.stdin.flush()
        return cls(popen)

    async def wait(self) -> int:
        """Wait until it exits; kill what is left of its process group; reap it; return its status.

        Several tasks may wait at once (one of them watches the process, the others its event).
        """
        if self._watching:
            await self._exited.wait()
        if self.returncode is not None:
            return self.returncode
        self._watching = True
        try:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                while not _exited_unreaped(self.pid):
                    await trio.sleep(0.05)
        finally:
            self._watching = False
        # The exited worker is a zombie until reaped, so its pid (= group id) is still ours.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self._popen.wait()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._exited.set()
        return self.returncode

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the worker's process group (the worker and what its tools started)."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def aclose(self) -> None:
        """Close the pipes (the worker sees EOF on stdin: its lifeline ends it)."""
        if self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()
        for stream in (self.stdout, self.stderr):
            await stream.aclose()


def _exited_unreaped(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


async def read_lines(stream: Any, line: Callable[[str], None]) -> None:
    """Read a process's pipe (a Trio receive stream) to its end, calling ``line`` with each line
    (the last one also without a newline); a closed stream ends it quietly."""
    pending = b""
    try:
        while data := await stream.receive_some(65536):
            pending += data
            *lines, pending = pending.split(b"\n")
            for text in lines:
                line(text.decode(errors="replace"))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        if pending:
            line(pending.decode(errors="replace"))


async def _drain(stream: Any) -> None:
    """Read and drop a pipe so the writer can never block on it."""
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


Launch = Callable[[list[str], dict[str, str]], LaunchedWorker]
"""Starts a worker process: ``launch(command, env)`` (:meth:`WorkerProcess.spawn`, or a fork
server's launcher)."""


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a pool's local workers; the same for every slot."""

    adapter: str
    python: str
    concurrency: int
    transport: str  # "unix" or "tcp"
    socket_dir: str
    secret: str
    host_address: str
    env: dict[str, str]
    startup_timeout: float
    heartbeat_interval: float
    adapter_options: str = "{}"  # JSON
    launch: Launch = WorkerProcess.spawn
    slot_env: Sequence[Mapping[str, str]] = ()
    """Each local slot's own extra environment (``worker_env``, ``gpus_per_worker``), by slot."""

    def command(self, worker_id: str, slot: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of slot ``slot``'s worker ``worker_id``."""
        if self.transport == "unix":
            listen = f"unix:{os.path.join(self.socket_dir, worker_id + '.sock')}"
            if self.socket_dir.startswith("@"):  # Linux abstract namespace: nothing on disk
                listen = f"unix:{self.socket_dir}-{worker_id}"
        else:
            listen = "tcp:127.0.0.1:0"
        env = dict(os.environ)
        env.update(self.env)
        if slot < len(self.slot_env):
            env.update(self.slot_env[slot])
        env[SECRET_ENV] = self.secret  # the launcher carries it: a spawn on stdin, a fork in its request
        env[WORKER_ID_ENV] = worker_id
        env[HOST_ADDRESS_ENV] = self.host_address
        env[ADAPTER_OPTIONS_ENV] = self.adapter_options
        env[HOST_PID_ENV] = str(os.getpid())
        # The worker must import what the host can: the host's cwd first, then its PYTHONPATH.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
        command = [
            self.python, "-m", "trio_bridge.worker", "--adapter", self.adapter, "--listen", listen,
            "--concurrency", str(self.concurrency), "--heartbeat-interval", str(self.heartbeat_interval),
        ]
        return command, env


class LocalProcess:
    """The connector of a gRPC worker that is a process of this machine
    (``_grpc_worker.Connector``): started by ``spec.launch``; its address is its ready line;
    its stderr is logged and its tail kept; it is gone when the process exits; stopping it
    signals its process group (SIGTERM, then SIGKILL). Its shared-memory files are removed
    once it is gone (``plane``), and the ``janitor`` kills its group should the host die first.
    """

    remote = False
    server_name = None

    def __init__(
        self, spec: WorkerSpec, slot: int, *, janitor: Janitor | None = None, plane: SharedMemoryPlane | None = None
    ) -> None:
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self.abandoned: set[str] = set()  # (its calls end with it)
        self._spec = spec
        self._slot = slot
        self._janitor = janitor
        self._plane = plane
        self._process: LaunchedWorker | None = None
        self._stderr_closed = trio.Event()

    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def open(self, worker_id: str, lifecycle: WorkerLifecycle, nursery: trio.Nursery) -> str:
        command, env = self._spec.command(worker_id, self._slot)
        try:
            process = self._spec.launch(command, env)
        except OSError as exc:
            raise WorkerStartError(
                f"cannot start {self._spec.python!r}: {exc} (adapter {self._spec.adapter!r})", worker_id=worker_id,
            ) from None
        self._process = process
        if self._janitor is not None:
            self._janitor.watch_group(process.pid)
        nursery.start_soon(self._read_stderr, worker_id, process.stderr)
        nursery.start_soon(self._wait_exit, process, lifecycle)
        address = await self._read_ready_line(process.stdout, worker_id, lifecycle)
        nursery.start_soon(_drain, process.stdout)
        return address

    async def _read_ready_line(self, stdout: Any, worker_id: str, lifecycle: WorkerLifecycle) -> str:
        buffer = b""
        while True:
            data = await stdout.receive_some(4096)
            if not data:
                raise await self.start_error("exited before it was ready", worker_id, lifecycle)
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text.startswith(READY_PREFIX):
                    return text[len(READY_PREFIX):]
                if text:
                    self.stderr_tail.append(f"[stdout] {text}")

    async def _read_stderr(self, worker_id: str, stderr: Any) -> None:
        def line(text: str) -> None:
            self.stderr_tail.append(text)
            _worker_log.info("[%s] %s", worker_id, text)

        try:
            await read_lines(stderr, line)
        finally:
            self._stderr_closed.set()

    async def _wait_exit(self, process: LaunchedWorker, lifecycle: WorkerLifecycle) -> None:
        lifecycle.exit(await process.wait())

    def kill(self) -> None:
        if self._process is not None:
            self._process.signal_group(signal.SIGKILL)

    async def close(self) -> int | None:
        """Terminate, then kill, its whole process group; close its pipes; forget it."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.signal_group(signal.SIGTERM)
            with trio.move_on_after(2):
                await process.wait()
        if process.returncode is None:
            process.signal_group(signal.SIGKILL)
            await process.wait()
        await process.aclose()
        if self._janitor is not None:
            self._janitor.forget_group(process.pid)
        if self._plane is not None:
            self._plane.remove_files_of(process.pid)
        return process.returncode

    async def shutdown(self, grace: float, lifecycle: WorkerLifecycle, ask: Callable[[float], Awaitable[None]]) -> None:
        await ask(grace)

    async def settle(self, lifecycle: WorkerLifecycle, kill: Callable[[], None]) -> None:
        # Give the process a moment to be reaped so the error can carry its exit status.
        with trio.move_on_after(_EXIT_REPORT_WAIT):
            await lifecycle.exited.wait()
        if lifecycle.alive:
            kill()
        with trio.move_on_after(_STDERR_WAIT):
            await self._stderr_closed.wait()

    def crashed_error(self, worker_id: str, pid: int | None, lifecycle: WorkerLifecycle) -> WorkerCrashedError:
        return process_crashed_error(worker_id, pid, lifecycle, self.stderr_tail)

    async def start_error(self, message: str, worker_id: str, lifecycle: WorkerLifecycle, *, unreachable: bool = False) -> WorkerStartError:
        with trio.move_on_after(_EXIT_REPORT_WAIT):
            await lifecycle.exited.wait()
        with trio.move_on_after(_STDERR_WAIT):
            await self._stderr_closed.wait()
        message = f"{message} (adapter {self._spec.adapter!r})"
        if lifecycle.exit_code == EXIT_ADAPTER_IMPORT:  # the worker said what to fix, in one line: lead with it
            said = next((line for line in self.stderr_tail if line.startswith(WORKER_MESSAGE_PREFIX)), "")
            message = said.removeprefix(WORKER_MESSAGE_PREFIX) or message
        return WorkerStartError(
            message, worker_id=worker_id, pid=self.pid, exit_code=lifecycle.exit_code, stderr_tail="\n".join(self.stderr_tail),
        )

    def sample_memory(self) -> int | None:
        if self._process is None:
            return None
        import psutil  # only pools with Recycling.max_memory get here

        try:
            return psutil.Process(self._process.pid).memory_info().rss
        except psutil.Error:
            return None
