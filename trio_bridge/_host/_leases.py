"""Leases a host keeps while it works: an optimization lock (``Session.optimizing``) and an
idempotent call's claim, each renewed until its holder is done, so it lapses only if the host
dies (or cannot reach the backend for longer than the lease)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio

from trio_bridge._errors import TrioBridgeError

_RETRIES_PER_LEASE = 30  # a failed renewal is tried again after this fraction of the lease


async def keep_renewed(renew: Callable[[], Awaitable[bool]], lease: float) -> None:
    """Call ``renew()`` a third of ``lease`` seconds after the last renewal that took (the
    lease was taken just before), until cancelled, or until it returns ``False`` (the lease
    was lost: another holder has it). An attempt that raises a :class:`TrioBridgeError`, or
    takes over a sixth of the lease (a slow backend), is given up and tried again soon, so a
    slow command cannot let the lease lapse while there is time to retry."""
    renewed = trio.current_time()
    while True:
        await trio.sleep_until(renewed + lease / 3)
        attempt = trio.current_time()
        held: bool | None = None
        with trio.move_on_after(lease / 6), contextlib.suppress(TrioBridgeError):
            held = await renew()
        if held is None:  # failed or too slow: again soon
            await trio.sleep(lease / _RETRIES_PER_LEASE)
        elif held:
            renewed = attempt  # the backend ran it no earlier: the new lease lasts at least this long
        else:
            return
