"""The call stream's two messages of every call, encoded and parsed by hand for their common
shape: a ``CallMessage`` carrying an ``ExecuteToolRequest`` whose arguments are JSON only, and a
``CallResult`` whose answer is a JSON-only result. That is most calls, and :mod:`fast_proto`'s
generic walk of betterproto2's field metadata cost each of them several microseconds (on the
worker, with :func:`trio_bridge._wire.limits.request_problem`'s walk: decoding and checking a
request took 7-9 µs, 4-5 µs by hand).

Exact, both ways: the host's :func:`encode_execute` and the worker's :func:`encode_result` give
betterproto2's encoding byte for byte; the worker's :func:`parse_execute` and the host's
:func:`parse_result` a message equal to betterproto2's ``parse``. Any other shape (blobs, an error,
unknown fields, a field twice or out of order, bad UTF-8, a request over a limit) gets ``None``,
and the caller uses :mod:`fast_proto` (and, on the worker, the limits' checks and their
refusals); tests compare both with hypothesis.
"""

from __future__ import annotations

import struct
from typing import Any

from trio_bridge._wire import fast_proto
from trio_bridge._wire.contract import MAX_NAME_BYTES
from trio_bridge._wire.fast_proto import read_varint, varint
from trio_bridge._wire.generated.trio_bridge import v1 as pb

__all__ = ["encode_execute", "encode_result", "parse_execute", "parse_result"]

_DOUBLE = struct.Struct("<d")
# ExecuteToolRequest's keys: (field number << 3) | wire type
_TOOL, _ARGUMENTS, _SESSION, _CALL_ID, _TIMEOUT, _VERSION, _TRACEPARENT = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x29", b"\x30", b"\x3a"
_EXECUTE = b"\x0a"  # CallMessage.execute
_CALL_ID_OF_RESULT, _RESPONSE, _RESULT = b"\x0a", b"\x12", b"\x0a"  # CallResult.call_id, .response; ExecuteToolResponse.result
_JSON = b"\x0a"  # Payload.json
_MOST_JSON = 64 * 1024  # bytes of JSON arguments this module encodes (more: fast_proto's parts, no copy)


def encode_execute(request: pb.ExecuteToolRequest) -> bytes | None:
    """``bytes(pb.CallMessage(execute=request))``, for a request whose fields have their own
    types, whose arguments are JSON only (under 64 KiB), and that has no unknown fields; else ``None``."""
    arguments = request.arguments
    if arguments is None or arguments.blobs or arguments._unknown_fields or request._unknown_fields:
        return None
    json = arguments.json
    timeout, version = request.timeout_seconds, request.session_state_version
    if type(json) is not bytes or type(timeout) is not float or type(version) is not int or version < 0:
        return None
    if len(json) >= _MOST_JSON:  # fast_proto sends it without copying it; joined here, it would be copied
        return None
    try:
        tool, session_id, call_id, traceparent = (
            _string(request.tool_name), _string(request.session_id), _string(request.call_id), _string(request.traceparent),
        )
    except (TypeError, UnicodeEncodeError):
        return None
    payload = _payload(json)
    parts = [
        _TOOL, varint(len(tool)), tool, _ARGUMENTS, varint(len(payload)), payload,
        _SESSION, varint(len(session_id)), session_id, _CALL_ID, varint(len(call_id)), call_id,
    ]
    if not tool:  # betterproto2 leaves out a value equal to its default
        parts[0:3] = []
    if not session_id:
        parts[-6:-3] = []
    if not call_id:
        parts[-3:] = []
    if timeout != 0.0:
        parts += (_TIMEOUT, _DOUBLE.pack(timeout))
    if version:
        parts += (_VERSION, varint(version))
    if traceparent:
        parts += (_TRACEPARENT, varint(len(traceparent)), traceparent)
    body = b"".join(parts)
    return _EXECUTE + varint(len(body)) + body


def _payload(json: bytes) -> bytes:
    """A Payload of ``json`` alone, encoded (empty: betterproto2 leaves out a default value)."""
    return _JSON + varint(len(json)) + json if json else b""


def _payload_json(view: bytes | memoryview, pos: int, stop: int) -> bytes | None:
    """The JSON of the Payload encoded in ``view[pos:stop]`` if it holds nothing else (an empty
    one: ``b""``); else ``None``."""
    if pos == stop:
        return b""
    if view[pos] != 0x0A:  # Payload.json (field 1), all of the payload
        return None
    size, pos = read_varint(view, pos + 1)
    if size < 0 or pos + size != stop:
        return None
    return bytes(view[pos:stop])


def _string(text: Any) -> bytes:
    if type(text) is not str:
        raise TypeError
    return text.encode()


def parse_result(view: memoryview) -> pb.CallResult | None:
    """``pb.CallResult.parse(view)`` for the common answer, ``call_id`` then a result of JSON
    only (``view``: a byte memoryview); ``None`` for any other (see the module doc)."""
    end = len(view)
    # call_id (field 1); a big message's values come as fast_proto makes them
    if end < 2 or end >= fast_proto.BIG or view[0] != 0x0A:
        return None
    size, pos = read_varint(view, 1)
    stop = pos + size
    if size < 0 or stop > end:
        return None
    try:
        call_id = str(view[pos:stop], "utf-8")
    except UnicodeDecodeError:
        return None
    # response (field 2): an ExecuteToolResponse that is all of the rest
    if stop >= end or view[stop] != 0x12:
        return None
    size, pos = read_varint(view, stop + 1)
    if size < 0 or pos + size != end:
        return None
    # its result (field 1): a Payload that is all of the response
    if pos >= end or view[pos] != 0x0A:
        return None
    size, pos = read_varint(view, pos + 1)
    if size < 0 or pos + size != end:
        return None
    json = _payload_json(view, pos, end)
    if json is None:
        return None
    return pb.CallResult(call_id=call_id, response=pb.ExecuteToolResponse(result=pb.Payload(json=json)))


# parse_execute: each key ExecuteToolRequest's fields may come with (one byte each), by field number
_REQUEST_KEYS = {key[0]: key[0] >> 3 for key in (_TOOL, _ARGUMENTS, _SESSION, _CALL_ID, _TIMEOUT, _VERSION, _TRACEPARENT)}
_TOOL_FIELD, _ARGUMENTS_FIELD, _SESSION_FIELD, _CALL_ID_FIELD, _TIMEOUT_FIELD, _VERSION_FIELD = range(1, 7)
_UINT64_END = 1 << 64


def parse_execute(data: bytes | memoryview) -> pb.CallMessage | None:
    """``pb.CallMessage.parse(data)`` for the common request, a ``CallMessage`` whose ``execute``
    has its fields in order, each once, arguments of JSON only, and nothing over the limits that
    :func:`trio_bridge._wire.limits.request_problem` checks (so a message this returns passes
    them); ``None`` for any other (see the module doc)."""
    if type(data) is not bytes and type(data) is not memoryview:
        return None
    end = len(data)
    if end < 2 or end >= fast_proto.BIG or data[0] != 0x0A:
        return None
    size, pos = read_varint(data, 1)
    if size < 0 or pos + size != end:
        return None
    tool = session_id = call_id = traceparent = ""
    arguments: pb.Payload | None = None
    timeout, version, last = 0.0, 0, 0
    while pos < end:
        number = _REQUEST_KEYS.get(data[pos], 0)
        if number <= last:  # unknown, another wire type, out of order or twice: betterproto2's
            return None
        last = number
        pos += 1
        if number == _TIMEOUT_FIELD:  # a double
            if pos + 8 > end:
                return None
            (timeout,) = _DOUBLE.unpack_from(data, pos)
            if not timeout >= 0.0:  # NaN or negative: the limits' refusal
                return None
            pos += 8
            continue
        if number == _VERSION_FIELD:  # a varint
            version, pos = read_varint(data, pos)
            if not 0 <= version < _UINT64_END:
                return None
            continue
        size, pos = read_varint(data, pos)
        stop = pos + size
        if size < 0 or stop > end:
            return None
        if number == _ARGUMENTS_FIELD:
            json = _payload_json(data, pos, stop)
            if json is None:
                return None
            arguments = pb.Payload(json=json)
        else:
            if size > MAX_NAME_BYTES:  # the limits' refusal
                return None
            try:
                text = str(data[pos:stop], "utf-8")
            except UnicodeDecodeError:
                return None
            if number == _TOOL_FIELD:
                tool = text
            elif number == _SESSION_FIELD:
                session_id = text
            elif number == _CALL_ID_FIELD:
                call_id = text
            else:
                traceparent = text
        pos = stop
    return pb.CallMessage(
        execute=pb.ExecuteToolRequest(
            tool_name=tool, arguments=arguments, session_id=session_id, call_id=call_id, timeout_seconds=timeout,
            session_state_version=version, traceparent=traceparent,
        )
    )


def encode_result(result: pb.CallResult) -> bytes | None:
    """``bytes(result)`` for the common answer: a result of JSON only (under 64 KiB), with no
    unknown fields; else ``None``."""
    response = result.response
    if response is None or result._unknown_fields or response._unknown_fields:
        return None
    payload = response.result
    if payload is None or payload.blobs or payload._unknown_fields:
        return None
    json = payload.json
    if type(json) is not bytes or len(json) >= _MOST_JSON:
        return None
    try:
        call_id = _string(result.call_id)
    except (TypeError, UnicodeEncodeError):
        return None
    inner = _payload(json)
    answer = _RESULT + varint(len(inner)) + inner  # a oneof's member is sent even when empty
    body = _RESPONSE + varint(len(answer)) + answer
    return _CALL_ID_OF_RESULT + varint(len(call_id)) + call_id + body if call_id else body
