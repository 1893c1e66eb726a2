"""The value codec: Python values <-> :class:`Payload` (JSON structure plus raw byte blobs).

Supported values: ``None``, ``bool``, ``int`` (any size, see below), ``float`` (NaN, ±inf and -0.0 survive),
``str``, ``bytes`` (also ``bytearray``/``memoryview``, decoded as ``bytes``), ``list``, ``tuple``
(decoded as ``list``), ``dict`` with ``str`` keys, numpy scalars (decoded as the matching Python
scalar) and numpy arrays of any non-object, non-structured dtype, at any depth.

Conventions inside the JSON document:

* bytes become ``{"\\u0000tb": "b", "i": k}`` and arrays
  ``{"\\u0000tb": "a", "i": k, "d": dtype.str, "s": shape}``, where ``k`` indexes
  ``Payload.blobs``: array data never travels as JSON numbers, and nothing is pickled.
* with a shared-memory plane, arrays of at least its threshold become
  ``{"\\u0000tb": "m", "n": segment name, "g": generation, "o": offset, "d": dtype.str, "s": shape}``
  (see ``shared_memory.py``); they decode to a read-only array on the segment, without a copy.
* a user dict that itself has the reserved key ``"\\u0000tb"`` is escaped as
  ``{"\\u0000tb": "d", "v": [[key, value], ...]}``, so no dict is ever mistaken for a tag.
* non-finite floats use Python's JSON extension (``NaN``, ``Infinity``); both ends are Python.
* an int of more than 2,048 bits becomes ``{"\\u0000tb": "n", "h": "-1f..."}``: its value in
  hexadecimal (sign first). Python refuses int <-> decimal str conversions past
  ``sys.get_int_max_str_digits()`` digits (4,300 by default, settable down to 640, per process);
  power-of-two bases are exempt, and ints up to 2,048 bits (617 digits) stay plain JSON numbers
  under any limit, so either side may lower its limit without breaking the other.

Anything :func:`encode` refuses raises :class:`EncodeError` naming the path; never a bare
``ValueError``/``TypeError``/``RecursionError``.

numpy is imported only when a value needs it, which keeps worker start-up light.
"""

from __future__ import annotations

import json
import reprlib
import sys
from typing import Any

from trio_bridge._errors import EncodeError
from trio_bridge._wire import shared_memory
from trio_bridge._wire.generated.trio_bridge.v1 import Payload
from trio_bridge._wire.shared_memory import SharedMemoryPlane

__all__ = ["DEFAULT_PLANE", "EncodeError", "check", "decode", "encode", "short_repr"]

_TAG = "\x00tb"
_TAG_IN_JSON = b"\\u0000tb"
_PLAIN = frozenset({str, int, float, bool, type(None)})  # int: only up to _BIG_INT in magnitude
_BIG_INT_BITS = 2048  # at most 617 decimal digits: under the lowest limit Python allows (640)
_BIG_INT = 1 << _BIG_INT_BITS
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=True, check_circular=False)


DEFAULT_PLANE: Any = object()  # "the process's default plane"


class _Out:
    __slots__ = ("blobs", "dry", "plane")

    def __init__(self, plane: SharedMemoryPlane | None, dry: bool = False) -> None:
        self.blobs: list[bytes] = []
        self.plane = plane
        self.dry = dry  # only check: copy no data, write no file


class _PathError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        self.segments: list[str] = []


def encode(value: Any, *, path: str = "value", plane: SharedMemoryPlane | None = DEFAULT_PLANE) -> Payload:
    """Encode ``value`` into a :class:`Payload`.

    Args:
        value: the value to encode (see the module docstring for what is supported).
        path: how to name the value in an error, e.g. ``"result"`` or ``"arguments"``.
        plane: where large arrays go (default: the process's default plane, if any).

    Raises:
        EncodeError: the value (or something inside it) cannot be encoded; the message names
            the path, e.g. ``result["items"][3]: object of type Foo is not serializable``.
    """
    out = _Out(shared_memory.default_plane if plane is DEFAULT_PLANE else plane)
    return Payload(json=_walk(value, out, path), blobs=out.blobs)


def check(value: Any, *, path: str = "value") -> None:
    """Raise the :class:`EncodeError` that :func:`encode` would, without copying any data or
    writing any shared-memory file."""
    _walk(value, _Out(None, dry=True), path)


def _walk(value: Any, out: _Out, path: str) -> bytes:
    try:
        return _encoder.encode(_prepare(value, out)).encode("ascii")
    except _PathError as exc:
        raise EncodeError(f"{path}{''.join(reversed(exc.segments))}: {exc.message}") from None
    except RecursionError:
        raise EncodeError(f"{path}: nested too deeply (or contains itself)") from None
    except Exception as exc:  # a broken __iter__/__float__, a released memoryview, ...: never bare
        raise EncodeError(f"{path}: cannot be encoded: {_describe(exc)}") from None


def decode(payload: Payload | None, *, plane: SharedMemoryPlane | None = DEFAULT_PLANE) -> Any:
    """Decode a :class:`Payload` made by :func:`encode` (``None`` or empty decodes to ``None``).

    Args:
        plane: where arrays sent through shared memory are read from (default: the process's).

    Raises:
        ValueError: the payload is malformed (bad JSON, a tag pointing at a missing blob, a
            shared-memory reference without a plane).
    """
    if payload is None or not payload.json:
        return None
    data = payload.json
    if _TAG_IN_JSON not in data:
        return json.loads(data)
    blobs = payload.blobs
    if plane is DEFAULT_PLANE:
        plane = shared_memory.default_plane

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
        if kind == "n":
            return int(obj["h"], 16)  # exempt from the int <-> decimal str digit limit
        if kind == "d":
            return {key: item for key, item in obj["v"]}
        if kind == "m":
            if plane is None:
                raise ValueError("the payload refers to shared memory, but this side has none")
            import numpy

            return plane.read(obj["n"], obj["g"], obj["o"], numpy.dtype(obj["d"]), obj["s"])
        raise ValueError(f"unknown tag {kind!r} in payload")

    try:
        return json.loads(data, object_hook=hook)
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed payload: {exc}") from exc


def _prepare(value: Any, out: _Out) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        if kind is int and not -_BIG_INT < value < _BIG_INT:
            return {_TAG: "n", "h": format(value, "x")}
        return value
    if kind is list or kind is tuple:
        if all(type(item) in _PLAIN and (type(item) is not int or -_BIG_INT < item < _BIG_INT) for item in value):
            return value
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_prepare(item, out))
            except Exception as exc:
                raise _at(exc, f"[{index}]") from None
        return items
    if kind is dict:
        return _prepare_dict(value, out)
    if kind is bytes or kind is bytearray or kind is memoryview:
        out.blobs.append(b"" if out.dry else bytes(value))
        return {_TAG: "b", "i": len(out.blobs) - 1}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            return _prepare_array(value, out)
        if isinstance(value, numpy.generic):
            item = value.item()
            if isinstance(item, numpy.generic):  # longdouble, clongdouble: no Python equivalent
                raise _PathError(f"numpy scalar of type {kind.__name__} is not serializable (put it in an array)")
            return _prepare(item, out)
    # Subclasses of the plain types (IntEnum, str subclasses, ...) travel as their base type.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return _prepare(int(value), out)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)):
        return _prepare(list(value), out)
    if isinstance(value, dict):
        return _prepare_dict(dict(value), out)
    raise _PathError(f"object of type {kind.__name__} is not serializable")


def _prepare_dict(value: dict[Any, Any], out: _Out) -> Any:
    items = {}
    for key, item in value.items():
        if type(key) is not str:
            raise _PathError(f"dict keys must be str, not {type(key).__name__} ({short_repr(key)})")
        if type(item) in _PLAIN and (type(item) is not int or -_BIG_INT < item < _BIG_INT):
            items[key] = item
            continue
        try:
            items[key] = _prepare(item, out)
        except Exception as exc:
            raise _at(exc, f"[{json.dumps(key, ensure_ascii=False)}]") from None
    if _TAG in items:
        return {_TAG: "d", "v": [[key, item] for key, item in items.items()]}
    return items


def _prepare_array(array: Any, out: _Out) -> dict[str, Any] | None:
    dtype = array.dtype
    if dtype.hasobject:
        raise _PathError("numpy arrays of dtype object are not serializable (they would need pickle)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise _PathError(f"structured numpy dtype {dtype} is not serializable")
    if out.dry:
        return None
    if out.plane is not None and array.nbytes >= max(out.plane.threshold, 1):
        name, generation, offset = out.plane.write(array)
        return {_TAG: "m", "n": name, "g": generation, "o": offset, "d": dtype.str, "s": list(array.shape)}
    out.blobs.append(array.tobytes())  # C order, whatever the array's layout
    return {_TAG: "a", "i": len(out.blobs) - 1, "d": dtype.str, "s": list(array.shape)}


def _at(exc: Exception, segment: str) -> Exception:
    """``exc`` (raised inside the item at ``segment``) as a :class:`_PathError` that names it."""
    if isinstance(exc, RecursionError):
        return exc
    if not isinstance(exc, _PathError):
        exc = _PathError(f"cannot be encoded: {_describe(exc)}")
    exc.segments.append(segment)
    return exc


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > _BIG_INT_BITS:  # repr() would raise: the digit limit
            return f"<int of {x.bit_length():,} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return super().repr_instance(x, level)
        except Exception:
            return f"<{type(x).__name__} object>"


_short_repr = _ShortRepr()


def short_repr(value: Any) -> str:
    """A short ``repr`` for error messages that never raises: big ints (whose ``repr`` would raise
    for their digit count), long strings and containers are abbreviated; a failing ``__repr__``
    gives ``<Type object>``."""
    try:
        return _short_repr.repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"
