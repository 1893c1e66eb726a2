"""The protobuf wire format of betterproto2 messages, without whole-body copies.

betterproto2 0.10 serializes every field as ``key + varint + value`` into a ``bytearray``, then
``bytes(...)``, at every level of nesting: a 50 MiB blob inside a Payload inside an
ExecuteToolRequest inside a CallMessage is copied about ten times, each into fresh pages (0.4 s).
Parsing slices a ``BytesIO`` at every level (0.25 s).

:func:`serialize` computes sizes first and returns the encoding as parts (a :class:`Parts`:
small headers, and the message's own ``bytes`` values -- or read-only byte memoryviews, which
the codec uses for arrays -- not copied; ``bytearray`` values are copied, as they could change
before the parts are sent); ``Parts.tobytes()`` joins them once. :func:`parse` reads nested
messages, ``bytes`` and ``string`` fields itself, slicing one memoryview (a ``bytes`` value is
copied once, out of the received data; :class:`Chunks`, the received frames, are not joined
first; a value of :data:`BIG` bytes or more comes as a writable memoryview, equal to the
``bytes``: a view of the received data itself when that is an :class:`Owned` buffer and the
value is aligned in it, else a copy), and hands every other field's raw bytes to betterproto2's
own ``Message.load``.

Both are generic, driven by betterproto2's field metadata, and exact: every field is encoded by
betterproto2's own functions except nested messages, ``bytes`` and ``string`` values, whose
encoding is the tag, the length and the bytes; fields come in betterproto2's order (dataclass
order), defaults are skipped by betterproto2's rule (``value == default``), unknown fields are
kept. Output is byte-identical to ``bytes(message)`` and parse results equal ``cls.parse(data)``
(tests check both with hypothesis). Data :func:`parse` does not expect (a wire type that does not
match its field, truncation, anything that raises) is parsed again by betterproto2 in full, so
betterproto2's leniency and errors are unchanged. Pydantic-validated messages go to betterproto2.
"""

from __future__ import annotations

import bisect
import dataclasses
import warnings
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeVar

import betterproto2
from betterproto2 import Message

from trio_bridge._wire import buffers

if TYPE_CHECKING:
    from betterproto2 import FieldMetadata

# betterproto2's internals, read without failing the import where a release lacks one: the codec
# uses this module only where :mod:`overrides` found them all (else betterproto2's own code).
PACKED_TYPES: Any = getattr(betterproto2, "PACKED_TYPES", ())
TYPE_BYTES: Any = getattr(betterproto2, "TYPE_BYTES", None)
TYPE_MESSAGE: Any = getattr(betterproto2, "TYPE_MESSAGE", None)
TYPE_STRING: Any = getattr(betterproto2, "TYPE_STRING", None)
_preprocess_single: Any = getattr(betterproto2, "_preprocess_single", None)
_serialize_single: Any = getattr(betterproto2, "_serialize_single", None)

__all__ = ["Chunks", "Owned", "Parts", "owned_buffer", "parse", "serialize"]

M = TypeVar("M", bound=Message)

_OTHER, _MESSAGE, _BYTES, _STRING = range(4)


class _Buffers:
    """Consecutive byte buffers, not joined; ``len()`` is the total."""

    __slots__ = ("buffers", "size")

    def __init__(self, buffers: list[Any], size: int) -> None:
        self.buffers = buffers
        self.size = size

    def __len__(self) -> int:
        return self.size

    def tobytes(self) -> bytes:
        return b"".join(self.buffers)


class Parts(_Buffers):
    """An encoded message as consecutive ``bytes``. ``prefix + parts`` (what grpclib does to add
    its 5-byte message header) prepends without copying."""

    __slots__ = ()

    def __radd__(self, prefix: Any) -> Parts:
        if not isinstance(prefix, (bytes, bytearray)):
            return NotImplemented
        return Parts([prefix, *self.buffers], len(prefix) + self.size)


class Chunks(_Buffers):
    """Received data as consecutive byte buffers (memoryviews of received DATA frames)."""

    __slots__ = ()


class Owned(Chunks):
    """A received message in one writable buffer that nothing else refers to (``buffers[0]``,
    made by :func:`owned_buffer`, which starts at ``address`` in memory). :func:`parse` hands
    out a big value of at least half the message that is ``_ALIGN``-aligned in it as a view of
    it instead of copying it: the buffer then lives as long as that value."""

    __slots__ = ("address",)

    def __init__(self, view: memoryview, address: int) -> None:
        super().__init__([view], len(view))
        self.address = address


# ---- plans: what to do with each field of a message class ----


class _Field:
    __slots__ = ("cls", "default", "key", "kind", "meta", "name", "repeated")

    def __init__(self, name: str, meta: FieldMetadata, default: Any, cls: Any) -> None:
        self.name = name
        self.meta = meta
        self.default = default
        self.repeated = bool(meta.repeated)
        kind = _OTHER
        if not meta.map_meta and meta.unwrap is None:
            if meta.proto_type == TYPE_MESSAGE and isinstance(cls, type) and issubclass(cls, Message):
                kind = _MESSAGE
            elif meta.proto_type == TYPE_BYTES:
                kind = _BYTES
            elif meta.proto_type == TYPE_STRING:
                kind = _STRING
        self.kind = kind
        self.cls = cls
        self.key = varint((meta.number << 3) | 2)


class _Plan:
    __slots__ = ("by_number", "fields")

    def __init__(self, fields: list[_Field]) -> None:
        self.fields = fields
        self.by_number = {f.meta.number: f for f in fields}


_plans: dict[type, _Plan | None] = {}


def _plan(cls: type) -> _Plan | None:
    try:
        return _plans[cls]
    except KeyError:
        pass
    plan: _Plan | None = None
    if issubclass(cls, Message) and dataclasses.is_dataclass(cls) and not _is_pydantic(cls):
        meta = cls._betterproto  # betterproto2's own: field order, defaults, nested classes
        with warnings.catch_warnings():  # as betterproto2 makes defaults: deprecated fields' are fine
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            defaults = {name: make() for name, make in meta.default_gen.items()}
        plan = _Plan([
            _Field(name, field_meta, defaults[name], meta.cls_by_field.get(name))
            for name, field_meta in meta.meta_by_field_name.items()
        ])
    _plans[cls] = plan
    return plan


def _is_pydantic(cls: type) -> bool:
    pydantic = getattr(betterproto2, "pydantic", None)
    return pydantic is not None and pydantic.dataclasses.is_pydantic_dataclass(cls)


# ---- serialization ----

_SMALL_VARINTS = [bytes([n]) for n in range(128)]


def varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 127:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def serialize(message: Message) -> Parts:
    """``message``'s encoding (equal to ``bytes(message)``) as parts; ``bytes`` values are not copied."""
    out: list[Any] = []
    size = _encode(message, out)
    return Parts(out, size)


def _encode(message: Message, out: list[Any]) -> int:
    plan = _plans.get(type(message)) or _plan(type(message))
    if plan is None:
        data = bytes(message)
        out.append(data)
        return len(data)
    size = 0
    for f in plan.fields:
        value = getattr(message, f.name)
        if value is None or value == f.default:  # betterproto2's rule: None and defaults are left out
            continue
        kind = f.kind
        if kind == _MESSAGE:
            for item in value if f.repeated else (value,):
                if isinstance(item, Message):
                    index = len(out)
                    out.append(b"")
                    n = _encode(item, out)
                    head = f.key + varint(n)
                    out[index] = head
                    size += len(head) + n
                else:  # not a message: betterproto2 says what that gives (an error, most likely)
                    data = _serialize_single(f.meta.number, f.meta.proto_type, item) or b"\n\x00"
                    out.append(data)
                    size += len(data)
            continue
        if kind == _BYTES or kind == _STRING:
            for item in value if f.repeated else (value,):
                if kind == _STRING and type(item) is str:
                    item = item.encode("utf-8")
                if type(item) is bytearray:
                    item = bytes(item)  # referenced until sent: only immutable bytes are
                if type(item) is bytes or (type(item) is memoryview and item.readonly and item.format == "B"):
                    head = f.key + varint(len(item))
                    out.append(head)
                    out.append(item)
                    size += len(head) + len(item)
                else:
                    data = _serialize_single(f.meta.number, f.meta.proto_type, item) or b"\n\x00"
                    out.append(data)
                    size += len(data)
            continue
        data = _encode_other(f.meta, value)
        out.append(data)
        size += len(data)
    unknown = message._unknown_fields
    if unknown:
        out.append(unknown)
        size += len(unknown)
    return size


def _encode_other(meta: FieldMetadata, value: Any) -> bytes:
    """One field as betterproto2 0.10's ``Message.__bytes__`` encodes it (its code, verbatim)."""
    if meta.repeated:
        if meta.proto_type in PACKED_TYPES:
            buf = bytearray()
            for item in value:
                buf += _preprocess_single(meta.proto_type, None, item)
            return _serialize_single(meta.number, TYPE_BYTES, buf)
        return b"".join(
            _serialize_single(meta.number, meta.proto_type, item, unwrap=meta.unwrap) or b"\n\x00" for item in value
        )
    if meta.map_meta:
        entries = []
        for k, v in value.items():
            sk = _serialize_single(1, meta.map_meta[0].proto_type, k)
            sv = _serialize_single(2, meta.map_meta[1].proto_type, v, unwrap=meta.map_meta[1].unwrap)
            entries.append(_serialize_single(meta.number, meta.proto_type, sk + sv))
        return b"".join(entries)
    return _serialize_single(meta.number, meta.proto_type, value, unwrap=meta.unwrap)


# ---- parsing ----


#: a ``bytes`` field this long or longer is parsed into a writable memoryview (see :func:`parse`)
BIG = 1 << 20


def _writable_copy(slices: list[memoryview], size: int) -> Any:
    """The slices joined into a new writable buffer (a memoryview that compares equal to the
    ``bytes``). Its memory is numpy's, which asks the kernel for huge pages for big buffers:
    50 MiB took 18 ms against ``bytes``' 35-48 ms (page faults), and a caller that wants an
    array of it needs no second copy to have a writable one."""
    buffer: Any = buffers.empty(size)  # numpy's stubs do not say it is a buffer
    out = memoryview(buffer).cast("B")
    pos = 0
    for piece in slices:
        out[pos : pos + len(piece)] = piece
        pos += len(piece)
    return out


_ALIGN = 16  # a big value this aligned is handed out in place: numpy's own buffers are (malloc's)
_PLACE = 64  # owned_buffer places a big value at a cache line: aligned for any dtype


def owned_buffer(size: int, head: Any) -> Owned:
    """A new buffer for a received message of ``size`` bytes whose first bytes are ``head``
    (some, or none): numpy's memory (huge pages for big buffers, as in :func:`_writable_copy`),
    placed so that the big value :func:`_big_value_offset` finds in ``head`` starts
    ``_PLACE``-aligned, then :func:`parse` needs no copy of it. The caller fills the buffer
    (``buffers[0]``) before parsing it."""
    raw: Any = buffers.empty(size + _PLACE)
    start = raw.__array_interface__["data"][0]
    offset = _big_value_offset(memoryview(head).cast("B"), size) or 0
    shift = -(start + offset) % _PLACE
    return Owned(memoryview(raw)[shift : shift + size], start + shift)


def _big_value_offset(head: memoryview, size: int) -> int | None:
    """Where the value of a length-delimited field at least half the size of the message starts,
    following such fields into nested messages as far as ``head`` (the message's first bytes)
    tells, without the schema (a guess: what is not a message may parse as one); None if
    ``head`` does not reach one."""
    found = None
    pos, end = 0, size
    while True:
        inner = None
        while pos < end:
            key, pos = read_varint(head, pos)
            if key < 8:  # field 0 does not exist: not a message (or head ends here: -1)
                return found
            wire = key & 7
            if wire == 2:
                length, pos = read_varint(head, pos)
                if length < 0 or pos + length > end:
                    return found
                if 2 * length >= size:
                    inner, end = pos, pos + length
                    break
                pos += length
            elif wire == 0:
                value, pos = read_varint(head, pos)
                if value < 0:
                    return found
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            else:
                return found
        if inner is None:
            return found
        found = inner


def read_varint(head: memoryview | bytes, pos: int) -> tuple[int, int]:
    """A varint in ``head`` at ``pos``, and where it ends; ``-1`` when it runs past ``head``'s
    end or over 10 bytes."""
    result = shift = 0
    for i in range(pos, min(pos + 10, len(head))):
        byte = head[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i + 1
        shift += 7
    return -1, pos


class _Unexpected(Exception):
    """Data this parser leaves to betterproto2."""


class _Flat:
    """Contiguous data."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        view = self.view
        result = shift = 0
        while pos < end:
            byte = view[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift >= 64:
                break
        raise _Unexpected

    def take(self, start: int, stop: int) -> bytes:
        if stop - start >= BIG:
            return _writable_copy([self.view[start:stop]], stop - start)
        return self.view[start:stop].tobytes()

    def text(self, start: int, stop: int) -> str:
        return str(self.view[start:stop], "utf-8")


class _InPlace(_Flat):
    """An :class:`Owned` buffer: a big value of at least half of it, ``_ALIGN``-aligned, is a
    view of it (at most one such value: the buffer is not shared)."""

    __slots__ = ("address",)

    def __init__(self, view: memoryview, address: int) -> None:
        super().__init__(view)
        self.address = address

    def take(self, start: int, stop: int) -> bytes:
        size = stop - start
        if size >= BIG and 2 * size >= len(self.view) and (self.address + start) % _ALIGN == 0:
            value: Any = self.view[start:stop]  # writable, as _writable_copy's are
            return value
        return super().take(start, stop)


class _Segmented(_Flat):
    """Data in consecutive buffers: a value inside one buffer is sliced from it; one that spans
    buffers is joined from slices (still one copy)."""

    __slots__ = ("buffers", "starts")

    def __init__(self, buffers: list[memoryview]) -> None:
        self.buffers = buffers
        self.starts = []
        start = 0
        for buffer in buffers:
            self.starts.append(start)
            start += len(buffer)
        self.view = memoryview(b"")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        head = self.take(pos, min(pos + 10, end))
        value, used = _Flat(memoryview(head)).varint(0, len(head))
        return value, pos + used

    def take(self, start: int, stop: int) -> bytes:
        if stop - start >= BIG:
            return _writable_copy(self._slices(start, stop), stop - start)
        return b"".join(self._slices(start, stop))

    def text(self, start: int, stop: int) -> str:
        return str(self.take(start, stop), "utf-8")

    def _slices(self, start: int, stop: int) -> list[memoryview]:
        index = bisect.bisect_right(self.starts, start) - 1
        slices = []
        while start < stop:
            buffer, offset = self.buffers[index], self.starts[index]
            end = min(stop, offset + len(buffer))
            slices.append(buffer[start - offset : end - offset])
            start = end
            index += 1
        return slices


def parse(cls: type[M], data: bytes | bytearray | memoryview | Chunks) -> M:
    """``cls.parse(data)``, equal in result (and in errors: whatever this parser does not expect
    is parsed by betterproto2 itself)."""
    if _plan(cls) is None:
        return cls.parse(data.tobytes() if isinstance(data, Chunks) else bytes(data))
    try:
        if type(data) is Owned:
            reader: _Flat = _InPlace(memoryview(data.buffers[0]).cast("B"), data.address)
        elif isinstance(data, Chunks):
            buffers = [memoryview(b).cast("B") for b in data.buffers]
            reader = _Flat(buffers[0]) if len(buffers) == 1 else _Segmented(buffers)
        else:
            reader = _Flat(memoryview(data).cast("B"))
        return _decode(cls, reader, 0, len(data))
    except Exception:
        return cls.parse(data.tobytes() if isinstance(data, Chunks) else bytes(data))


def _decode(cls: type[M], reader: _Flat, pos: int, end: int) -> M:
    plan = _plans.get(cls) or _plan(cls)
    if plan is None:
        return cls.parse(reader.take(pos, end))
    message = cls()
    by_number = plan.by_number
    others: list[bytes] | None = None
    while pos < end:
        start = pos
        key, pos = reader.varint(pos, end)
        wire = key & 7
        f = by_number.get(key >> 3)
        if wire == 2:
            length, pos = reader.varint(pos, end)
            stop = pos + length
            if stop > end:
                raise _Unexpected
            if f is not None and f.kind != _OTHER:
                kind = f.kind
                if kind == _MESSAGE:
                    value: Any = _decode(f.cls, reader, pos, stop)
                elif kind == _BYTES:
                    value = reader.take(pos, stop)
                else:
                    value = reader.text(pos, stop)
                if f.repeated:
                    getattr(message, f.name).append(value)
                else:
                    setattr(message, f.name, value)
                pos = stop
                continue
        elif f is not None and f.kind != _OTHER:
            raise _Unexpected  # a wire type its field does not have: betterproto2's business
        elif wire == 0:
            _, stop = reader.varint(pos, end)
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        else:
            raise _Unexpected
        if stop > end:
            raise _Unexpected
        if others is None:
            others = []
        others.append(reader.take(start, stop))
        pos = stop
    if others:
        message.load(BytesIO(b"".join(others)))  # scalars, maps, unknown fields: betterproto2's own
    return message
