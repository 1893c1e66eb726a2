"""The exception-group policy of the pool's async context managers.

Trio raises ``BaseExceptionGroup`` from nurseries. Users of ``open_pool``, ``Pool.stream`` and
``Pool.session`` should get back the exception *their own block* raised, not a group made by the
pool's background tasks, and should never lose an error by our unwrapping a group that holds
several (trio's docs, "Designing for multiple errors"; trio-websocket's ``open_websocket``).

So each of those blocks is run under :class:`UserErrorTracker`: the exception leaving the user's
block is remembered; if a group arrives, the user's exception is raised, with whatever else the
group held attached as its ``__context__`` (shown as "During handling of the above exception").
A group without the user's exception holds only internal failures: if it is exactly one
:class:`TrioBridgeError` that the pool raises on purpose (a worker that could not start), or a
``SystemExit`` or ``KeyboardInterrupt`` (user code the host ran, a host tool, stops the
program), that error is raised; anything else is raised as :class:`PoolInternalError` with the
group as cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from trio_bridge._core.failures import STOPS_PROGRAM
from trio_bridge._errors import PoolInternalError, TrioBridgeError


class UserErrorTracker:
    """Remembers the exception raised by the user's block (see the module doc)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @contextmanager
    def user_block(self) -> Iterator[None]:
        """Wrap the ``yield`` to the user's block."""
        try:
            yield
        except BaseException as exc:
            self.error = exc
            raise

    @contextmanager
    def resolve_groups(self) -> Iterator[None]:
        """Wrap the nurseries: turn a group leaving them into the one exception to raise."""
        try:
            yield
        except BaseExceptionGroup as group:
            error, context = self._resolve(group)
        else:
            return
        try:
            raise error
        finally:
            # Raising here, inside the group's handling, set __context__ to the group: undo that.
            error.__context__ = context
            del error, context

    def _resolve(self, group: BaseExceptionGroup[BaseException]) -> tuple[BaseException, BaseException | None]:
        """The exception to raise, and the ``__context__`` it should carry."""
        user = self.error
        if user is not None and _contains(group, user):
            mine = {id(exc) for exc in _leaves(user)}
            _, rest = group.split(lambda exc: id(exc) in mine and not isinstance(exc, BaseExceptionGroup))
            rest = _without_cancelled(rest)
            if rest is None:
                return user, user.__context__
            if rest.__context__ is None:
                rest.__context__ = user.__context__
            return user, rest
        leaves = list(_leaves(group))
        failures = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
        if not failures:
            return leaves[0], leaves[0].__context__  # only Cancelled: let it reach its scope
        if len(failures) == 1 and isinstance(failures[0], (TrioBridgeError, *STOPS_PROGRAM)):  # (a host tool's sys.exit())
            return failures[0], failures[0].__context__
        internal = PoolInternalError(
            f"{len(failures)} of the pool's background tasks failed; see the attached group"
        )
        internal.__cause__ = group
        return internal, None


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _contains(group: BaseExceptionGroup[BaseException], target: BaseException) -> bool:
    """``target`` is in ``group``: a leaf of it, or a group (the user's block may raise one,
    e.g. from its own nursery) whose leaves all are -- nurseries re-derive groups on the way
    out, so a group is recognized by its leaves, not by identity."""
    leaves = {id(exc) for exc in _leaves(group)}
    return all(id(exc) in leaves for exc in _leaves(target))


def _without_cancelled(group: BaseExceptionGroup[BaseException] | None) -> BaseExceptionGroup[BaseException] | None:
    if group is None:
        return None
    _, rest = group.split(trio.Cancelled)
    return rest
