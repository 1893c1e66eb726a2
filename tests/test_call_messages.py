"""call_messages: the call stream's hand-made encoding and parsing agree with betterproto2 byte
for byte and message for message, for the common shapes, and step aside (``None``) for others."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_bridge._wire import call_messages
from trio_bridge._wire.generated.trio_bridge import v1 as pb

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
