"""The janitor: a tiny process that cleans up after a host that died without cleaning up.

A host killed by SIGKILL (or the OOM killer) runs no cleanup. Its workers die with it (the kernel
sends them SIGKILL: ``PR_SET_PDEATHSIG``), but two things would remain: processes that tools
started (in the worker's process group, now orphaned) and the pool's shared-memory directory on
``/dev/shm`` (RAM, until reboot). The janitor is started with the pool and told, one line at a
time on its stdin, which process groups and paths the pool owns right now. The host holds the
only write end of that pipe, so the janitor reads EOF as soon as the host is gone, however it
died; it then kills what is left of those process groups and removes those paths, and exits.

Nothing here holds the GIL in C code (unlike a worker's tool), so the EOF is always seen.
The process side (:func:`main`) imports only the standard library.

Protocol (host -> janitor, one ASCII line each): ``+group PGID`` / ``-group PGID``,
``+path PATH`` / ``-path PATH``. A clean close removes everything first, so EOF finds nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys


class Janitor:
    """The host's end: keep the janitor's view of the pool's groups and paths current."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    @classmethod
    def start(cls) -> Janitor:
        """Spawn the janitor (``python -m trio_bridge._host._janitor``). Synchronous: ~1 ms."""
        process = subprocess.Popen(
            [sys.executable, "-m", "trio_bridge._host._janitor"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is not for it
        )
        return cls(process)

    def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):  # it died: nothing more we can ask of it
            self._process.stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
            self._process.stdin.flush()

    def watch_group(self, pgid: int) -> None:
        self._send(f"+group {pgid}")

    def forget_group(self, pgid: int) -> None:
        self._send(f"-group {pgid}")

    def watch_path(self, path: str) -> None:
        self._send(f"+path {path}")

    def forget_path(self, path: str) -> None:
        self._send(f"-path {path}")

    def close(self) -> None:
        """The pool closed cleanly: let the janitor exit (it finds nothing left to do)."""
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=1.0)
        if self._process.returncode is None:
            self._process.kill()
            self._process.wait()


def main() -> None:
    groups: set[int] = set()
    paths: set[str] = set()
    for raw in sys.stdin.buffer:
        op, _, arg = raw.rstrip(b"\n").decode("utf-8", "surrogateescape").partition(" ")
        if op == "+group":
            groups.add(int(arg))
        elif op == "-group":
            groups.discard(int(arg))
        elif op == "+path":
            paths.add(arg)
        elif op == "-path":
            paths.discard(arg)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # it outlives its host on purpose; EOF ends it
    main()
