"""The call stream's two messages of every call, encoded and parsed by hand for their common
shape: a ``CallMessage`` carrying an ``ExecuteToolRequest`` whose arguments are JSON only, and a
``CallResult`` whose answer is a JSON-only result. That is most calls, and :mod:`fast_proto`'s
generic walk of betterproto2's field metadata cost each of them several microseconds.

Exact: :func:`encode_execute` gives ``bytes(pb.CallMessage(execute=request))`` byte for byte, and
:func:`parse_result` a message equal to ``pb.CallResult.parse(data)``; any other shape (blobs,
an error, unknown fields, a field twice, bad UTF-8) gets ``None``, and the caller uses
:mod:`fast_proto` (tests compare both with hypothesis).
"""

from __future__ import annotations

import struct
from typing import Any

from trio_bridge._wire import fast_proto
from trio_bridge._wire.fast_proto import read_varint, varint
from trio_bridge._wire.generated.trio_bridge import v1 as pb

__all__ = ["encode_execute", "parse_result"]

_DOUBLE = struct.Struct("<d")
# ExecuteToolRequest's keys: (field number << 3) | wire type
_TOOL, _ARGUMENTS, _SESSION, _CALL_ID, _TIMEOUT, _VERSION, _TRACEPARENT = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x29", b"\x30", b"\x3a"
_EXECUTE = b"\x0a"  # CallMessage.execute
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
    payload = _JSON + varint(len(json)) + json if json else b""
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
    json = b""
    if pos < end:  # Payload.json (field 1), all of the payload
        if view[pos] != 0x0A:
            return None
        size, pos = read_varint(view, pos + 1)
        if size < 0 or pos + size != end:
            return None
        json = view[pos:end].tobytes()
    return pb.CallResult(call_id=call_id, response=pb.ExecuteToolResponse(result=pb.Payload(json=json)))
