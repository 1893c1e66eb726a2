"""Whether anything but its keeper still holds an object, told by its reference count.

Two places reuse memory only once nobody else can reach it: :mod:`buffers` (a kept buffer is
free again once nothing made of it is left) and :mod:`shared_memory` (a buffer of ``empty`` is
handed over without a copy only if no other view of it is alive). Both compare :func:`count` of
the object with a count taken, through the same expression, when only its keeper held it: each
interpreter counts a call's own references differently (3.14 borrows some), so the baseline is
measured, never assumed.

Only where :data:`TRUSTED`: on a build without the GIL another thread may take or drop a
reference between the count and the reuse, and some interpreters (PyPy) have no
``sys.getrefcount``. Where it is False, the callers assume someone else holds the object: the
hand-over copies, and buffers are not reused.
"""

from __future__ import annotations

import sys

__all__ = ["TRUSTED", "count"]


def _trusted() -> bool:
    return hasattr(sys, "getrefcount") and bool(getattr(sys, "_is_gil_enabled", lambda: True)())


#: Whether :func:`count` tells who holds an object in this interpreter (read at each use).
TRUSTED = _trusted()


def count(obj: object) -> int:
    """``obj``'s references as counted from inside this call: compare it only with another
    :func:`count` of an object held the same way. Call it only where :data:`TRUSTED`."""
    return sys.getrefcount(obj)
