"""call_messages: the call stream's hand-made encoding and parsing agree with betterproto2 byte
for byte and message for message, for the common shapes, and step aside (``None``) for others."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_bridge._wire import call_messages
from trio_bridge._wire.contract import MAX_NAME_BYTES
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.limits import request_problem

_TEXT = st.text(max_size=200)  # surrogates included: betterproto2's own error, not ours


@st.composite
def requests(draw: st.DrawFn) -> pb.ExecuteToolRequest:
    blobs = draw(st.lists(st.binary(max_size=20), max_size=2))
    payload = draw(st.none() | st.builds(pb.Payload, json=st.binary(max_size=300), blobs=st.just(blobs)))
    return pb.ExecuteToolRequest(
        tool_name=draw(_TEXT), arguments=payload, session_id=draw(_TEXT), call_id=draw(_TEXT),
        timeout_seconds=draw(st.floats() | st.sampled_from([0.0, -0.0, 1e-9, 3600.0])),
        session_state_version=draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 127, 128])),
        traceparent=draw(_TEXT),
    )


@given(requests())
def test_encode_execute_is_betterproto2s_encoding(request: pb.ExecuteToolRequest) -> None:
    try:
        expected: bytes | None = bytes(pb.CallMessage(execute=request))
    except UnicodeEncodeError:
        expected = None
    encoded = call_messages.encode_execute(request)
    if encoded is None:  # steps aside for what it does not take: blobs, no arguments, bad text
        assert request.arguments is None or request.arguments.blobs or expected is None
    else:
        assert encoded == expected
        assert not request.arguments.blobs


def test_big_json_arguments_are_left_to_fast_proto_which_does_not_copy_them() -> None:
    request = pb.ExecuteToolRequest(tool_name="t", call_id="c", arguments=pb.Payload(json=b'"' + b"x" * (1 << 20) + b'"'))
    assert call_messages.encode_execute(request) is None
    small = pb.ExecuteToolRequest(tool_name="t", call_id="c", arguments=pb.Payload(json=b'"x"'))
    assert call_messages.encode_execute(small) == bytes(pb.CallMessage(execute=small))


@st.composite
def results(draw: st.DrawFn) -> pb.CallResult:
    response = draw(st.sampled_from(["result", "error", "none"]))
    payload = pb.Payload(json=draw(st.binary(max_size=300)), blobs=draw(st.lists(st.binary(max_size=20), max_size=1)))
    if response == "result":
        answer: pb.ExecuteToolResponse | None = pb.ExecuteToolResponse(result=payload)
    elif response == "error":
        answer = pb.ExecuteToolResponse(error=pb.ErrorInfo(kind="tool_error", message=draw(st.text(max_size=20))))
    else:
        answer = None
    return pb.CallResult(call_id=draw(st.text(max_size=40)), response=answer)


@given(results())
def test_parse_result_is_betterproto2s_message(result: pb.CallResult) -> None:
    data = bytes(result)
    parsed = call_messages.parse_result(memoryview(data))
    response = result.response
    common = bool(result.call_id) and response is not None and response.result is not None and not response.result.blobs
    if common:
        assert parsed == pb.CallResult.parse(data)
        assert parsed is not None and bytes(parsed) == data
    else:
        assert parsed is None


@given(st.binary(max_size=60))
def test_parse_result_of_any_bytes_is_none_or_betterproto2s(data: bytes) -> None:
    parsed = call_messages.parse_result(memoryview(data))
    if parsed is not None:
        assert parsed == pb.CallResult.parse(data)


def test_unknown_fields_step_aside() -> None:
    request = pb.ExecuteToolRequest(tool_name="t", arguments=pb.Payload(json=b"{}"), call_id="c1")
    assert call_messages.encode_execute(request) == bytes(pb.CallMessage(execute=request))
    request._unknown_fields = b"\x48\x01"  # field 9, a varint: kept, so betterproto2's encoding
    assert call_messages.encode_execute(request) is None
    answer = bytes(pb.CallResult(call_id="c1", response=pb.ExecuteToolResponse(result=pb.Payload(json=b"1"))))
    assert call_messages.parse_result(memoryview(answer + b"\x18\x01")) is None  # a field it does not know
    assert call_messages.parse_result(memoryview(answer[:-1])) is None  # truncated


# ---- the worker's side: the request parsed, the answer encoded ----


@given(requests())
def test_parse_execute_is_betterproto2s_message(request: pb.ExecuteToolRequest) -> None:
    try:
        data = bytes(pb.CallMessage(execute=request))
    except UnicodeEncodeError:
        return  # text betterproto2 cannot send
    parsed = call_messages.parse_execute(data)
    arguments = request.arguments
    within = all(
        len(text.encode()) <= MAX_NAME_BYTES for text in (request.tool_name, request.session_id, request.call_id, request.traceparent)
    )
    common = (arguments is None or not arguments.blobs) and request.timeout_seconds >= 0.0 and within
    if common:
        assert parsed == pb.CallMessage.parse(data)
        assert parsed is not None and bytes(parsed) == data
        assert request_problem(parsed) is None
    else:
        assert parsed is None


@given(st.binary(max_size=80))
def test_parse_execute_of_any_bytes_is_none_or_betterproto2s_and_within_the_limits(data: bytes) -> None:
    parsed = call_messages.parse_execute(data)
    if parsed is not None:
        assert parsed == pb.CallMessage.parse(data)
        assert request_problem(parsed) is None


@given(st.binary(min_size=1, max_size=40), st.integers(0, 60), st.integers(0, 7))
def test_parse_execute_of_a_damaged_request_is_none_or_betterproto2s(noise: bytes, at: int, flip: int) -> None:
    request = pb.ExecuteToolRequest(
        tool_name="echo", arguments=pb.Payload(json=b'{"x": 1}'), session_id="s", call_id="c7", timeout_seconds=2.5,
        session_state_version=300, traceparent="00-ab-cd-01",
    )
    data = bytearray(bytes(pb.CallMessage(execute=request)))
    at %= len(data)
    data[at] ^= 1 << flip
    for damaged in (bytes(data), bytes(data[:at]), bytes(data[:at]) + noise):
        parsed = call_messages.parse_execute(damaged)
        if parsed is not None:
            assert parsed == pb.CallMessage.parse(damaged)
            assert request_problem(parsed) is None


def test_requests_the_limits_refuse_step_aside_to_the_checked_path() -> None:
    long_name = pb.ExecuteToolRequest(tool_name="t" * (MAX_NAME_BYTES + 1), arguments=pb.Payload(json=b"{}"), call_id="c")
    negative = pb.ExecuteToolRequest(tool_name="t", arguments=pb.Payload(json=b"{}"), call_id="c", timeout_seconds=-1.0)
    for request in (long_name, negative):
        data = bytes(pb.CallMessage(execute=request))
        assert call_messages.parse_execute(data) is None
        assert request_problem(pb.CallMessage.parse(data)) is not None
    cancel = bytes(pb.CallMessage(cancel="c1"))
    assert call_messages.parse_execute(cancel) is None  # another member of the oneof: betterproto2's
    fine = pb.ExecuteToolRequest(tool_name="t" * MAX_NAME_BYTES, arguments=pb.Payload(json=b"{}"), call_id="c")
    assert call_messages.parse_execute(bytes(pb.CallMessage(execute=fine))) == pb.CallMessage(execute=fine)


@given(results())
def test_encode_result_is_betterproto2s_encoding(result: pb.CallResult) -> None:
    try:
        expected: bytes | None = bytes(result)
    except UnicodeEncodeError:
        expected = None
    encoded = call_messages.encode_result(result)
    response = result.response
    common = response is not None and response.result is not None and not response.result.blobs and expected is not None
    if common:
        assert encoded == expected
    else:
        assert encoded is None


def test_encode_result_leaves_big_json_and_unknown_fields_to_fast_proto() -> None:
    big = pb.CallResult(call_id="c", response=pb.ExecuteToolResponse(result=pb.Payload(json=b"1" * (64 * 1024))))
    assert call_messages.encode_result(big) is None
    known = pb.CallResult(call_id="c", response=pb.ExecuteToolResponse(result=pb.Payload(json=b"1")))
    assert call_messages.encode_result(known) == bytes(known)
    known._unknown_fields = b"\x18\x01"
    assert call_messages.encode_result(known) is None
