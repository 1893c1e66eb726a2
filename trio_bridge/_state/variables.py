"""Typed, versioned variables of one session (pure, synchronous, sans-IO).

Each operation either changes the store and returns what changed (as :class:`VariableUpdate`
records, which the async backend hands to watchers), or raises and changes nothing.

Everything stored can be encoded (:mod:`trio_bridge._wire.codec`): values are normalized by their
type and checked with ``codec.check``; metadata must be a dict with str keys that the codec can
encode, and is stored in its wire form (a deep copy: tuples become lists, numpy scalars Python
scalars), so a later change to the caller's objects cannot make it unencodable.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from trio_bridge._errors import (
    DependencyCycleError,
    EncodeError,
    InvalidArgumentError,
    InvalidVariableError,
    QuotaExceededError,
    TrioBridgeError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from trio_bridge._state.types import VariableType, check_constraints, check_value, values_equal
from trio_bridge._util import public_module
from trio_bridge._wire import codec
from trio_bridge._wire.codec import short_repr as _r

__all__ = ["HistoryEntry", "UpdateKind", "Variable", "VariableStore", "VariableType", "VariableUpdate"]

#: ``VariableUpdate.kind``: the value when watching began, a change, or the deletion.
UpdateKind = Literal["initial", "change", "delete"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch: no trailing "\n"


@public_module
@dataclass(frozen=True)
class Variable:
    """A snapshot of one variable.

    Attributes:
        id: stable id, unique in its session (``"var_12"``); get and set accept it instead of the name.
        name: the name.
        type: one of ``float, integer, string, boolean, choice, module, embedding, tensor``.
        value: the current value.
        constraints: the normalized constraints.
        metadata: free-form metadata given at registration or with a write.
        version: 0 at registration, +1 per change.
        created_at, updated_at: wall-clock times (seconds since the epoch).
        source: who made the last change, e.g. ``"host"`` or ``"worker:w2"``.
        optimizer_id: the holder of the optimization lock, or ``None``.
        depends_on: names of the variables this one depends on.
    """

    id: str
    name: str
    type: VariableType
    value: Any
    constraints: Mapping[str, Any]
    metadata: Mapping[str, Any]
    version: int
    created_at: float
    updated_at: float
    source: str = "host"
    optimizer_id: str | None = None
    depends_on: tuple[str, ...] = ()

    @property
    def optimizing(self) -> bool:
        return self.optimizer_id is not None


@public_module
@dataclass(frozen=True)
class HistoryEntry:
    """One past value of a variable: the value it had at ``version``."""

    version: int
    value: Any
    updated_at: float
    source: str


@public_module
@dataclass(frozen=True)
class VariableUpdate:
    """One notification from :meth:`StateBackend.watch`.

    Attributes:
        kind: ``"initial"`` (the value when watching began), ``"change"`` or ``"delete"``.
        coalesced: how many earlier updates of this variable were folded into this one because
            the watcher was slower than the writers (0 when it kept up).
    """

    name: str
    old_value: Any
    new_value: Any
    version: int
    source: str
    kind: UpdateKind
    timestamp: float
    coalesced: int = 0


@dataclass(slots=True)
class _Slot:
    variable: Variable
    # A list, not a deque(maxlen=): an empty deque costs ~600 bytes, and a host may keep
    # 100,000 variables; trimming the front of at most history_limit entries is cheap.
    history: list[HistoryEntry] = field(default_factory=list)
    lease_until: float | None = None  # when the optimization lock lapses (wall clock); None: held until released

    def remember(self, entry: HistoryEntry, limit: int) -> None:
        self.history.append(entry)
        if len(self.history) > limit:
            del self.history[: len(self.history) - limit]


class VariableStore:
    """The variables of one session.

    Args:
        max_variables: how many variables it may hold (``QuotaExceededError`` beyond).
        max_value_bytes: the largest encoded value accepted, in bytes.
        history_limit: how many past values each variable keeps (oldest dropped first).
        clock: wall-clock source for timestamps.
    """

    def __init__(
        self,
        *,
        max_variables: int = 1000,
        max_value_bytes: int = 64 * 2**20,
        history_limit: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_variables = max_variables
        self.max_value_bytes = max_value_bytes
        self.history_limit = history_limit
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._by_id: dict[str, str] = {}
        self._depends_on: dict[str, set[str]] = {}
        self.next_id: int = 1  # the number of the next variable's id

    # ---- as records (what a shared backend stores) ----
    def records(self) -> dict[str, dict[str, Any]]:
        """Every variable as a plain record the codec can encode (history and lock lease
        included), by name. :meth:`from_records` makes the same store again."""
        return {name: _record(slot) for name, slot in self._slots.items()}

    @classmethod
    def from_records(
        cls, records: Iterable[Mapping[str, Any]], *, next_id: int, max_variables: int = 1000,
        max_value_bytes: int = 64 * 2**20, history_limit: int = 50, clock: Callable[[], float] = time.time,
    ) -> VariableStore:
        """The store whose :meth:`records` these were (``next_id``: its :attr:`next_id`)."""
        store = cls(max_variables=max_variables, max_value_bytes=max_value_bytes, history_limit=history_limit, clock=clock)
        store.next_id = next_id
        for r in records:
            variable = Variable(
                id=r["id"], name=r["name"], type=r["type"], value=r["value"], constraints=r["constraints"],
                metadata=r["metadata"], version=r["version"], created_at=r["created_at"], updated_at=r["updated_at"],
                source=r["source"], optimizer_id=r["optimizer_id"], depends_on=tuple(r["depends_on"]),
            )
            history = [HistoryEntry(*entry) for entry in r["history"]][-history_limit:] if history_limit else []
            store._slots[variable.name] = _Slot(variable, history, r["lease_until"])
            store._by_id[variable.id] = variable.name
            if variable.depends_on:
                store._depends_on[variable.name] = set(variable.depends_on)
        return store

    def __len__(self) -> int:
        return len(self._slots)

    # ---- reads ----
    def get(self, key: str) -> Variable:
        """By name or id. Raises VariableNotFoundError."""
        return self._slot(key).variable

    def list(self, pattern: str = "*") -> list[Variable]:
        """Variables whose names match a glob ``pattern`` (``*``, ``?``, ``[...]``), sorted by name."""
        if not isinstance(pattern, str):
            raise InvalidArgumentError(f"a variable name pattern must be a str (a glob), not {type(pattern).__name__}")
        return [self._slot(name).variable for name in sorted(self._slots) if fnmatch.fnmatchcase(name, pattern)]

    def history(self, key: str) -> list[HistoryEntry]:
        """Past and current values, oldest first, at most ``history_limit`` of them."""
        return list(self._slot(key).history)

    # ---- writes ----
    def register(
        self,
        name: str,
        type_name: str,
        value: Any,
        *,
        constraints: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        source: str = "host",
    ) -> Variable:
        """Create a variable at version 0.

        Raises:
            InvalidVariableError: bad name, type, constraints, value or metadata (not a dict with
                str keys, or something in it the codec cannot encode); or the name is taken.
            QuotaExceededError: the session has ``max_variables`` already, or the value (or the
                metadata) is over ``max_value_bytes`` encoded.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidVariableError(
                f"invalid variable name {_r(name)}: use letters, digits, '_', '.', '-' "
                "(starting with a letter or '_'), at most 128 characters"
            )
        name = str(name)
        if name in self._slots:
            raise InvalidVariableError(f"a variable named {name!r} already exists in this session")
        if len(self._slots) >= self.max_variables:
            raise QuotaExceededError(f"the session already has {self.max_variables} variables (max_variables)")
        normalized = check_constraints(type_name, constraints)
        try:
            value = check_value(type_name, value, normalized)
        except InvalidVariableError as exc:
            raise InvalidVariableError(f"variable {name!r} ({type_name}): {exc}") from None
        self._check_encodable(name, value)
        self._check_size(name, value)
        stored_metadata = self._check_metadata(name, metadata)
        now = self._clock()
        variable = Variable(
            id=f"var_{self.next_id}", name=name, type=cast(VariableType, type_name), value=value, constraints=normalized,
            metadata=stored_metadata, version=0, created_at=now, updated_at=now, source=source,
        )
        slot = _Slot(variable)
        slot.remember(HistoryEntry(0, value, now, source), self.history_limit)
        self._slots[name] = slot
        self._by_id[variable.id] = name
        self.next_id += 1
        return variable

    def set(
        self,
        key: str,
        value: Any,
        *,
        expected_version: int | None = None,
        source: str = "host",
        optimizer_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[Variable, VariableUpdate | None]:
        """Set a value. Setting an equal value changes nothing (same version, no update).

        ``metadata``, if given, is merged into the variable's metadata with the change.

        Raises:
            VariableNotFoundError, QuotaExceededError,
            InvalidVariableError: the value does not fit, or ``metadata`` is not an encodable
                dict with str keys.
            VersionConflictError: ``expected_version`` is not the current version.
            VariableLockedError: an optimizer other than ``optimizer_id`` holds the lock.
        """
        slot = self._slot(key)
        value = self._validate_write(slot.variable, value, expected_version, optimizer_id)
        if metadata is not None:
            metadata = self._check_metadata(slot.variable.name, metadata)
        return self._apply(slot, value, source, metadata)

    def set_many(
        self,
        updates: Mapping[str, Any],
        *,
        atomic: bool,
        source: str = "host",
        optimizer_id: str | None = None,
    ) -> tuple[dict[str, Variable | Exception], list[VariableUpdate]]:
        """Set several variables.

        With ``atomic=True`` every value is validated first and either all are written or none
        (the first error is raised). With ``atomic=False`` each is written on its own and the
        result maps each name to its new Variable or to the error that refused it.
        """
        if not isinstance(updates, Mapping):
            raise InvalidArgumentError(f"updates must be a dict of name -> value, not {type(updates).__name__}")
        results: dict[str, Variable | Exception] = {}
        changes: list[VariableUpdate] = []
        if atomic:
            checked = []
            for key, value in updates.items():
                slot = self._slot(key)
                checked.append((slot, self._validate_write(slot.variable, value, None, optimizer_id)))
            for slot, value in checked:
                variable, change = self._apply(slot, value, source, None)
                results[variable.name] = variable
                if change:
                    changes.append(change)
            return results, changes
        for key, value in updates.items():
            try:
                variable, change = self.set(key, value, source=source, optimizer_id=optimizer_id)
            except (InvalidVariableError, VariableNotFoundError, VariableLockedError, QuotaExceededError) as exc:
                results[key] = exc
                continue
            results[key] = variable
            if change:
                changes.append(change)
        return results, changes

    def delete(self, key: str, *, source: str = "host") -> VariableUpdate:
        """Remove a variable and its dependency edges. Raises VariableNotFoundError;
        VariableLockedError while an optimizer holds it."""
        slot = self._slot(key)
        variable = slot.variable
        if variable.optimizer_id is not None:
            raise VariableLockedError(f"variable {variable.name!r} is being optimized by {variable.optimizer_id!r}")
        del self._slots[variable.name]
        del self._by_id[variable.id]
        self._depends_on.pop(variable.name, None)
        for deps in self._depends_on.values():
            deps.discard(variable.name)
        for other in self._slots.values():
            if variable.name in other.variable.depends_on:
                other.variable = replace(other.variable, depends_on=tuple(d for d in other.variable.depends_on if d != variable.name))
        return VariableUpdate(variable.name, variable.value, None, variable.version + 1, source, "delete", self._clock())

    def rollback(self, key: str, version: int, *, source: str = "host", optimizer_id: str | None = None) -> tuple[Variable, VariableUpdate | None]:
        """Set the value the variable had at ``version`` (a new version; history is kept).

        Raises:
            VariableNotFoundError: unknown variable, or ``version`` is no longer in the history.
        """
        slot = self._slot(key)
        for entry in slot.history:
            if entry.version == version:
                break
        else:
            kept = [e.version for e in slot.history]
            raise VariableNotFoundError(
                f"variable {slot.variable.name!r} has no version {version} in its history (kept: {kept[0]}..{kept[-1]})"
            )
        value = self._validate_write(slot.variable, entry.value, None, optimizer_id)
        return self._apply(slot, value, source, {"rolled_back_to": version})

    def add_dependency(self, dependent: str, dependency: str) -> Variable:
        """Record that ``dependent`` depends on ``dependency``.

        Raises:
            VariableNotFoundError: either does not exist.
            DependencyCycleError: the edge would close a cycle (including a self-dependency).
        """
        dependent_slot, dependency_slot = self._slot(dependent), self._slot(dependency)
        a, b = dependent_slot.variable.name, dependency_slot.variable.name
        if a == b or self._reaches(b, a):
            raise DependencyCycleError(f"{a!r} -> {b!r} would make a dependency cycle")
        self._depends_on.setdefault(a, set()).add(b)
        dependent_slot.variable = replace(dependent_slot.variable, depends_on=tuple(sorted(self._depends_on[a])))
        return dependent_slot.variable

    def start_optimization(self, key: str, optimizer_id: str, *, lease: float | None = None) -> Variable:
        """Take the variable's optimization lock, or renew it. Re-entrant for the same optimizer.

        ``lease``: seconds until the lock lapses by itself unless taken again (so a holder that
        died cannot keep it); ``None``: held until released.

        Raises:
            VariableLockedError: another optimizer holds it.
        """
        slot = self._slot(key)
        holder = slot.variable.optimizer_id
        if holder is not None and holder != optimizer_id:
            raise VariableLockedError(f"variable {slot.variable.name!r} is already being optimized by {holder!r}")
        slot.variable = replace(slot.variable, optimizer_id=optimizer_id)
        slot.lease_until = None if lease is None else self._clock() + lease
        return slot.variable

    def stop_optimization(self, key: str, optimizer_id: str) -> Variable:
        """Release the lock if ``optimizer_id`` holds it (idempotent)."""
        slot = self._slot(key)
        if slot.variable.optimizer_id == optimizer_id:
            slot.variable = replace(slot.variable, optimizer_id=None)
            slot.lease_until = None
        return slot.variable

    # ---- internals ----
    def _slot(self, key: str) -> _Slot:
        name = (key if key in self._slots else self._by_id.get(key)) if isinstance(key, str) else None
        if name is None:
            raise VariableNotFoundError(f"no variable named {_r(key)} in this session")
        slot = self._slots[name]
        if slot.lease_until is not None and self._clock() >= slot.lease_until:  # its holder let the lease lapse
            slot.variable = replace(slot.variable, optimizer_id=None)
            slot.lease_until = None
        return slot

    def _validate_write(self, variable: Variable, value: Any, expected_version: int | None, optimizer_id: str | None) -> Any:
        if expected_version is not None and expected_version != variable.version:
            raise VersionConflictError(
                f"variable {variable.name!r} is at version {variable.version}, not the expected {_r(expected_version)}"
            )
        if variable.optimizer_id is not None and variable.optimizer_id != optimizer_id:
            raise VariableLockedError(
                f"variable {variable.name!r} is being optimized by {variable.optimizer_id!r}; "
                "only that optimizer may write it until it stops"
            )
        try:
            value = check_value(variable.type, value, dict(variable.constraints))
        except InvalidVariableError as exc:
            raise InvalidVariableError(f"variable {variable.name!r} ({variable.type}): {exc}") from None
        self._check_encodable(variable.name, value)
        self._check_size(variable.name, value)
        return value

    def _check_size(self, name: str, value: Any) -> None:
        size = _encoded_size(value)
        if size > self.max_value_bytes:
            raise QuotaExceededError(
                f"value for {name!r} is {size:,} bytes encoded, over the limit of {self.max_value_bytes:,} (max_value_bytes)"
            )

    @staticmethod
    def _check_encodable(name: str, value: Any) -> None:
        # Typed values are encodable by construction; this guards that promise (cheap: no copy).
        try:
            codec.check(value, path="value")
        except EncodeError as exc:
            raise InvalidVariableError(f"variable {name!r}: {exc}") from None

    def _check_metadata(self, name: str, metadata: Any) -> dict[str, Any]:
        """The metadata in its wire form (a new dict), or InvalidVariableError / QuotaExceededError."""
        return metadata_copy(metadata, f"variable {name!r} metadata", self.max_value_bytes, InvalidVariableError)

    def _apply(self, slot: _Slot, value: Any, source: str, metadata: dict[str, Any] | None) -> tuple[Variable, VariableUpdate | None]:
        old = slot.variable
        if values_equal(old.value, value):
            return old, None
        now = self._clock()
        new_metadata = {**old.metadata, **metadata} if metadata else old.metadata
        slot.variable = replace(old, value=value, version=old.version + 1, updated_at=now, source=source, metadata=new_metadata)
        slot.remember(HistoryEntry(slot.variable.version, value, now, source), self.history_limit)
        return slot.variable, VariableUpdate(old.name, old.value, value, slot.variable.version, source, "change", now)

    def _reaches(self, start: str, target: str) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(self._depends_on.get(node, ()))
        return False


def _record(slot: _Slot) -> dict[str, Any]:
    v = slot.variable
    return {
        "id": v.id, "name": v.name, "type": v.type, "value": v.value, "constraints": dict(v.constraints),
        "metadata": dict(v.metadata), "version": v.version, "created_at": v.created_at, "updated_at": v.updated_at,
        "source": v.source, "optimizer_id": v.optimizer_id, "depends_on": list(v.depends_on),
        "history": [[e.version, e.value, e.updated_at, e.source] for e in slot.history], "lease_until": slot.lease_until,
    }


def _encoded_size(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, int):
        return max(8, value.bit_length() // 4 + 2)  # big ones travel in hexadecimal
    if isinstance(value, float) or value is None:
        return 8
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    payload = codec.encode(value, plane=None)  # not reached by the typed values; exact if it is
    return len(payload.json) + sum(len(blob) for blob in payload.blobs)


def metadata_copy(metadata: Any, what: str, max_bytes: int, error: type[TrioBridgeError]) -> dict[str, Any]:
    """``metadata`` (``None`` or a ``str``-keyed dict of encodable values) as a new dict in its
    wire form, so nothing stored can fail to encode later.

    Raises:
        error: not a dict, or a value the codec refuses (the message names ``what`` and the path).
        QuotaExceededError: over ``max_bytes`` encoded.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise error(f"{what} must be a dict with str keys, not {type(metadata).__name__}")
    try:
        payload = codec.encode(metadata, path="metadata", plane=None)
    except EncodeError as exc:
        raise error(f"invalid {what}: {exc}") from None
    size = len(payload.json) + sum(len(blob) for blob in payload.blobs)
    if size > max_bytes:
        raise QuotaExceededError(f"{what} is {size:,} bytes encoded, over the limit of {max_bytes:,} (max_value_bytes)")
    return codec.decode(payload, plane=None)
