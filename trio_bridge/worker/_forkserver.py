"""The fork server: a preloaded parent that forks workers (``start_method="forkserver"``).

Started once per pool by the host (``trio_bridge._host._forkserver``) as
``python -m trio_bridge.worker._forkserver --adapter module:Class --spares N``, with a Unix
``SOCK_SEQPACKET`` socket as its stdin (the *control* socket) and the pool's environment. It
dies with its host exactly like a worker (``PR_SET_PDEATHSIG`` first thing, and EOF on the
control socket), imports the worker's server module and the adapter's module once (and warms up
what every worker would import lazily, see :func:`_preload`), and then:

- if it has more than one thread (counted in ``/proc/self/task``, so native threads started by
  BLAS or torch count too; or it is not on Linux), it says ``{"fork": false, "reason": "..."}``
  and exits: the host spawns its workers instead;
- else it forks ``N`` *spares* -- workers that wait for their assignment -- announcing each to
  the host (``S<pid>``, with two sockets: the spare's *assignment* socket and its *status*
  socket), then says ``{"fork": true, "pid": N}`` and serves.

An adapter module that fails to import is not a reason to refuse: each forked worker imports it
again and reports the error as a spawned worker would.

A worker is started either way, both carrying the same JSON ``{"args": [...], "env": {...},
"cwd": "..."}`` -- its command-line arguments after ``-m trio_bridge.worker``, its whole
environment, its working directory -- with file descriptors attached (``SCM_RIGHTS``): the read
end of its stdin pipe and the write ends of its stdout and stderr pipes:

- the host assigns a spare, sending that directly on the spare's assignment socket (nothing to
  wait for), and asks for another one (``spare`` on the control socket) when none is left: one
  is kept in reserve for the next replacement;
- or it asks for a fork now, on the control socket, with the worker's status socket as a fourth
  descriptor; the fork server answers ``P<pid>`` on the status socket right after the fork (or
  ``E<reason>`` if it cannot fork now).

On a worker's status socket the fork server sends ``X<code>`` once it has exited (``<code>`` as
``subprocess`` has it: ``-N`` for killed by signal N).

What the fork server guarantees, as ``WorkerProcess`` does for a spawned worker:

- The child runs nothing of the parent's loop: it calls ``setsid()`` (it leads its own session
  and process group), asks for ``PR_SET_PDEATHSIG`` (SIGKILL when the fork server dies -- and
  the fork server dies with the host), exits if the fork server is already gone, closes every
  descriptor of the fork server's (control socket, other workers' status sockets, the SIGCHLD
  pipe), resets the signals the fork server changed -- a spare then waits for its assignment,
  and exits if the host closes that socket instead (the host let go of it, or is gone) -- moves
  its three pipes onto 0, 1 and 2, takes the request's environment (all of it: per-worker
  variables such as the worker id apply), working directory and ``argv``, and runs the worker's
  ``main`` (which first takes the pool secret out of ``os.environ``; then the stdin lifeline, the
  shared-memory plane, the asyncio server, ``os._exit``). It never returns into the server loop.
  The secret is never in the fork server's own environment, which is what ``/proc/PID/environ``
  shows of a forked worker; the fork server drops a fork request (which carries it) once forked.
- When a worker exits, the fork server kills what is left of its process group, then tells the
  host its status; it reaps the worker (a zombie until then, so its pid -- its group id -- can
  not be reused) only once the host has closed its status socket, i.e. once nothing on the host
  can still signal that group.
- A status socket the host closes while its worker runs (the host let go of it) gets that
  worker's group killed. EOF on the control socket (the host is gone or closed the pool) gets
  every worker's group killed and reaped; then the fork server exits.

The fork server runs no event loop and no thread of its own; it forks from a single-threaded
process, and checks again (cheaply) before each fork.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

from trio_bridge.worker._threads import ThreadPools, hold_at_one

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_MAX_REQUEST = 1 << 20  # bytes: a request carries the worker's whole environment
_FDS_PER_REQUEST = 4  # stdin (read end), stdout, stderr (write ends), status socket
EXIT_HOST_GONE = 5  # trio_bridge._wire.contract.EXIT_HOST_GONE (not imported: see _preload)


def thread_count() -> int:
    """Threads of this process, as the kernel counts them (native ones included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


class _Worker:
    """A forked worker (or spare) as the fork server tracks it."""

    __slots__ = ("code", "pid", "status")

    def __init__(self, pid: int, status: socket.socket) -> None:
        self.pid = pid
        self.status: socket.socket | None = status  # None once the host let go of it
        self.code: int | None = None  # set once it has exited (it stays a zombie until reaped)


class ForkServer:
    """The server loop (in the fork server process) and the fork (in the child)."""

    def __init__(
        self, control: socket.socket, run_worker: Callable[[list[str]], Any], prctl: Callable[..., int], pools: ThreadPools
    ) -> None:
        self.control = control
        self.run_worker = run_worker
        self.prctl = prctl
        self.pools = pools
        self.pid = os.getpid()
        self.workers: dict[int, _Worker] = {}
        self.by_fd: dict[int, _Worker] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sigint = signal.getsignal(signal.SIGINT)
        self.poller = select.poll()

    # ---- the server loop ----
    def serve(self, spares: int) -> None:
        """Fork ``spares`` spares, say it forks, and serve until the host goes."""
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wakeup fd is written
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host, which stops the pool in order
        self.poller.register(self.control, select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        for _ in range(spares):
            self._fork_spare()
        _send(self.control, {"fork": True, "pid": self.pid})
        control = self.control.fileno()
        while True:
            ready = {fd for fd, _ in self.poller.poll()}
            # Status sockets first, the control socket last: a descriptor closed in this round
            # cannot be reused by a new worker's before the round's events are handled.
            for fd in ready - {control, self.wake_r}:
                worker = self.by_fd.get(fd)
                if worker is not None:
                    self._host_let_go(worker)
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_r, 4096):
                        pass
                self._collect()
            if control in ready and not self._handle_request():
                self._shut_down()
                return

    def _handle_request(self) -> bool:
        """Serve one request; ``False`` on EOF (the host is gone or closed the pool)."""
        message, fds, flags, _ = socket.recv_fds(self.control, _MAX_REQUEST, _FDS_PER_REQUEST)
        if not message and not fds:
            return False
        if message == b"spare" and not fds:
            self._fork_spare()
            return True
        if len(fds) != _FDS_PER_REQUEST or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            return True  # not a request of ours; nobody to answer
        stdin, stdout, stderr, status_fd = fds
        status = socket.socket(fileno=status_fd)
        try:
            request = json.loads(message)
            _check_threads()
            pid = self._fork(lambda: self._become_worker(request, (stdin, stdout, stderr)), close=(status,))
        except Exception as exc:
            with contextlib.suppress(OSError):
                status.send(b"E" + f"{type(exc).__name__}: {exc}".encode(errors="replace"))
            status.close()
            return True
        finally:
            for fd in (stdin, stdout, stderr):
                os.close(fd)
        self._track(pid, status)
        try:
            status.send(b"P%d" % pid)
        except OSError:
            self._host_let_go(self.workers[pid])
        return True

    def _fork_spare(self) -> None:
        """Fork a worker that waits for its assignment, and hand the host its two sockets: one
        to assign it (host -> spare, directly), one for its status (fork server -> host)."""
        try:
            _check_threads()
        except RuntimeError:
            return  # the host's next request gets the refusal
        assign, spare_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        status_host, status = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                pid = self._fork(lambda: self._wait_for_assignment(spare_end), close=(assign, status_host, status))
            except OSError:
                status.close()
                return  # the host's next request forks, or gets the error
            spare_end.close()
            self._track(pid, status)
            try:
                socket.send_fds(self.control, [b"S%d" % pid], [assign.fileno(), status_host.fileno()])
            except OSError:
                self._host_let_go(self.workers[pid])
        finally:
            for sock in (assign, spare_end, status_host):
                sock.close()

    def _track(self, pid: int, status: socket.socket) -> None:
        worker = _Worker(pid, status)
        self.workers[pid] = worker
        self.by_fd[status.fileno()] = worker
        self.poller.register(status, select.POLLIN)  # readable: EOF, the host let go

    def _collect(self) -> None:
        """Workers that exited: kill what is left of their groups, tell their hosts; reap those
        the host has let go of."""
        for worker in list(self.workers.values()):
            if worker.code is not None:
                continue
            try:
                info = os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
                worker.code = -signal.SIGKILL  # cannot happen: nobody else reaps our children
            else:
                if info is None:
                    continue
                worker.code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            # A zombie still: its pid, and so its group id, is ours until it is reaped.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
            if worker.status is not None:
                try:
                    worker.status.send(b"X%d" % worker.code)
                except OSError:
                    self._host_let_go(worker)
            else:
                self._reap(worker)

    def _host_let_go(self, worker: _Worker) -> None:
        """The host closed the worker's status socket: nothing there can signal it any more."""
        if worker.status is not None:
            self.by_fd.pop(worker.status.fileno(), None)
            self.poller.unregister(worker.status)
            worker.status.close()
            worker.status = None
        if worker.code is None:  # still running: the host no longer owns it
            _kill(worker.pid)  # reaped by _collect when its SIGCHLD comes
        else:
            self._reap(worker)

    def _reap(self, worker: _Worker) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker.pid, 0)
        self.workers.pop(worker.pid, None)

    def _shut_down(self) -> None:
        """The host is gone or closed the pool: kill every worker's group, reap them all."""
        for worker in self.workers.values():
            _kill(worker.pid)
        for worker in list(self.workers.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
        self.workers.clear()

    # ---- the fork ----
    def _fork(self, child: Callable[[], None], close: tuple[socket.socket, ...] = ()) -> int:
        """Fork; the child closes ``close``, detaches from the fork server and runs ``child()``
        (which ends the process); the parent gets the child's pid."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:  # the child: never returns
            for sock in close:
                sock.close()
            self._detach()
            child()
        except SystemExit as exc:  # argparse's usage error (2), as a spawned worker exits
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                os.write(2, traceback.format_exc().encode(errors="replace"))
            if isinstance(exc, KeyboardInterrupt):  # exit "by SIGINT", as Python does
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)

    def _detach(self) -> None:
        """In a fresh child: its own session and group, its death signal, nothing of the fork
        server's left open, the signals as they were."""
        os.setsid()  # its own session and process group: the host signals its whole tree
        if self.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != self.pid:
            os._exit(EXIT_HOST_GONE)  # no death signal, or the fork server (so the host) is gone already
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.sigint is not None:
            signal.signal(signal.SIGINT, self.sigint)
        self.control.close()
        for worker in self.workers.values():
            if worker.status is not None:
                worker.status.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _wait_for_assignment(self, assign: socket.socket) -> None:
        """A spare: wait until the host assigns it (EOF: the host let go of it, or is gone)."""
        message, fds, flags, _ = socket.recv_fds(assign, _MAX_REQUEST, 3)
        assign.close()
        if not message or len(fds) != 3 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            os._exit(0)
        self._become_worker(json.loads(message), (fds[0], fds[1], fds[2]))

    def _become_worker(self, request: dict[str, Any], pipes: tuple[int, int, int]) -> None:
        for target, fd in enumerate(pipes):
            os.dup2(fd, target)
            os.close(fd)
        cwd = str(request.get("cwd") or "")
        if cwd:
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        _reseed()
        self.pools.set_for(os.environ)  # OpenBLAS's threads, held at one in the fork server: as spawned
        args = [str(a) for a in request["args"]]
        sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"), *args]  # as -m sets it
        self.run_worker(args)  # calls os._exit


def _reseed() -> None:
    """A forked worker must not share its random state with its siblings: Python reseeds the
    ``random`` module after ``fork()`` itself, numpy's legacy global ``RandomState`` does not
    (``numpy.random.default_rng()`` draws fresh entropy anyway)."""
    legacy = sys.modules.get("numpy.random")  # imported by the adapter's module (numpy 2 loads it lazily)
    if legacy is not None:
        legacy.seed()


def _check_threads() -> None:
    threads = thread_count()
    if threads > 1:
        raise RuntimeError(f"the fork server has {threads} threads now: forking is unsafe")


def _kill(pid: int) -> None:
    """SIGKILL a worker's group, and the worker itself (a fresh fork may not have called
    ``setsid()`` yet: then it has no group of its own)."""
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(target, signal.SIGKILL)


def _die_with_host() -> Callable[..., int]:
    """``PR_SET_PDEATHSIG`` for the fork server itself; returns ``prctl`` for the children."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    host = os.environ.get("TRIO_BRIDGE_HOST_PID")  # trio_bridge._wire.contract.HOST_PID_ENV
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and host and os.getppid() != int(host):
        os._exit(EXIT_HOST_GONE)  # the host died before prctl took effect
    return libc.prctl


def _preload(adapter: str) -> Callable[[list[str]], Any]:
    """Import the worker's server module and the adapter's module, and warm up what every
    worker would otherwise import lazily; return the worker's ``main``.

    The warm-up runs none of the adapter's code: its tools are derived once from an instance
    made without ``__init__`` (``cls.__new__``) and dropped -- that imports and primes the
    argument validators (pydantic) and keeps the definitions for every instance -- the worker's
    event-loop factory is resolved (uvloop), its command-line parser made, the wire's per-message
    encoding plans built (:mod:`fast_proto`), and the standard services' modules are imported
    (health, reflection: protobuf). Measured: a forked worker ready in ~25 ms instead of ~150 ms
    without the warm-up, and ~10 ms less again with the parser, definitions and plans.
    """
    from trio_bridge.worker import _server
    from trio_bridge.worker._adapter import collect_tools, load_adapter_class

    with contextlib.suppress(BaseException):  # a forked worker imports it again, and reports why it fails
        cls = load_adapter_class(adapter)
        collect_tools(cls.__new__(cls))
    with contextlib.suppress(BaseException):
        loop_factory = getattr(_server, "loop_factory", None)
        if loop_factory is not None:
            loop_factory(os.environ)
        _server.parse_arguments(["--adapter", adapter, "--listen", "unix:@preload"])  # its patterns compiled too
    with contextlib.suppress(BaseException):  # every message's plan, as its first use would build it
        import betterproto2

        from trio_bridge._wire import fast_proto
        from trio_bridge._wire.generated.trio_bridge import v1 as pb

        for message in vars(pb).values():
            if isinstance(message, type) and issubclass(message, betterproto2.Message):
                fast_proto.parse(message, fast_proto.serialize(message()).tobytes())
    with contextlib.suppress(BaseException):  # health and reflection: protobuf, descriptors (~50 ms)
        from trio_bridge._wire.standard_services import with_standard_services

        with_standard_services([])
    return _server.main


def _send(control: socket.socket, verdict: dict[str, Any]) -> None:
    control.send(json.dumps(verdict).encode())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trio_bridge.worker._forkserver")
    parser.add_argument("--adapter", required=True, help="package.module:ClassName (its module is preloaded)")
    parser.add_argument("--spares", type=int, default=0, help="workers to fork ahead of the first requests")
    args = parser.parse_args()
    hold_at_one(os.environ)  # before anything loads OpenBLAS (the user's value too): each worker sets its own
    control = socket.socket(fileno=os.dup(0))  # the host's control socket is our stdin
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if not sys.platform.startswith("linux"):
        _send(control, {"fork": False, "reason": "not Linux (no PR_SET_PDEATHSIG)"})
        return
    prctl = _die_with_host()
    run_worker = _preload(args.adapter)
    try:
        pools = ThreadPools()
    except Exception as exc:
        _send(control, {"fork": False, "reason": f"the BLAS thread pools cannot be set after a fork ({exc})"})
        return
    threads = thread_count()
    if threads > 1:
        _send(control, {"fork": False, "reason": f"{threads} threads after importing {args.adapter.partition(':')[0]}"})
        return
    gc.freeze()  # what is here now stays put (the collector leaves it alone): fewer pages copied into each worker
    ForkServer(control, run_worker, prctl, pools).serve(max(0, args.spares))


if __name__ == "__main__":
    main()
