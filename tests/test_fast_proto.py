"""fast_proto: the same bytes as betterproto2 for every generated message, the same messages back
(also from data split anywhere into chunks, with unknown fields, or malformed), big blobs intact."""

from __future__ import annotations

import inspect
import itertools
import math
from functools import partial
from typing import Any

import betterproto2
import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_bridge._wire import fast_proto
from trio_bridge._wire.generated.trio_bridge import v1 as pb

MESSAGES = sorted(
    (cls for _, cls in inspect.getmembers(pb, inspect.isclass) if issubclass(cls, betterproto2.Message)),
    key=lambda cls: cls.__name__,
)

_INTS = {
    betterproto2.TYPE_INT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SINT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_INT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SINT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_UINT32: (0, 2**32 - 1),
    betterproto2.TYPE_FIXED32: (0, 2**32 - 1),
    betterproto2.TYPE_UINT64: (0, 2**64 - 1),
    betterproto2.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(proto_type: str, cls: Any) -> st.SearchStrategy[Any]:
    if proto_type in _INTS:
        low, high = _INTS[proto_type]
        return st.one_of(st.integers(low, high), st.sampled_from([0, low, high]))
    if proto_type == betterproto2.TYPE_BOOL:
        return st.booleans()
    if proto_type == betterproto2.TYPE_FLOAT:
        return st.floats(width=32)
    if proto_type == betterproto2.TYPE_DOUBLE:
        return st.floats()  # NaN, infinities and -0.0 included
    if proto_type == betterproto2.TYPE_STRING:
        return st.text()
    if proto_type == betterproto2.TYPE_BYTES:
        return st.binary(max_size=300)
    if proto_type == betterproto2.TYPE_ENUM:
        return st.sampled_from(list(cls))
    raise AssertionError(f"no strategy for {proto_type}")


def messages(cls: type[betterproto2.Message], depth: int = 0) -> st.SearchStrategy[Any]:
    """Instances of ``cls`` with any subset of its fields set (one field per oneof at most)."""
    meta = cls._betterproto
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in meta.meta_by_field_name.items():
        field_cls = meta.cls_by_field.get(name)
        if field.proto_type == betterproto2.TYPE_MESSAGE:
            if depth >= 3:
                continue
            one = messages(field_cls, depth + 1)  # type: ignore[arg-type]
        elif field.proto_type == betterproto2.TYPE_MAP:
            assert field.map_meta is not None
            key_meta, value_meta = field.map_meta
            if value_meta.proto_type == betterproto2.TYPE_MESSAGE:
                value = messages(meta.cls_by_field[f"{name}.value"], depth + 1) if depth < 3 else st.nothing()
            else:
                value = _scalar(value_meta.proto_type, meta.cls_by_field.get(f"{name}.value"))
            one = st.dictionaries(_scalar(key_meta.proto_type, None), value, max_size=3)
        else:
            one = _scalar(field.proto_type, field_cls)
        fields[name] = st.lists(one, max_size=3) if field.repeated else one
    groups = {name: meta.meta_by_field_name[name].group for name in fields}

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []
        taken: set[str] = set()
        kwargs = {}
        for name in chosen:
            group = groups[name]
            if group is not None:
                if group in taken:
                    continue
                taken.add(group)
            kwargs[name] = draw(fields[name])
        return cls(**kwargs)

    return build()


def _same(a: betterproto2.Message, b: betterproto2.Message) -> None:
    assert type(a) is type(b)
    assert repr(a) == repr(b) and a._unknown_fields == b._unknown_fields
    assert _outcome(lambda: bytes(a)) == _outcome(lambda: bytes(b))  # mangled input can give unencodable values


def _outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:
        return type(exc)


def _owned(data: bytes, known: int) -> fast_proto.Owned:
    """``data`` received into a buffer of its own, placed knowing its first ``known`` bytes."""
    owned = fast_proto.owned_buffer(len(data), data[:known])
    owned.buffers[0][:] = data
    return owned


def _chunks(data: bytes, cuts: list[int]) -> fast_proto.Chunks:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return fast_proto.Chunks([data[a:b] for a, b in itertools.pairwise(points)], len(data))


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_serialize_and_parse_are_betterproto2s(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    expected = bytes(message)
    parts = fast_proto.serialize(message)
    assert len(parts) == len(expected) and parts.tobytes() == expected
    _same(fast_proto.parse(cls, expected), cls.parse(expected))
    cuts = data.draw(st.lists(st.integers(0, 10**6), max_size=6))
    _same(fast_proto.parse(cls, _chunks(expected, cuts)), cls.parse(expected))
    _same(fast_proto.parse(cls, _owned(expected, data.draw(st.integers(0, len(expected))))), cls.parse(expected))
    # unknown fields (numbers no message uses) among the known ones: kept, in order, as betterproto2 keeps them
    unknown = data.draw(st.sampled_from([b"\xf8\x3f\x05", b"\xfa\x3f\x03abc", b"\xfd\x3f\x01\x02\x03\x04", b"\xf9\x3f" + bytes(8)]))
    split = data.draw(st.integers(0, 2))
    mixed = expected + unknown if split else unknown + expected
    _same(fast_proto.parse(cls, mixed), cls.parse(mixed))
    reparsed = fast_proto.parse(cls, mixed)
    assert fast_proto.serialize(reparsed).tobytes() == bytes(reparsed)


@pytest.mark.parametrize("cls", [pb.CallMessage, pb.CallResult, pb.VariableReply, pb.ToolSpec], ids=lambda c: c.__name__)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_bytes_parse_as_betterproto2_parses_them(cls: type[betterproto2.Message], data: st.DataObject) -> None:
    # Malformed or mangled input: the same message, or the same kind of error, as betterproto2.
    valid = bytes(data.draw(messages(cls)))
    raw = data.draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda n: valid[:n], st.integers(0, len(valid))),  # truncated
        st.builds(lambda i, b: valid[:i] + bytes([b]) + valid[i + 1 :], st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)),
    ))
    expected = _outcome(lambda: cls.parse(raw))
    for given_as in (raw, _owned(raw, data.draw(st.integers(0, len(raw))))):
        got = _outcome(partial(fast_proto.parse, cls, given_as))
        if isinstance(expected, type):
            assert got is expected
        else:
            assert not isinstance(got, type)
            _same(got, expected)


def test_large_blobs_are_referenced_when_serialized_and_copied_once_when_parsed() -> None:
    blob = bytes(range(256)) * (12 << 12)  # 12 MiB
    message = pb.CallMessage(execute=pb.ExecuteToolRequest(
        tool_name="echo", call_id="c", timeout_seconds=math.pi,
        arguments=pb.Payload(json=b'{"v":1}', blobs=[blob, b"", b"x" * 70_000]),
    ))
    parts = fast_proto.serialize(message)
    assert any(part is blob for part in parts.buffers)  # in the parts as it is, not copied
    assert sum(len(part) for part in parts.buffers) == len(parts)
    wire = parts.tobytes()
    assert wire == bytes(message)
    framed = b"\x00" + len(wire).to_bytes(4, "big") + parts  # what grpclib does with an encoding
    assert isinstance(framed, fast_proto.Parts) and framed.tobytes()[5:] == wire
    for data in (wire, _chunks(wire, [5, 1 << 20, 5 << 20, (5 << 20) + 1, 12 << 20])):
        parsed = fast_proto.parse(pb.CallMessage, data)
        assert parsed == message
        assert parsed.execute is not None and parsed.execute.arguments is not None
        big, _, small = parsed.execute.arguments.blobs
        assert type(small) is bytes
        # a big value is one writable buffer of its own: an array over it needs no second copy
        assert isinstance(big, memoryview) and not big.readonly and big.obj is not blob
        big[0] ^= 1
        assert big != blob and bytes(big[1:]) == blob[1:]


def test_read_only_byte_views_are_sent_as_they_are_and_encode_like_bytes() -> None:
    array = numpy.arange(1 << 18, dtype=numpy.float32)
    array.flags.writeable = False
    view = memoryview(array).cast("B")
    message = pb.Payload(json=b"{}", blobs=[view])
    parts = fast_proto.serialize(message)
    assert any(part is view for part in parts.buffers)
    assert parts.tobytes() == bytes(pb.Payload(json=b"{}", blobs=[view.tobytes()])) == bytes(message)
    writable = memoryview(numpy.arange(4, dtype=numpy.uint8)).cast("B")  # could change before it is sent
    assert not any(part is writable for part in fast_proto.serialize(pb.Payload(blobs=[writable])).buffers)


def test_a_big_value_received_into_a_buffer_of_its_own_is_parsed_in_place() -> None:
    # owned_buffer places the big value that the message's first bytes point to at a cache line;
    # parse hands it out as a view of that buffer (writable: an array over it needs no copy).
    blob = bytes(range(256)) * (12 << 12)  # 12 MiB
    message = pb.CallMessage(execute=pb.ExecuteToolRequest(
        tool_name="echo", call_id="c", arguments=pb.Payload(json=b'{"v":1}', blobs=[blob, b"", b"x" * 70_000]),
    ))
    wire = bytes(message)
    offset = wire.index(blob)
    for known in (offset, 4096, len(wire)):
        assert fast_proto._big_value_offset(memoryview(wire[:known]), len(wire)) == offset
        owned = _owned(wire, known)
        assert (owned.address + offset) % 64 == 0
        parsed = fast_proto.parse(pb.CallMessage, owned)
        assert parsed == message
        assert parsed.execute is not None and parsed.execute.arguments is not None
        big = parsed.execute.arguments.blobs[0]
        assert isinstance(big, memoryview) and big.obj is owned.buffers[0].obj and not big.readonly
    # Misplaced (the first bytes did not reach the value) or too small a share of its buffer: copied.
    raw: Any = numpy.empty(len(wire) + 64, dtype=numpy.uint8)
    start = raw.__array_interface__["data"][0]
    shift = (8 - start - offset) % 16  # the value 8 bytes off a 16-byte boundary
    view = memoryview(raw)[shift : shift + len(wire)]
    view[:] = wire
    parsed = fast_proto.parse(pb.CallMessage, fast_proto.Owned(view, start + shift))
    assert parsed == message and parsed.execute is not None and parsed.execute.arguments is not None
    copied: Any = parsed.execute.arguments.blobs[0]
    assert copied.obj is not raw
    two = pb.Payload(json=b"{}", blobs=[blob, blob])  # each is half of the message, less its headers
    parsed_two = fast_proto.parse(pb.Payload, _owned(bytes(two), 4096))
    blobs: list[Any] = parsed_two.blobs
    assert parsed_two == two and all(blob.obj.nbytes == len(blob) for blob in blobs)


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=64), size=st.integers(0, 2**40))
def test_the_big_value_guess_is_only_ever_a_place_in_the_message(head: bytes, size: int) -> None:
    offset = fast_proto._big_value_offset(memoryview(head), size)
    assert offset is None or 0 < offset <= size
