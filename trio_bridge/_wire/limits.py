"""What a request may hold (``docs/wire.md``, "Limits"), checked in one place: the codec of every
server of ours runs :func:`request_problem` on each message it receives, before any handler
sees it (``transport._ValidatingCodec``). The limits are :mod:`contract`'s constants.

- Every field has its type: the protobuf parser (betterproto2) is lenient, and hands on a field
  sent with another wire type as a value of another Python type (an ``int`` for a ``string``
  field, a ``list`` for a ``double``, ``None`` for a group); such a message is not one of ours.
  Unknown fields (a newer peer's) must be well-formed protobuf: betterproto2 keeps any bytes it
  cannot read there (field number 0, wire types 6 and 7), so random bytes would parse as an
  empty request.
- Every ``string`` field of a request is a name or an id (tool, session, variable, call,
  optimizer, worker, pattern, address, version): at most ``MAX_NAME_BYTES`` bytes of UTF-8, and
  a repeated one at most ``MAX_NAMES`` items.
- Every ``double`` of a request is a number of seconds: not NaN, not negative (``+inf`` means
  no limit, like 0 where the .proto says so).

Payloads (``bytes``) are the value codec's to check (:func:`trio_bridge._wire.codec.decode`).
"""

from __future__ import annotations

from typing import Any

from betterproto2 import (
    TYPE_BOOL,
    TYPE_BYTES,
    TYPE_DOUBLE,
    TYPE_FLOAT,
    TYPE_INT32,
    TYPE_INT64,
    TYPE_MESSAGE,
    TYPE_STRING,
    TYPE_UINT32,
    TYPE_UINT64,
    Message,
)

from trio_bridge._wire.contract import MAX_NAME_BYTES, MAX_NAMES
from trio_bridge._wire.fast_proto import read_varint

__all__ = ["NOT_PROTOBUF", "OVERSIZED", "WRONG_NUMBER", "request_problem"]

# What kind of problem request_problem found (a server logs each under its own rate limit).
NOT_PROTOBUF = "not protobuf"
OVERSIZED = "over a limit"
WRONG_NUMBER = "a wrong number"

_SCALARS: dict[str, tuple[type, ...]] = {
    TYPE_STRING: (str,), TYPE_BYTES: (bytes, bytearray, memoryview), TYPE_DOUBLE: (float,), TYPE_FLOAT: (float,),
    TYPE_BOOL: (bool,), TYPE_INT32: (int,), TYPE_INT64: (int,), TYPE_UINT32: (int,), TYPE_UINT64: (int,),
}


class _Field:
    __slots__ = ("name", "nullable", "proto_type", "repeated", "types")

    def __init__(self, name: str, proto_type: str, types: tuple[type, ...], repeated: bool, nullable: bool) -> None:
        self.name, self.proto_type, self.types, self.repeated, self.nullable = name, proto_type, types, repeated, nullable


_plans: dict[type, list[_Field] | None] = {}


def _plan(cls: type) -> list[_Field] | None:
    """How to check the fields of ``cls``; ``None``: not a message of ours (the standard
    services' are protobuf's own, which checks its own)."""
    try:
        return _plans[cls]
    except KeyError:
        pass
    plan: list[_Field] | None = None
    if issubclass(cls, Message):
        meta = cls._betterproto  # betterproto2's field metadata
        plan = []
        for name, field in meta.meta_by_field_name.items():
            if field.proto_type == TYPE_MESSAGE:
                types: tuple[type, ...] = (meta.cls_by_field[name],)
            elif field.proto_type in _SCALARS:
                types = _SCALARS[field.proto_type]
            else:
                continue  # no request has another type (enums, maps, fixed-width ints)
            # A message field, a oneof's member and a proto3 optional field are None when not sent.
            nullable = field.proto_type == TYPE_MESSAGE or field.group is not None or bool(field.optional)
            plan.append(_Field(name, field.proto_type, types, bool(field.repeated), nullable))
    _plans[cls] = plan
    return plan


def request_problem(message: Any) -> tuple[str, str] | None:
    """What makes ``message`` (a request, a betterproto2 message) not one of ours or break the
    limits, as ``(kind, problem)``: :data:`NOT_PROTOBUF`, :data:`OVERSIZED` or
    :data:`WRONG_NUMBER`, and a sentence naming the field, the limit and the size sent (never
    the value itself); ``None`` if it is fine."""
    plan = _plan(type(message))
    if plan is None:
        return None
    unknown = message._unknown_fields  # betterproto2 keeps them there, as received
    if unknown and _malformed(unknown):
        return NOT_PROTOBUF, f"{type(message).__name__} holds bytes that are not protobuf fields"
    for field in plan:
        value = getattr(message, field.name)
        if field.repeated:
            if type(value) is not list or not all(isinstance(item, field.types) for item in value):
                return _wrong_type(message, field)
            if field.proto_type == TYPE_STRING:
                if len(value) > MAX_NAMES:
                    return OVERSIZED, f"{_where(message, field.name)} has {len(value):,} items: at most {MAX_NAMES:,} (docs/wire.md, Limits)"
                for index, item in enumerate(value):
                    if _too_long(item):
                        return OVERSIZED, _long(message, f"{field.name}[{index}]", item)
            elif field.proto_type == TYPE_MESSAGE:
                for item in value:
                    if (found := request_problem(item)) is not None:
                        return found
            continue
        if value is None:
            if field.nullable:
                continue
            return _wrong_type(message, field)
        if not isinstance(value, field.types) or (field.proto_type != TYPE_BOOL and type(value) is bool):
            return _wrong_type(message, field)
        if field.proto_type == TYPE_STRING:
            if _too_long(value):
                return OVERSIZED, _long(message, field.name, value)
        elif field.proto_type == TYPE_DOUBLE:
            if not value >= 0.0:  # NaN, or negative
                return WRONG_NUMBER, f"{_where(message, field.name)} is {value!r}: a number of seconds must be >= 0"
        elif field.proto_type == TYPE_MESSAGE and (found := request_problem(value)) is not None:
            return found
    return None


def _malformed(data: bytes) -> bool:
    """Whether ``data`` is not a sequence of well-formed protobuf fields (groups, which proto3
    has not, count as malformed)."""
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = read_varint(data, pos)
        if tag < 8:  # field number 0, or no tag
            return True
        wire = tag & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
            if value < 0:
                return True
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = read_varint(data, pos)
            if size < 0:
                return True
            pos += size
        elif wire == 5:
            pos += 4
        else:
            return True
        if pos > end:
            return True
    return False


def _too_long(text: str) -> bool:
    return len(text) * 4 > MAX_NAME_BYTES and len(text.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES


def _where(message: Any, name: str) -> str:
    return f"{type(message).__name__}.{name}"


def _long(message: Any, name: str, value: str) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    return f"{_where(message, name)} is {size:,} bytes long: at most {MAX_NAME_BYTES:,} (docs/wire.md, Limits)"


def _wrong_type(message: Any, field: _Field) -> tuple[str, str]:
    expected = f"repeated {field.proto_type}" if field.repeated else field.proto_type
    return NOT_PROTOBUF, f"{_where(message, field.name)} was sent with another wire type than its {expected}"
