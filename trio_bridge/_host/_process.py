"""One worker's operating-system process: spawn, pipes, exit, signals to its process group.

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

import contextlib
import contextvars
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

import trio

from trio_bridge._wire.contract import SECRET_ENV, SECRET_ON_STDIN_ENV


class LaunchedWorker(Protocol):
    """What a worker handle needs of whatever runs its worker: a :class:`WorkerProcess`, or
    (``trio_bridge.testing.open_pool_in_threads``) a worker in a thread of this process."""

    pid: int
    stdout: Any  # a Trio receive stream: the ready line
    stderr: Any  # a Trio receive stream: closed when the worker ends
    returncode: int | None
    own_group: bool  # it leads a process group of its own (signalled and watched as a whole)
    remote: bool  # the host did not start it (a remote worker): it is detached from, not stopped

    async def wait(self) -> int: ...

    def signal_group(self, signum: int) -> None: ...

    async def aclose(self) -> None: ...



class WorkerProcess:
    """A running worker process, owned by one :class:`~trio_bridge._host._worker.WorkerHandle`.

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
        self.own_group = True
        self.remote = False
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


#: How the workers of pools opened in this context are launched: ``launch(command, env)``, read
#: once when a pool opens (``trio_bridge.testing.open_pool_in_threads`` sets it).
launcher: contextvars.ContextVar[Callable[[list[str], dict[str, str]], LaunchedWorker]] = contextvars.ContextVar(
    "trio_bridge_launcher", default=WorkerProcess.spawn
)
