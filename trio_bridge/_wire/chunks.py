"""A stream's chunks on the wire: the chunks ready at once travel as one message, encoded together
as one list (``ToolChunkBatch.chunks``, a single :class:`Payload`).

Why one payload and not one per chunk: parsing a nested message per chunk cost more than the
chunk itself (betterproto2 parses in Python); one JSON list decodes in a single ``json.loads``.
"""

from __future__ import annotations

from typing import Any

from trio_bridge._errors import EncodeError
from trio_bridge._wire.codec import DEFAULT_PLANE, check, decode, encode
from trio_bridge._wire.generated.trio_bridge.v1 import Payload


def encode_batch(items: list[Any], first: int, *, plane: Any = DEFAULT_PLANE) -> tuple[Payload | None, EncodeError | None]:
    """The chunks numbered ``first``, ``first + 1``, ... as one payload (``None`` when there are
    none). If one cannot be encoded: the payload of those before it, and the error, naming
    ``chunk[n]`` (``n`` counted from the stream's start)."""
    try:
        return (encode(items, path="chunks", plane=plane) if items else None), None
    except EncodeError:
        for k, item in enumerate(items):
            try:
                check(item, path=f"chunk[{first + k}]")
            except EncodeError as exc:
                return (encode(items[:k], path="chunks", plane=plane) if k else None), exc
        raise  # the batch failed but no chunk alone does: cannot happen (a list adds nothing)


def decode_batch(payload: Payload | None, *, plane: Any = DEFAULT_PLANE) -> list[Any]:
    """The chunks of one message, in order (``[]`` for none).

    Raises:
        ValueError: the payload is malformed, or not a list.
    """
    items = decode(payload, plane=plane, owned=True)
    if items is None:
        return []
    if type(items) is not list:
        raise ValueError(f"malformed chunk batch: a {type(items).__name__}, not a list")
    return items
