"""The shared-memory data plane: large numpy arrays travel as files on tmpfs, not in gRPC.

grpclib moves 150-270 MB/s (STACK-NOTES; ~70 MiB/s round trip on a slower machine here), a memory
copy 11-30 GB/s. So an array of at least ``threshold`` bytes is written to a file in the pool's
private directory on ``/dev/shm`` (0700; files 0600), and only its name, dtype and shape go on
the wire; the receiver reads it into a new array (one copy) and unlinks the file.

Only for Unix-socket pools (the processes share the machine). Files whose message was never
read (a cancelled call's result) are swept after ``max_age`` seconds, and the directory is
removed when the pool closes.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

SHM_ROOT = "/dev/shm"
DEFAULT_THRESHOLD = 1 << 20  # bytes
DIRECTORY_ENV = "TRIO_BRIDGE_SHM_DIR"
THRESHOLD_ENV = "TRIO_BRIDGE_SHM_THRESHOLD"

_NAME = re.compile(r"^[0-9]+-[0-9]+-[0-9a-f]{8}$")
_DIRECTORY = re.compile(r"^trio-bridge-([0-9]+)-")
_counter = itertools.count()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedMemoryPlane:
    """One pool's shared-memory directory, as seen by one process.

    Args:
        directory: the pool's private directory on tmpfs.
        threshold: arrays of at least this many bytes go through it.
    """

    def __init__(self, directory: str, threshold: int = DEFAULT_THRESHOLD) -> None:
        self.directory = directory
        self.threshold = threshold

    @classmethod
    def create(cls, threshold: int = DEFAULT_THRESHOLD) -> SharedMemoryPlane | None:
        """A new private directory on ``/dev/shm``, or ``None`` where there is no usable tmpfs."""
        if not os.path.isdir(SHM_ROOT) or not os.access(SHM_ROOT, os.W_OK | os.X_OK):
            return None
        # The host's pid in the name lets a later pool reclaim it if this host dies uncleanly.
        return cls(tempfile.mkdtemp(prefix=f"trio-bridge-{os.getpid()}-", dir=SHM_ROOT), threshold)

    @staticmethod
    def reclaim_abandoned(root: str = SHM_ROOT) -> list[str]:
        """Remove the directories (ours, by owner) of pools whose host process is gone; return them.

        The janitor normally removes a dead host's directory; this catches what it could not
        (the janitor killed too, or a host from before it existed).
        """
        removed = []
        try:
            names = os.listdir(root)
        except OSError:
            return removed
        for name in names:
            match = _DIRECTORY.match(name)
            if match is None or _process_exists(int(match.group(1))):
                continue
            path = os.path.join(root, name)
            try:
                if os.stat(path).st_uid != os.getuid():
                    continue
            except OSError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> SharedMemoryPlane | None:
        """The plane a worker's environment names (``None``: in-band only)."""
        directory = env.get(DIRECTORY_ENV)
        if not directory:
            return None
        return cls(directory, int(env.get(THRESHOLD_ENV) or DEFAULT_THRESHOLD))

    def environment(self) -> dict[str, str]:
        return {DIRECTORY_ENV: self.directory, THRESHOLD_ENV: str(self.threshold)}

    def write(self, array: Any) -> str:
        """Write an array's bytes (C order) to a new file; return its name."""
        name = f"{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        fd = os.open(os.path.join(self.directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            array.tofile(f)
        return name

    def read(self, name: str, dtype: Any, shape: list[int]) -> Any:
        """Read the array a peer wrote, and remove its file.

        Raises:
            ValueError: a malformed name (never a path outside the directory), or a size that
                does not fit dtype and shape.
        """
        import numpy

        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"malformed shared-memory name {name!r}")
        path = os.path.join(self.directory, name)
        try:
            array = numpy.fromfile(path, dtype=dtype)
        except FileNotFoundError:
            raise ValueError(f"shared-memory file {name!r} is gone (swept after its message waited too long?)") from None
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return array.reshape(shape)

    def sweep(self, max_age: float) -> int:
        """Remove files older than ``max_age`` seconds (written for messages never read)."""
        removed = 0
        limit = time.time() - max_age
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


#: The plane used when a codec call is not given one: set once by a worker process at start-up.
default_plane: SharedMemoryPlane | None = None
