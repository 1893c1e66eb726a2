"""The value codec: Python values <-> :class:`Payload` (JSON structure plus raw byte blobs).

Supported values: ``None``, ``bool``, ``int`` (any size), ``float`` (NaN, ±inf and -0.0 survive),
``str``, ``bytes`` (also ``bytearray``/``memoryview``, decoded as ``bytes``), ``list``, ``tuple``
(decoded as ``list``), ``dict`` with ``str`` keys, numpy scalars (decoded as the matching Python
scalar) and numpy arrays of any non-object, non-structured dtype, at any depth.

Conventions inside the JSON document:

* bytes become ``{"\\u0000tb": "b", "i": k}`` and arrays
  ``{"\\u0000tb": "a", "i": k, "d": dtype.str, "s": shape}``, where ``k`` indexes
  ``Payload.blobs``: array data never travels as JSON numbers, and nothing is pickled.
* a user dict that itself has the reserved key ``"\\u0000tb"`` is escaped as
  ``{"\\u0000tb": "d", "v": [[key, value], ...]}``, so no dict is ever mistaken for a tag.
* non-finite floats use Python's JSON extension (``NaN``, ``Infinity``); both ends are Python.

numpy is imported only when a value needs it, which keeps worker start-up light.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from trio_bridge._errors import EncodeError
from trio_bridge._wire.generated.trio_bridge.v1 import Payload

__all__ = ["decode", "encode", "EncodeError"]

_TAG = "\x00tb"
_TAG_IN_JSON = b"\\u0000tb"
_PLAIN = frozenset({str, int, float, bool, type(None)})
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=True, check_circular=False)


class _PathError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        self.segments: list[str] = []


def encode(value: Any, *, path: str = "value") -> Payload:
    """Encode ``value`` into a :class:`Payload`.

    Args:
        value: the value to encode (see the module docstring for what is supported).
        path: how to name the value in an error, e.g. ``"result"`` or ``"arguments"``.

    Raises:
        EncodeError: the value (or something inside it) cannot be encoded; the message names
            the path, e.g. ``result["items"][3]: object of type Foo is not serializable``.
    """
    blobs: list[bytes] = []
    try:
        tree = _prepare(value, blobs, 0)
    except _PathError as exc:
        raise EncodeError(f"{path}{''.join(reversed(exc.segments))}: {exc.message}") from None
    except RecursionError:
        raise EncodeError(f"{path}: nested too deeply (or contains itself)") from None
    return Payload(json=_encoder.encode(tree).encode("ascii"), blobs=blobs)


def decode(payload: Payload | None) -> Any:
    """Decode a :class:`Payload` made by :func:`encode` (``None`` or empty decodes to ``None``).

    Raises:
        ValueError: the payload is malformed (bad JSON, a tag pointing at a missing blob).
    """
    if payload is None or not payload.json:
        return None
    data = payload.json
    if _TAG_IN_JSON not in data:
        return json.loads(data)
    blobs = payload.blobs

    def hook(obj: dict[str, Any]) -> Any:
        kind = obj.get(_TAG)
        if kind is None:
            return obj
        if kind == "b":
            return blobs[obj["i"]]
        if kind == "a":
            import numpy

            dtype = numpy.dtype(obj["d"])
            array = numpy.frombuffer(blobs[obj["i"]], dtype=dtype).reshape(obj["s"])
            return array.copy()  # a writable array the caller owns
        if kind == "d":
            return {key: item for key, item in obj["v"]}
        raise ValueError(f"unknown tag {kind!r} in payload")

    try:
        return json.loads(data, object_hook=hook)
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed payload: {exc}") from exc


def _prepare(value: Any, blobs: list[bytes], depth: int) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is list or kind is tuple:
        if all(type(item) in _PLAIN for item in value):
            return value
        out = []
        for index, item in enumerate(value):
            try:
                out.append(_prepare(item, blobs, depth + 1))
            except _PathError as exc:
                exc.segments.append(f"[{index}]")
                raise
        return out
    if kind is dict:
        return _prepare_dict(value, blobs, depth)
    if kind is bytes or kind is bytearray or kind is memoryview:
        blobs.append(bytes(value))
        return {_TAG: "b", "i": len(blobs) - 1}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return _prepare_array(value, blobs)
        if isinstance(value, numpy.generic):
            return _prepare(value.item(), blobs, depth)
    # Subclasses of the plain types (IntEnum, str subclasses, ...) travel as their base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return _prepare(list(value), blobs, depth)
    if isinstance(value, dict):
        return _prepare_dict(dict(value), blobs, depth)
    raise _PathError(f"object of type {kind.__name__} is not serializable")


def _prepare_dict(value: dict[Any, Any], blobs: list[bytes], depth: int) -> Any:
    out = {}
    for key, item in value.items():
        if type(key) is not str:
            raise _PathError(f"dict keys must be str, not {type(key).__name__} ({key!r})")
        if type(item) in _PLAIN:
            out[key] = item
            continue
        try:
            out[key] = _prepare(item, blobs, depth + 1)
        except _PathError as exc:
            exc.segments.append(f"[{json.dumps(key, ensure_ascii=False)}]")
            raise
    if _TAG in out:
        return {_TAG: "d", "v": [[key, item] for key, item in out.items()]}
    return out


def _prepare_array(array: Any, blobs: list[bytes]) -> dict[str, Any]:
    dtype = array.dtype
    if dtype.hasobject:
        raise _PathError("numpy arrays of dtype object are not serializable (they would need pickle)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _PathError(f"structured numpy dtype {dtype} is not serializable")
    blobs.append(array.tobytes())  # C order, whatever the array's layout
    return {_TAG: "a", "i": len(blobs) - 1, "d": dtype.str, "s": list(array.shape)}
