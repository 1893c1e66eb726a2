"""A session's "call any Python" methods (for the ``PythonAdapter``): calls of dotted paths in
the session's worker, and the objects they store there."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

from trio_bridge._errors import InvalidArgumentError, StoredObjectLostError, ToolError, describe_exit

if TYPE_CHECKING:
    from trio_bridge._host._dispatch import Affinity
    from trio_bridge._host._router import Route


class PythonCallsOf(Protocol):
    """What these calls need of the pool: calls along a route."""

    async def execute(
        self, tool: str, arguments: dict[str, Any] | None, route: Route | None = None, affinity: Affinity | None = None,
        *, idempotency_key: str | None = None,
    ) -> Any: ...


class PythonCalls:
    """The "call any Python" part of :class:`Session` (a base of it): every call goes to the
    session's worker only (affinity ``"strict"``), since that is where its objects live. Which
    worker keeps which stored object is recorded on the session's route, so that a call that
    misses one kept by a worker that died says so (``StoredObjectLostError``)."""

    id: str
    _calls: PythonCallsOf
    _route: Route

    async def call(
        self, target: str, *args: Any, store_as: str | None = None, idempotency_key: str | None = None, **kwargs: Any,
    ) -> Any:
        """Call (or read) ``target`` in this session's worker: a dotted path in an allowed module,
        or ``"stored.NAME[.method]"``. With ``store_as``, keep the result there under that name
        and return ``{"stored": name, "type": ...}``. Calls go to the session's worker only
        (affinity ``"strict"``), since that is where its objects live. With
        ``idempotency_key``, at most once to completion for that key (see :meth:`Pool.execute`);
        not with ``store_as``: the stored object lives in one worker's memory, and a record
        could hold only its description, not the object.

        Raises:
            InvalidArgumentError: ``idempotency_key`` with ``store_as``; nothing ran.
            StoredObjectLostError: a stored object it needs went away with its worker.
            NotAllowedError: the call reaches a module outside the allowlist (the message names it).
            ToolError: the call raised.
            IdempotencyConflictError: ``idempotency_key`` was used for another call.
        """
        if store_as is not None and idempotency_key is not None:
            raise InvalidArgumentError(
                f"call({target!r}, store_as={store_as!r}) cannot take an idempotency_key: the stored object lives in "
                "one worker's memory, and a record of the call could not hold it: call without idempotency_key"
            )
        step = {"target": target, "args": list(args), "kwargs": kwargs, "store_as": store_as}
        return await self._python("call", step, [store_as] if store_as else [], idempotency_key)

    async def pipeline(self, steps: list[dict[str, Any]]) -> list[Any]:
        """Run several steps in one round trip: each ``{"call": target, "args": [...],
        "kwargs": {...}, "store_as": name}``; later steps may use what earlier ones stored."""
        return await self._python("pipeline", {"steps": steps}, [s["store_as"] for s in steps if s.get("store_as")])

    async def retrieve(self, name: str) -> Any:
        """A stored object's value (when it can be encoded)."""
        return await self._python("retrieve", {"name": name}, [])

    async def list_stored(self) -> dict[str, str]:
        """This session's stored objects: name -> type."""
        return await self._python("list_stored", {}, [])

    async def delete_stored(self, name: str) -> bool:
        """Drop a stored object; ``False`` if there was none of that name."""
        self._route.pinned.pop(name, None)
        return await self._python("delete_stored", {"name": name}, [])

    async def _python(self, tool: str, arguments: dict[str, Any], storing: list[str], idempotency_key: str | None = None) -> Any:
        try:
            result = await self._calls.execute(tool, arguments, self._route, affinity="strict", idempotency_key=idempotency_key)
        except ToolError as exc:
            if exc.remote_type == "StoredObjectNotFoundError":
                _raise_if_lost(self.id, self._route, exc)
            raise
        for name in storing:
            assert self._route.home is not None
            self._route.pinned[name] = self._route.home
        return result


def _raise_if_lost(session_id: str, route: Route, exc: ToolError) -> None:
    """Raise StoredObjectLostError if the object ``exc`` misses was kept by a worker that is gone."""
    match = re.search(r"named '(\w+)'", exc.remote_message)
    pinned = route.pinned
    keeper = pinned.get(match.group(1)) if match else None
    if keeper is not None and keeper is not route.home:
        lost = sorted(n for n, w in pinned.items() if w is keeper)
        for name in lost:
            del pinned[name]
        exit_code = keeper.lifecycle.exit_code
        died = "stopped" if exit_code is None else describe_exit(exit_code)
        raise StoredObjectLostError(
            f"stored object(s) {', '.join(map(repr, lost))} of session {session_id} were kept by worker "
            f"{keeper.id}, which is gone ({died}); objects stored in a worker do not survive it: "
            "create them again"
        ) from exc
