"""Variables, history entries and watch updates <-> their wire messages (both sides use these).

``plane``: the shared-memory plane for large values (default: the process's; the host passes its
pool's).
"""

from __future__ import annotations

from typing import Any, cast

from trio_bridge._state.variables import HistoryEntry, UpdateKind, Variable, VariableType, VariableUpdate
from trio_bridge._wire.codec import DEFAULT_PLANE, decode, encode
from trio_bridge._wire.generated.trio_bridge import v1 as pb


def variable_to_wire(v: Variable, plane: Any = DEFAULT_PLANE) -> pb.Variable:
    return pb.Variable(
        id=v.id, name=v.name, type=v.type, value=encode(v.value, path=f"variable {v.name!r}", plane=plane),
        constraints=encode(dict(v.constraints)), metadata=encode(dict(v.metadata)), version=v.version,
        created_at=v.created_at, updated_at=v.updated_at, source=v.source, optimizer_id=v.optimizer_id or "",
        depends_on=list(v.depends_on),
    )


def variable_from_wire(m: pb.Variable, plane: Any = DEFAULT_PLANE) -> Variable:
    return Variable(
        id=m.id, name=m.name, type=cast(VariableType, m.type), value=decode(m.value, plane=plane), constraints=decode(m.constraints) or {},
        metadata=decode(m.metadata) or {}, version=m.version, created_at=m.created_at, updated_at=m.updated_at,
        source=m.source, optimizer_id=m.optimizer_id or None, depends_on=tuple(m.depends_on),
    )


def history_to_wire(e: HistoryEntry, plane: Any = DEFAULT_PLANE) -> pb.HistoryEntry:
    return pb.HistoryEntry(version=e.version, value=encode(e.value, plane=plane), updated_at=e.updated_at, source=e.source)


def history_from_wire(m: pb.HistoryEntry, plane: Any = DEFAULT_PLANE) -> HistoryEntry:
    return HistoryEntry(version=m.version, value=decode(m.value, plane=plane), updated_at=m.updated_at, source=m.source)


def update_to_wire(u: VariableUpdate, plane: Any = DEFAULT_PLANE) -> pb.VariableUpdate:
    return pb.VariableUpdate(
        name=u.name, old_value=encode(u.old_value, plane=plane), new_value=encode(u.new_value, plane=plane), version=u.version,
        source=u.source, kind=u.kind, timestamp=u.timestamp, coalesced=u.coalesced,
    )


def update_from_wire(m: pb.VariableUpdate, plane: Any = DEFAULT_PLANE) -> VariableUpdate:
    return VariableUpdate(
        name=m.name, old_value=decode(m.old_value, plane=plane), new_value=decode(m.new_value, plane=plane), version=m.version,
        source=m.source, kind=cast(UpdateKind, m.kind), timestamp=m.timestamp, coalesced=m.coalesced,
    )
