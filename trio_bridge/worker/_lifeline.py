"""A worker never outlives its host: the kernel's parent-death signal, and a lifeline thread.

Both are set up first thing in the worker process, before anything heavy is imported and before
the adapter's code runs (so a hung import or ``setup()`` cannot keep an orphan alive):

- ``PR_SET_PDEATHSIG`` (Linux): the kernel sends SIGKILL when the host's thread that started the
  worker exits. It needs no GIL, so it works while a tool holds the GIL in a long C call.
- The lifeline thread (everywhere, the fallback): EOF on stdin (the host holds the pipe's only
  write end, which the kernel closes even on SIGKILL), or a changed parent pid.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

from trio_bridge._wire.contract import EXIT_HOST_GONE, HOST_PID_ENV

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_host() -> None:
    """Ask the kernel to SIGKILL this process when its parent goes (Linux; a no-op elsewhere or
    when not started by a host). Exits at once if the host is already gone."""
    host_pid = os.environ.get(HOST_PID_ENV)
    if not host_pid or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # the lifeline still covers us
    if os.getppid() != int(host_pid):  # the host died before prctl took effect
        os._exit(EXIT_HOST_GONE)


def start_lifeline(parent_pid: int) -> None:
    """Exit at once when the host goes away: EOF on stdin, or a changed parent pid."""

    def watch() -> None:
        stdin = sys.stdin.fileno()
        while True:
            readable, _, _ = select.select([stdin], [], [], 1.0)
            if readable and not os.read(stdin, 4096):
                break
            if os.getppid() != parent_pid:
                break
        os._exit(EXIT_HOST_GONE)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
