"""The shared-memory data plane: large numpy arrays travel through tmpfs segments, not in gRPC.

grpclib moves 150-270 MB/s (STACK-NOTES), a memory copy 5-30 GB/s. So an array of at least
``threshold`` bytes is copied into a *segment*: a file in the pool's private directory on
``/dev/shm`` (0700; files 0600) that its writer keeps mapped and reuses. Only the segment's name,
generation, offset, dtype and shape go on the wire.

Why segments and not a file per message: a fresh tmpfs file costs a page allocation and a fault
per 4 KiB on first write (0.55 GB/s round trip for 100 MB here); a reused, mapped segment is
written at memory speed, and a reader keeps its mapping of a segment for the next message.

**Received arrays are read-only views, not copies** (as in Ray's object store): the array is on
the segment, so it costs no memory and no copy; ``numpy.array(received)`` gives a writable copy.
Sending such an array on (returning it, passing it to another call) passes the segment along
without copying it again. The segment stays lent while any array or view on it lives in any
process; then its writer reuses it.

Who may reuse a segment is decided by the kernel, so that no death can corrupt or leak one:
every process that holds arrays on a segment holds a shared ``flock`` on it; the writer reuses a
segment only under an exclusive ``flock``, and only if its header says it was read since it was
last sent (or was sent ``max_age`` seconds ago and never read: a dropped message). A dead reader's
locks go with its process. The header (the first page; the data starts on the second) holds the
state, a generation (bumped by each write: a stale reference is refused) and when it was sent.
Every file carries its writer's pid in its name: the host removes a worker's segments when it
exits (:meth:`remove_files_of`), and the pool's directory when it closes (the janitor does, should
the host itself die).

**Buffers** (:meth:`SharedMemoryPlane.empty`: ``pool.empty`` on the host, ``ctx.empty`` in a
worker): a writable array on a segment of this process, filled in place and sent without a
copy. Sending it *hands it over*: the array becomes read-only for good (numpy refuses writes with
``ValueError: assignment destination is read-only``, and ``flags.writeable = True`` with
``ValueError``: the array's memory comes from a :class:`_Seal`, which exports no writable buffer
once sealed), so nothing its sender does later changes
what its reader got (the receiver's guarantee, kept without a copy, as Arrow's plasma seals an
object). Only while no other view of the array is alive (told by reference counts,
:mod:`holders`; where they cannot be trusted, every such array is copied): a view made before the send could still
write, so such an array is copied like any other (raw buffer exports, a ``memoryview`` or a
pointer, are not tracked: the docstrings tell users not to write through them). The segment is reused once the sender's array
and every reader's are gone. (Copy-on-write instead, by remapping the sender's pages private,
measured 3.5 ms per 100 MB to remap, and the sender's next fill of the buffer then faults every
page: slower than the copy it saves.)

Only for Unix-socket pools (the processes share the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import math
import mmap
import operator
import os
import re
import secrets
import shutil
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._os import process_exists
from trio_bridge._wire import holders

SHM_ROOT = "/dev/shm"
DEFAULT_THRESHOLD = 1 << 20  # bytes
DIRECTORY_ENV = "TRIO_BRIDGE_SHM_DIR"
THRESHOLD_ENV = "TRIO_BRIDGE_SHM_THRESHOLD"
DEFAULT_MAX_AGE = 300.0  # seconds a sent segment waits to be read before its writer takes it back
#: Free segments a process keeps for reuse, at most (bytes); more are removed.
FREE_BYTES_KEPT = 1 << 30

_NAME = re.compile(r"^([0-9]+)-[0-9]+-[0-9a-f]{8}$")
_DIRECTORY = re.compile(r"^trio-bridge-([0-9]+)-")
_HEADER = 4096  # the data starts on the second page: aligned for any dtype
_FIELDS = struct.Struct("<QQd")  # state, generation, sent at (time.time())
_SENT, _READ = 1, 2  # a new segment's state is 0: free, like a READ one
#: Reader mappings kept (bytes) for segments no array is on, to read the next message warm.
MAPPINGS_KEPT = 512 << 20
#: Segments a process holds arrays on, at most; past that a received array is a copy (each
#: holds a file descriptor).
MAX_HELD = 512
_counter = itertools.count()


def _capacity(nbytes: int) -> int:
    """Segment data size for ``nbytes``: rounded up to an eighth of its power of two (so a
    segment is reused for arrays of nearby sizes, wasting at most 1/8; tmpfs pages that are
    never written cost nothing)."""
    step = max(mmap.PAGESIZE, (1 << (max(nbytes, 1).bit_length() - 1)) // 8)
    return -(-nbytes // step) * step


class _Segment:
    """One of this process's segments, mapped for writing."""

    __slots__ = ("address", "capacity", "fd", "lent", "map", "name")

    def __init__(self, name: str, capacity: int, fd: int, memory: mmap.mmap) -> None:
        import numpy

        self.name = name
        self.capacity = capacity
        self.fd = fd
        self.map = memory
        self.address: int = numpy.frombuffer(memory, numpy.uint8, 1).__array_interface__["data"][0]
        #: the root array of :meth:`SharedMemoryPlane.empty` on it, while that lives in this process
        self.lent: weakref.ref[Any] | None = None

    def root(self) -> Any:
        """The live root array lent on this segment, or ``None``."""
        return None if self.lent is None else self.lent()

    def lock_if_reusable(self, now: float, max_age: float) -> bool:
        """Take the exclusive lock if no process holds arrays on the segment and it was read
        since it was last sent (or waited unread for ``max_age`` seconds); the caller unlocks."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        state, _, sent_at = _FIELDS.unpack_from(self.map, 0)
        if state != _SENT or now - sent_at > max_age:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # an export still alive: unmapped when it dies
            self.map.close()
        os.close(self.fd)


class _Seal:
    """The memory of a root array of :meth:`SharedMemoryPlane.empty`, lent by its segment.

    numpy lets ``flags.writeable = True`` back on an array only if the object at the end of its
    base chain exports a writable buffer; this one exports none (numpy takes the memory from
    ``__array_interface__``), so once the hand-over has made the root array read-only, neither it
    nor any view of it can be made writable again. :meth:`seal` also marks the interface
    read-only, so that no new array made from this object can write either.
    """

    __slots__ = ("__array_interface__", "_mapped")

    def __init__(self, segment: _Segment, dtype: Any, count: int) -> None:
        # Holds an export of the segment's map: it stays mapped while any array on it lives.
        self._mapped = memoryview(segment.map).toreadonly()
        self.__array_interface__: dict[str, Any] = {
            "version": 3, "shape": (count,), "typestr": dtype.str, "data": (segment.address + _HEADER, False),
        }

    def seal(self) -> None:
        self.__array_interface__ = {**self.__array_interface__, "data": (self.__array_interface__["data"][0], True)}


class _Mapping:
    """A peer's segment (or one of ours, sent back) as this process reads it: read-only."""

    __slots__ = ("address", "fd", "holds", "map", "name", "size")

    def __init__(self, name: str, fd: int, memory: mmap.mmap, size: int, address: int) -> None:
        self.name = name
        self.fd = fd
        self.map = memory
        self.size = size
        self.address = address
        self.holds = 0  # arrays on it alive in this process (while > 0, a shared flock is held)

    def close(self) -> bool:
        try:
            self.map.close()
        except BufferError:  # the last array's memory export is not released yet
            return False
        os.close(self.fd)
        return True


class SharedMemoryPlane:
    """One pool's shared-memory directory, as seen by one process: the segments it writes, and
    its mappings of the segments it has read.

    Args:
        directory: the pool's private directory on tmpfs.
        threshold: arrays of at least this many bytes go through it.
        max_age: seconds a sent segment waits to be read before its writer reuses it; a reader
            that comes later gets :class:`ValueError`.
    """

    def __init__(self, directory: str, threshold: int = DEFAULT_THRESHOLD, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.directory = directory
        self.threshold = threshold
        self.max_age = max_age
        self._segments: list[_Segment] = []
        self._mappings: dict[str, _Mapping] = {}  # least recently used first
        self._held = 0  # mappings with arrays on them (holds > 0)
        self._pid = os.getpid()
        self._lock = threading.RLock()  # threads encode and decode; a finalizer may run inside

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
            if match is None or process_exists(int(match.group(1))):
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

    def bytes_on_disk(self) -> int:
        """Bytes of every segment in the pool's directory now (all its processes' segments)."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def environment(self) -> dict[str, str]:
        return {DIRECTORY_ENV: self.directory, THRESHOLD_ENV: str(self.threshold)}

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked child: its parent's segments and locks are not its own
            self._segments, self._mappings, self._held, self._pid = [], {}, 0, os.getpid()

    # ---- sending ----
    def write(self, array: Any) -> tuple[str, int, int]:
        """Put an array (C order) in a segment, marked sent; return the segment's name, its
        generation and the array's offset in it. An array of :meth:`empty` is handed over as it
        is (see the module docstring), and so is an array this process received (or a
        contiguous view of one); any other is copied into a free segment of this process.

        Raises:
            OSError: tmpfs is full (``ENOSPC``) or the directory is gone.
        """
        import numpy

        with self._lock:
            self._check_process()
            forwarded = self._hand_over(array) or self._forward(array)
            if forwarded is not None:
                return forwarded
            segment = self._take(array.nbytes)
            try:
                target = numpy.frombuffer(segment.map, dtype=array.dtype, count=array.size, offset=_HEADER)
                numpy.copyto(target.reshape(array.shape), array, casting="no")
                del target  # no export may outlive this call (close() unmaps)
                generation = _FIELDS.unpack_from(segment.map, 0)[1] + 1
                _FIELDS.pack_into(segment.map, 0, _SENT, generation, time.time())
            finally:
                fcntl.flock(segment.fd, fcntl.LOCK_UN)
            return segment.name, generation, 0

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A new writable C-order array on a free segment of this process (its contents are
        whatever the segment held: fill all of it), lent until it and every view of it are gone.
        ``shape`` and ``dtype`` are checked by the caller (see :func:`empty`).

        Raises:
            OSError: tmpfs is full (``ENOSPC``) or the directory is gone.
        """
        import numpy

        count = math.prod(shape)
        with self._lock:
            self._check_process()
            segment = self._take(count * dtype.itemsize)
            try:
                # A new generation now: a stale reference to what the segment held is refused.
                generation = _FIELDS.unpack_from(segment.map, 0)[1] + 1
                _FIELDS.pack_into(segment.map, 0, 0, generation, 0.0)
            finally:
                fcntl.flock(segment.fd, fcntl.LOCK_UN)
            root = numpy.asarray(_Seal(segment, dtype, count))
            segment.lent = weakref.ref(root)
        weakref.finalize(root, self._returned, segment).atexit = False
        # The caller gets a view: every later view's base is ``root`` too (numpy collapses bases),
        # so root's reference count tells whether views other than the caller's are alive.
        return root.reshape(shape)

    def _hand_over(self, array: Any) -> tuple[str, int, int] | None:
        """Send an array of :meth:`empty` as it is, made read-only (with its root, so that no
        view made later can write either); ``None`` for any other array, or for one of which
        other writable views are alive (the caller copies it)."""
        if array.base is None or not array.flags.c_contiguous:
            return None
        for segment in self._segments:  # (no name is bound to the root here: it would count as a view)
            if segment.root() is not array.base:
                continue
            if array.base.flags.writeable:
                # Other views of it could write it later (and where counts cannot tell, assume so).
                if not holders.TRUSTED or _base_references(array) > _alone():
                    return None
                array.base.flags.writeable = False
                array.flags.writeable = False
                array.base.base.seal()
            generation = _FIELDS.unpack_from(segment.map, 0)[1]
            _FIELDS.pack_into(segment.map, 0, _SENT, generation, time.time())
            start = array.__array_interface__["data"][0]
            return segment.name, generation, start - segment.address - _HEADER
        return None

    def _returned(self, segment: _Segment) -> None:
        with self._lock:
            segment.lent = None

    def _forward(self, array: Any) -> tuple[str, int, int] | None:
        if not array.flags.c_contiguous:
            return None
        start = array.__array_interface__["data"][0]
        for mapping in self._mappings.values():
            if mapping.holds and mapping.address + _HEADER <= start and start + array.nbytes <= mapping.address + mapping.size:
                # We hold it (shared lock), so its writer cannot be reusing it: mark it sent
                # again, so that it is not reused before the next reader locks it either.
                generation = _FIELDS.unpack_from(mapping.map, 0)[1]
                os.pwrite(mapping.fd, _FIELDS.pack(_SENT, generation, time.time()), 0)
                return mapping.name, generation, start - mapping.address - _HEADER
        return None

    def _take(self, nbytes: int) -> _Segment:
        """A segment of at least ``nbytes``, exclusively locked: the smallest reusable one, or a new one."""
        now = time.time()
        chosen: _Segment | None = None
        for segment in sorted(self._segments, key=lambda s: s.capacity):
            if segment.capacity >= nbytes and segment.root() is None and segment.lock_if_reusable(now, self.max_age):
                chosen = segment
                break
        if chosen is None:
            chosen = self._new_segment(_capacity(nbytes))
        if self._unlent_bytes() > FREE_BYTES_KEPT:
            self._trim(chosen, now)
        return chosen

    def _new_segment(self, capacity: int) -> _Segment:
        name = f"{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = _HEADER + capacity
            os.ftruncate(fd, size)
            # Allocate the pages and map them now, so that writes do not fault page by page.
            os.posix_fallocate(fd, 0, size)
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        segment = _Segment(name, capacity, fd, memory)
        self._segments.append(segment)
        return segment

    def _trim(self, keep: _Segment, now: float) -> None:
        """Remove reusable segments, largest first, until at most FREE_BYTES_KEPT are left
        (buffers the program holds, from :meth:`empty`, do not count: they are not free)."""
        total = self._unlent_bytes()
        for segment in sorted(self._segments, key=lambda s: s.capacity, reverse=True):
            if total <= FREE_BYTES_KEPT:
                break
            if segment is not keep and segment.root() is None and segment.lock_if_reusable(now, self.max_age):
                self._drop(segment)
                total -= segment.capacity

    def _unlent_bytes(self) -> int:
        return sum(s.capacity for s in self._segments if s.root() is None)

    def _drop(self, segment: _Segment) -> None:
        self._segments.remove(segment)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, segment.name))
        segment.close()

    # ---- receiving ----
    def read(self, name: str, generation: int, offset: int, dtype: Any, shape: list[int]) -> Any:
        """The array a peer sent: a read-only view on its segment (a copy past ``MAX_HELD``
        segments held); the segment is lent until the array and every view of it are gone.

        Raises:
            ValueError: a malformed name (never a path outside the directory), a segment that is
                gone or was taken back (read after ``max_age``), or a size that does not fit.
        """
        import numpy

        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"malformed shared-memory name {name!r}")
        count = 1
        for extent in shape:
            count *= extent
        nbytes = count * dtype.itemsize
        with self._lock:
            self._check_process()
            mapping = self._mapping(name)
            if offset < 0 or _HEADER + offset + nbytes > mapping.size:
                raise ValueError(f"shared-memory segment {name!r} holds {mapping.size - _HEADER} bytes, not {offset + nbytes}")
            if not mapping.holds:
                fcntl.flock(mapping.fd, fcntl.LOCK_SH)  # its writer holds the exclusive lock only to write
            if _FIELDS.unpack_from(mapping.map, 0)[1] != generation:
                if not mapping.holds:
                    fcntl.flock(mapping.fd, fcntl.LOCK_UN)
                raise ValueError(
                    f"shared-memory segment {name!r} was taken back by its writer (not read within {self.max_age:g} s?)"
                )
            os.pwrite(mapping.fd, struct.pack("<Q", _READ), 0)
            mapping.holds += 1
            self._held += mapping.holds == 1
            root = numpy.frombuffer(mapping.map, dtype=dtype, count=count, offset=_HEADER + offset)
            if self._held > MAX_HELD:
                array = root.reshape(shape).copy()  # too many descriptors held: a copy instead
                self._let_go(mapping)
                return array
        # Let go with the root array: every view of it keeps it alive (numpy collapses a view's
        # base only as far as the first array whose base is not an array: this one).
        weakref.finalize(root, self._let_go, mapping).atexit = False
        return root.reshape(shape)

    def _mapping(self, name: str) -> _Mapping:
        mapping = self._mappings.pop(name, None)
        if mapping is None:
            self._evict()
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDWR)
            except FileNotFoundError:
                raise ValueError(f"shared-memory segment {name!r} is gone (its writer exited?)") from None
            try:
                size = os.fstat(fd).st_size
                memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except BaseException:
                os.close(fd)
                raise
            import numpy

            address = numpy.frombuffer(memory, numpy.uint8, 1).__array_interface__["data"][0]
            mapping = _Mapping(name, fd, memory, size, address)
        self._mappings[name] = mapping  # most recently used last
        return mapping

    def _evict(self) -> None:
        """Unmap segments no array is on: those removed by their writer, then the least recently
        used past MAPPINGS_KEPT bytes."""
        idle = [m for m in self._mappings.values() if not m.holds]
        kept = sum(m.size for m in idle)
        for mapping in idle:
            removed = os.fstat(mapping.fd).st_nlink == 0
            if (removed or kept > MAPPINGS_KEPT) and mapping.close():
                del self._mappings[mapping.name]
                kept -= mapping.size

    def _let_go(self, mapping: _Mapping) -> None:
        with self._lock:
            if self._pid != os.getpid():  # a forked child's copy: the lock is its parent's
                return
            mapping.holds -= 1
            if not mapping.holds:
                self._held -= 1
                with contextlib.suppress(OSError):  # closed with the plane
                    fcntl.flock(mapping.fd, fcntl.LOCK_UN)

    # ---- housekeeping ----
    def close(self) -> None:
        """Remove this process's segments and unmap what it read (arrays it still holds keep
        their pages until they are gone)."""
        with self._lock:
            for segment in list(self._segments):
                self._drop(segment)
            for mapping in list(self._mappings.values()):
                if not mapping.holds and mapping.close():
                    del self._mappings[mapping.name]

    def sweep(self) -> int:
        """Remove segments whose writer process is gone; return how many."""
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _NAME.match(entry.name)
                if match is None or int(match.group(1)) == os.getpid() or process_exists(int(match.group(1))):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def remove_files_of(self, pid: int) -> None:
        """Remove the segments of process ``pid`` (a worker that exited); the mappings of their
        readers stay valid until they let go."""
        prefix = f"{pid}-"
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and _NAME.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def segment_count(self) -> int:
        """How many segments this process has written (for tests and metrics)."""
        return len(self._segments)


#: The plane used when a codec call is not given one: set once by a worker process at start-up.
default_plane: SharedMemoryPlane | None = None


def _base_references(array: Any) -> int:
    """References to ``array.base`` (a root array: every view of it holds one); only where
    ``holders.TRUSTED``."""
    return holders.count(array.base)


@functools.cache
def _alone() -> int:
    """What :func:`_base_references` counts for an array that is its root's only view: measured,
    not assumed, as interpreters count a call's own references differently (3.14 borrows some)."""
    import numpy

    return _base_references(numpy.frombuffer(bytearray(8), numpy.uint8).reshape(8))


def _extents(shape: Any) -> tuple[int, ...] | None:
    """``shape`` as a tuple of ints >= 0 (numpy's integers count, bools do not), or ``None``."""
    if isinstance(shape, (str, bytes)):
        return None
    try:
        operator.index(shape)
        items = [shape]
    except TypeError:
        try:
            items = list(shape)
        except TypeError:
            return None
    try:
        extents = tuple(operator.index(n) for n in items)
    except TypeError:
        return None
    if any(isinstance(n, bool) for n in items) or any(n < 0 for n in extents):
        return None
    return extents


def empty(plane: SharedMemoryPlane | None, shape: Any, dtype: Any = float) -> Any:
    """A new writable numpy array to fill and send without a copy (``pool.empty``, ``ctx.empty``):
    on a segment of ``plane`` when it has one and the array reaches its threshold, else a plain
    ``numpy.empty`` (it travels in-band, copied, like any array). Its contents are arbitrary.

    Args:
        shape: an int or a sequence of ints >= 0, as for ``numpy.empty``.
        dtype: anything ``numpy.dtype`` takes, neither object nor structured (they cannot travel).

    Raises:
        InvalidArgumentError: ``shape`` or ``dtype`` is not one of those.
        OSError: tmpfs is full (``ENOSPC``).
    """
    import numpy

    extents = _extents(shape)
    if extents is None:
        raise InvalidArgumentError(f"shape must be an int or a sequence of ints >= 0, not {shape!r:.80}")
    try:
        kind = numpy.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"dtype {dtype!r:.80} is not a numpy dtype: {exc}") from None
    if kind.hasobject or kind.fields is not None or kind.subdtype is not None:
        raise InvalidArgumentError(f"dtype {kind} cannot travel (object or structured); use a plain numeric, bool, str or datetime dtype")
    nbytes = math.prod(extents) * kind.itemsize
    if nbytes > sys.maxsize:
        raise InvalidArgumentError(f"an array of shape {extents} and dtype {kind} would take {nbytes} bytes: more than any machine has")
    if plane is None or nbytes < max(plane.threshold, 1):
        return numpy.empty(extents, kind)
    return plane.empty(extents, kind)
