"""Big buffers of in-band messages, reused once nothing refers to them any more.

A 100 MB array sent in-band to a worker and returned lands in fresh memory four times: the
host's snapshot of the argument (the codec's), the worker's buffer for the request, the
worker's snapshot of the result, the host's buffer for the reply; and the kernel zeroes every
fresh page on first touch, as much CPU as copying it (perf: ``clear_page_erms`` was ~20 % of
each side's CPU time for a 100 MB round trip over TCP to a remote worker, more over TLS).
:func:`empty` hands out such buffers from a few kept ones (numpy's memory: huge pages) whenever
one is free, and new ones otherwise.

Free means that nothing but this module refers to the buffer: everything made of one (the
``empty`` result, a slice, a memoryview, an array over a memoryview, a numpy view) holds a
reference to it, so the reference count of the kept buffer is back at what it was when nobody
else had it exactly when no such thing is left, and then nothing can reach its bytes any more
(only ``bytes`` copies of it, which are other memory). A caller therefore never sees a buffer
change under it. Where counts cannot be trusted (:mod:`holders`: no GIL, no
``sys.getrefcount``) nothing is reused.

What is kept: at most :data:`KEEP_BYTES` in all (the least recently used free buffer goes
first; buffers still in use are forgotten, not freed, when more is needed); a free buffer
unused for :data:`IDLE_S` seconds is released at the next :func:`empty` or :func:`trim_idle`:
a worker's asyncio loop that received a big message calls it by a timer, and the host's pool
(whose call streams run in Trio's thread, without an asyncio loop) every ``IDLE_S / 2``
seconds; the last pool of the process to close lets go of all of them (:func:`pool_closed`).
:data:`KEEP_ENV` sets the first (bytes; ``0``: keep none).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from trio_bridge._wire import holders

__all__ = [
    "IDLE_S", "KEEP_BYTES", "KEEP_ENV", "MIN_BYTES", "empty", "forget", "kept_bytes", "pool_closed", "pool_opened", "trim_idle",
]

KEEP_ENV = "TRIO_BRIDGE_BUFFER_CACHE"
MIN_BYTES = 1 << 20  # a smaller buffer is not worth keeping: malloc reuses its memory itself
IDLE_S = 30.0
# A buffer the caller keeps (a big reply's buffer becomes the result array's memory) pins all
# of it: so a new one is rounded up by at most 1/16 of its size (a fit for messages of nearby
# sizes), and a kept one serves a message only if at most 1/8 of it is left over.
_FIT_SHIFT = 3


def _allocation(size: int) -> int:
    """Bytes to allocate for a message of ``size``: rounded up to 1/16 of its power of two."""
    step = max(1 << 16, (1 << (size.bit_length() - 1)) >> 4)
    return -(-size // step) * step


def _keep_bytes() -> int:
    text = os.environ.get(KEEP_ENV, "").strip()
    try:
        return max(int(text), 0) if text else 256 << 20
    except ValueError:
        return 256 << 20


#: the most bytes kept (free or in use) by this process; read from :data:`KEEP_ENV` at import
KEEP_BYTES = _keep_bytes()


class _Kept:
    """One kept buffer: ``refs`` is ``holders.count(kept.buffer)`` while only the cache holds it."""

    __slots__ = ("buffer", "refs", "used")

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.refs = 0
        self.used = time.monotonic()

    def settle(self) -> None:
        """Count the references now, when only the cache holds the buffer (its maker's are gone)."""
        self.refs = holders.count(self.buffer)  # the same expression as in free()

    def free(self) -> bool:
        return holders.TRUSTED and holders.count(self.buffer) == self.refs


_lock = threading.Lock()
_kept: list[_Kept] = []
_timer: asyncio.TimerHandle | None = None  # the pending _timed_trim, on _timer_loop
_timer_loop: asyncio.AbstractEventLoop | None = None


def empty(size: int) -> Any:
    """A writable numpy ``uint8`` array of ``size`` bytes (contents undefined; aligned as
    numpy's own): a kept buffer's start when one of at least ``size`` and at most ``size``
    plus an eighth is free, else new memory of at most ``size`` plus a sixteenth (kept for
    later when it is big enough). Either way its memory is at most 1.125 times ``size``."""
    import numpy

    if size < MIN_BYTES or not holders.TRUSTED or KEEP_BYTES < size:
        return numpy.empty(size, dtype=numpy.uint8)
    now = time.monotonic()
    with _lock:
        best = None
        for kept in _kept:
            capacity = len(kept.buffer)
            close_fit = size <= capacity <= size + (size >> _FIT_SHIFT)
            if close_fit and kept.free() and (best is None or capacity < len(best.buffer)):
                best = kept
        if best is None:
            _kept.append(_Kept(numpy.empty(_allocation(size), dtype=numpy.uint8)))
            best = _kept[-1]
            best.settle()
        best.used = now
        view = best.buffer[:size]
        _trim(now)
        _arm_timer()
        return view


def _arm_timer() -> None:
    """Have the running asyncio loop, if any, release idle buffers in ``IDLE_S`` (one timer at
    a time; a new one when the loop it was on no longer runs). Called with the lock held."""
    global _timer, _timer_loop
    if _timer is not None and _timer_loop is not None and _timer_loop.is_running():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # a thread without a loop (Trio's, a tool's): the next receive arms it
        return
    _timer, _timer_loop = loop.call_later(IDLE_S, _timed_trim), loop


def _timed_trim() -> None:
    global _timer
    with _lock:
        _timer = None
        _trim(time.monotonic())
        if _kept:
            _arm_timer()


def trim_idle() -> None:
    """Release the free buffers unused for :data:`IDLE_S` seconds (and the least recently used
    past :data:`KEEP_BYTES`): for a thread without an asyncio loop to call now and then."""
    with _lock:
        _trim(time.monotonic())


def _trim(now: float) -> None:
    """Forget free buffers idle for ``IDLE_S``, then the least recently used ones (free first)
    while more than ``KEEP_BYTES`` are kept. Called with the lock held."""
    _kept[:] = [kept for kept in _kept if not (now - kept.used > IDLE_S and kept.free())]
    total = sum(len(kept.buffer) for kept in _kept)
    while total > KEEP_BYTES:
        free = [kept for kept in _kept if kept.free()]
        victim = min(free or _kept, key=lambda kept: kept.used)
        _kept.remove(victim)
        total -= len(victim.buffer)


def kept_bytes() -> tuple[int, int]:
    """(bytes kept, of which free)."""
    with _lock:
        return sum(len(k.buffer) for k in _kept), sum(len(k.buffer) for k in _kept if k.free())


def forget() -> None:
    """Keep nothing any more, free or not (buffers in use stay valid: their users hold them, and
    their memory goes when they let go)."""
    with _lock:
        _kept.clear()


_pools_open = 0  # pools of this process not yet closed (pool_opened / pool_closed)


def pool_opened() -> None:
    """A pool of this process opened (its receive buffers come from here)."""
    global _pools_open
    with _lock:
        _pools_open += 1


def pool_closed() -> None:
    """A pool of this process closed: the last one to close lets go of every kept buffer
    (:func:`forget`); while others are open, they keep reusing them."""
    global _pools_open
    with _lock:
        _pools_open -= 1
        if _pools_open <= 0:
            _pools_open = 0
            _kept.clear()
