"""``trio-bridge worker``'s reload on SIGHUP (the Unix convention, systemd's ``ExecReload``):
the adapter's new code without a new process.

On SIGHUP the worker first checks, in a fresh interpreter (the same Python, working directory,
``sys.path`` and environment, bounded by ``CHECK_TIMEOUT``), that the adapter's code as it now
is on disk imports. If it does not, it says so in one line on stderr and keeps serving the old
code. If it does, it drains (new calls are refused as ``draining``, so the hosts run them on
other workers; running calls get the drain timeout), and then executes itself again in place:
the same interpreter, arguments and starting environment (the token's variable included, which
the running image took out of ``os.environ``), and the same PID, so that a service manager's
``kill -HUP $MAINPID`` keeps working. The new image binds the listener again and imports the
new code; the hosts' slots dial it again. Nothing of the old image crosses the exec: its
sockets and files are closed on exec (Python opens them non-inheritable), and the processes
its tools left behind are stopped and reaped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn

from trio_bridge._wire.contract import SECRET_ENV

if TYPE_CHECKING:
    from trio_bridge._wire.standard_services import ServingStatus
    from trio_bridge.worker._server import WorkerService

CHECK_TIMEOUT = 120.0  # seconds the new code's import may take in the check
_CHILDREN_GRACE = 1.0  # seconds a tool's leftover process gets after SIGTERM, before SIGKILL, at a reload
_PREFIX = "trio-bridge worker: SIGHUP: "

# Run in the fresh interpreter: argv[1] the JSON of sys.path, argv[2] the adapter path. Prints
# one line (what failed, and how to fix it) and exits 1 if it does not import.
_CHECK = """\
import json, sys
sys.path[:] = json.loads(sys.argv[1])
from trio_bridge.worker._adapter import AdapterLoadError, load_adapter_class
try:
    load_adapter_class(sys.argv[2])
except AdapterLoadError as exc:
    print(str(exc).removesuffix(" (its own code raised: see its traceback)"), file=sys.stderr)
    sys.exit(1)
"""


class Reload:
    """A worker command's SIGHUP reload (see the module doc).

    Args:
        adapter: ``package.module:ClassName``, whose import the check tries.
        argv: the command line to execute again (``sys.orig_argv``: the interpreter's own
            options and ``-m`` included).
        environ: the environment the command started with (before it took the token out).
        path: the ``sys.path`` the adapter is imported with.

    Attributes:
        due: the worker drains to reload: once :func:`serve` returns 0, call :meth:`execute`.
    """

    def __init__(self, adapter: str, *, argv: Sequence[str], environ: Mapping[str, str], path: Sequence[str]) -> None:
        self.adapter = adapter
        self.due = False
        self._argv = list(argv)
        self._environ = dict(environ)
        self._path = list(path)
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    def ignore_while_starting(self) -> None:
        """Until :meth:`install`: a SIGHUP (which would end the process) is ignored, with a line
        on stderr (the code being loaded is the one on disk)."""
        signal.signal(signal.SIGHUP, lambda signum, frame: _say("ignored while the worker starts"))

    def install(self, service: WorkerService, grace: float, alive: ServingStatus) -> None:
        """Reload on SIGHUP from now on (on the running loop); ``grace``: the drain's seconds
        for running calls (0: no limit); ``alive``: the liveness status, which stays SERVING
        while it drains to reload (readiness does not)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup, service, grace, alive)

    def uninstall(self) -> None:
        """Before the loop closes (on the running loop): no reload on SIGHUP any more. With a
        reload due, SIGHUP is ignored from now on, through the exec (the new image's
        :meth:`ignore_while_starting` takes over): closing the loop would set it back to its
        default, which ends the process -- with asyncio's loop, at least."""
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)  # (which sets the default)
        if self.due:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _on_sighup(self, service: WorkerService, grace: float, alive: ServingStatus) -> None:
        if self._busy or self.due:
            _say("a reload is under way already; ignored")
            return
        if service.draining:
            _say("the worker is stopping; ignored")
            return
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._reload(service, grace, alive))

    async def _reload(self, service: WorkerService, grace: float, alive: ServingStatus) -> None:
        try:
            started = time.monotonic()
            problem = await self.check()
            if problem is not None:
                _say(f"the new code does not import, still serving the old: {problem}")
                return
            if service.draining:  # SIGTERM meanwhile: it stops instead
                return
            _say(f"the new code imports ({time.monotonic() - started:.1f} s); draining "
                 f"(at most {grace:g} s), then reloading in place")
            self.due = True
            service.begin_drain(grace, until_hosts_leave=True, alive=alive)
        finally:
            self._busy = False

    async def check(self) -> str | None:
        """Whether the adapter's code on disk imports, in a fresh interpreter: ``None`` if it
        does, else one line that says why not (the check's last line, or its timeout)."""
        environ = {k: v for k, v in self._environ.items() if k != SECRET_ENV}  # the adapter's code never sees it
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHECK, json.dumps(self._path), self.adapter, env=environ,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            try:
                _, err = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT)
            except TimeoutError:
                return f"importing it took longer than {CHECK_TIMEOUT:g} s"
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.returncode == 0:
            return None
        lines = err.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"the check exited with {process.returncode}"

    def execute(self) -> NoReturn:
        """Become the worker again, in place: stop and reap what the tools left running, then
        ``execve`` the same interpreter with the same arguments and starting environment."""
        # Ignored through the exec (a disposition of SIG_IGN survives it), so that a SIGHUP before
        # the new image has its handler does not end it; ignore_while_starting() takes over.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _stop_children()
        _say("reloading in place")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, self._argv, self._environ)


def _say(text: str) -> None:
    print(_PREFIX + text, file=sys.stderr, flush=True)


def _children() -> set[int]:
    """This process's child processes (Linux: ``/proc``; elsewhere none are known)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                found.update(int(pid) for pid in f.read().split())
    return found


def _reap() -> None:
    """Reap every child that has exited (none is left a zombie of the new image)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop_children() -> None:
    """What the tools started and left running would become children of the new image, which
    knows nothing of them: SIGTERM, then SIGKILL after ``_CHILDREN_GRACE``; all reaped."""
    _reap()
    children = _children()
    if children:
        _say(f"stopping {len(children)} process(es) the tools left running")
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
        ends = time.monotonic() + _CHILDREN_GRACE
        while children and time.monotonic() < ends:
            _reap()
            children = _children()
            time.sleep(0.02)
    _reap()

