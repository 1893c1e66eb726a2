"""The value codec: Python values <-> :class:`Payload` (a JSON document plus raw byte blobs).

This is the reference implementation of the payload encoding specified in ``docs/wire.md``.

Supported values: ``None``, ``bool``, ``int`` (any size), ``float`` (NaN, ±inf and -0.0 survive),
``str``, ``bytes`` (also ``bytearray``/``memoryview``, decoded as ``bytes``), ``list``, ``tuple``
(decoded as ``list``), ``dict`` with ``str`` keys, numpy scalars (decoded as the matching Python
scalar) and numpy arrays of any non-object, non-structured dtype, at any depth.

Every document :func:`encode` writes is standard JSON (RFC 8259, ASCII) that a strict parser of
any language reads exactly. What plain JSON cannot carry exactly travels as a *tag*: an object
with the reserved key ``"\\u0000tb"`` whose value says what it stands for:

* ``{"\\u0000tb": "b", "i": k}``: bytes, ``Payload.blobs[k]``.
* ``{"\\u0000tb": "a", "i": k, "d": dtype.str, "s": shape}``: a numpy array whose data (C order)
  is ``blobs[k]``: array data never travels as JSON numbers, and nothing is pickled.
* ``{"\\u0000tb": "m", "n": segment name, "g": generation, "o": offset, "d": dtype.str, "s": shape}``:
  an array of at least the plane's threshold, in shared memory (see ``shared_memory.py``); it
  decodes to a read-only array on the segment, without a copy.
* ``{"\\u0000tb": "n", "h": "-1f..."}``: an int outside ±(2**53 - 1), in hexadecimal, sign first.
  Other languages' JSON parsers round such numbers to a double; and power-of-two bases are exempt
  from Python's int <-> decimal str digit limit (``sys.get_int_max_str_digits()``), so ints of
  any size cross whatever limit either side sets.
* ``{"\\u0000tb": "f", "v": "nan" | "inf" | "-inf"}``: a float JSON has no number for (bare
  ``NaN``/``Infinity`` are not JSON). -0.0 is the JSON number ``-0.0``.
* ``{"\\u0000tb": "d", "v": [[key, value], ...]}``: a user dict that itself has the reserved key,
  so that no dict is ever mistaken for a tag.

Anything :func:`encode` refuses raises :class:`EncodeError` naming the path; never a bare
``ValueError``/``TypeError``/``RecursionError``. :func:`decode` refuses what does not follow
the specification (bare ``NaN``, a malformed tag) with a :class:`ValueError` saying what is wrong.

numpy is imported only when a value needs it, which keeps worker start-up light.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import sys
from typing import Any

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import EncodeError
from trio_bridge._wire import buffers, fast_proto, shared_memory
from trio_bridge._wire.generated.trio_bridge.v1 import Payload
from trio_bridge._wire.shared_memory import SharedMemoryPlane

__all__ = ["DEFAULT_PLANE", "EncodeError", "check", "decode", "encode", "short_repr"]

_TAG = "\x00tb"
_TAG_IN_JSON = "\\u0000tb"  # how the reserved key is spelled in every document (the spec says so)
_PLAIN = frozenset({str, int, float, bool, type(None)})  # int: only inside ±_BIG_INT; floats: see _walk
_BIG_INT = 1 << 53  # doubles hold every int of smaller magnitude exactly: JSON's interoperable range
_REPR_BITS = 2048  # at most 617 decimal digits: under the lowest digit limit Python allows (640)
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_HEX = re.compile(r"-?[0-9a-f]+\Z")
_TYPESTR = re.compile(r"[<>|][biufcmMSUV][0-9]+(\[[0-9]*[A-Za-z]+\])?\Z")  # numpy's dtype.str, no objects


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
        prepared = _prepare(value, out)
        try:
            text = _to_json(prepared)
        except ValueError:  # a NaN or an infinity (allow_nan=False): rare, so tagged in a second pass
            text = _encoder.encode(_tag_floats(prepared))
        return text.encode("ascii")
    except _PathError as exc:
        raise EncodeError(f"{path}{''.join(reversed(exc.segments))}: {exc.message}") from None
    except RecursionError:
        raise EncodeError(f"{path}: nested too deeply (or contains itself)") from None
    except BaseException as exc:  # a broken __iter__/__float__, a released memoryview, ...: never bare
        if not is_failure(exc, ()):  # (a value's method raising StopIteration, a BaseException: its failure)
            raise
        raise EncodeError(f"{path}: cannot be encoded: {_describe(exc)}") from None


def _tag_floats(prepared: Any) -> Any:
    """``prepared`` (what :func:`_prepare` made: plain types, lists, tuples, dicts, tags) with
    every non-finite float tagged; the user's own lists, which it may contain, are not changed."""
    kind = type(prepared)
    if kind is float:
        if prepared - prepared == 0.0:  # finite
            return prepared
        return {_TAG: "f", "v": "nan" if prepared != prepared else "inf" if prepared > 0 else "-inf"}
    if kind is list or kind is tuple:
        return [_tag_floats(item) for item in prepared]
    if kind is dict:
        return {key: _tag_floats(item) for key, item in prepared.items()}
    return prepared


def decode(payload: Payload | None, *, plane: SharedMemoryPlane | None = DEFAULT_PLANE, owned: bool = False) -> Any:
    """Decode a :class:`Payload` made by :func:`encode`, or by any encoder that follows
    ``docs/wire.md`` (``None`` or an empty document decodes to ``None``).

    Args:
        plane: where arrays sent through shared memory are read from (default: the process's).
        owned: the payload is the caller's alone and dropped after this (a received reply or
            request): an in-band array whose blob arrived as a writable buffer of its own (big
            ones do, see ``fast_proto.BIG``) is returned over that buffer, not copied again.

    Raises:
        ValueError: the payload is malformed: not UTF-8, not JSON (bare ``NaN``/``Infinity``
            included), a tag that is unknown or lacks what it needs (the message names the tag
            and the problem), a blob index with no blob, array data that does not fit its dtype
            and shape, a shared-memory reference without a plane or that the plane refuses,
            nesting deeper than the JSON parser allows (CPython's: about 990 levels).
    """
    if payload is None or not payload.json:
        return None
    try:
        text = str(payload.json, "utf-8")  # bytes, or a memoryview (fast_proto: a big field)
    except UnicodeDecodeError as exc:
        raise ValueError(f"malformed payload: the JSON is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if _TAG_IN_JSON not in text:
        try:
            return _from_json(text)
        except RecursionError:
            raise ValueError(_TOO_DEEP) from None
    blobs = payload.blobs
    if plane is DEFAULT_PLANE:
        plane = shared_memory.default_plane

    def hook(obj: dict[str, Any]) -> Any:
        if _TAG not in obj:
            return obj
        kind = obj[_TAG]
        if kind == "b":
            blob = blobs[_blob_index(obj, kind, len(blobs))]
            return blob if type(blob) is bytes else bytes(blob)
        if kind == "f":
            special = obj.get("v")
            if type(special) is not str or special not in _SPECIAL_FLOATS:
                raise _malformed(kind, f'"v" must be "nan", "inf" or "-inf", not {short_repr(special)}')
            return _SPECIAL_FLOATS[special]
        if kind == "n":
            digits = obj.get("h")
            if type(digits) is not str or not _HEX.match(digits):
                raise _malformed(kind, f'"h" must be lowercase hexadecimal digits, sign first, not {short_repr(digits)}')
            return int(digits, 16)  # exempt from the int <-> decimal str digit limit
        if kind == "d":
            return _escaped_dict(obj)
        if kind == "a":
            import numpy

            blob = blobs[_blob_index(obj, kind, len(blobs))]
            dtype, shape, count = _dtype_and_shape(obj, kind)
            if count * dtype.itemsize != len(blob):
                raise _malformed(kind, f"{count} items of dtype {dtype.str} need {count * dtype.itemsize} bytes, its blob has {len(blob)}")
            array = numpy.frombuffer(blob, dtype=dtype, count=count).reshape(shape)
            if owned and type(blob) is memoryview and not blob.readonly:
                return array  # writable, and nothing else refers to its memory
            return array.copy()  # writable, the caller's
        if kind == "m":
            if plane is None:
                raise ValueError("the payload refers to shared memory, but this side has none")
            dtype, shape, _ = _dtype_and_shape(obj, kind)
            name, generation, offset = obj.get("n"), _natural(obj.get("g")), _natural(obj.get("o"))
            if type(name) is not str or generation is None or offset is None:
                found = short_repr([name, obj.get("g"), obj.get("o")])
                raise _malformed(kind, f'"n" must be a str, "g" and "o" ints >= 0, not {found}')
            return plane.read(name, generation, offset, dtype, shape)
        raise ValueError(f"malformed payload: unknown tag {short_repr(kind)}")

    try:
        return json.loads(text, object_hook=hook, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    except (IndexError, KeyError, TypeError, OverflowError) as exc:  # a shape numpy refuses, ...: still a ValueError
        raise ValueError(f"malformed payload: {_describe(exc)}") from exc


_TOO_DEEP = "malformed payload: nested too deeply for this side's JSON parser (docs/wire.md, Limits)"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f'malformed payload: {name} is not JSON (a non-finite float travels as {{"\\u0000tb": "f", "v": ...}})')


_strict = json.JSONDecoder(parse_constant=_refuse_constant)


def _c_encoder() -> Any:
    """``_encoder``'s C encoder, made once: ``JSONEncoder.encode`` makes it on every call, ~1 us
    of a small call's encoding (``json.encoder.c_make_encoder``, the stdlib's accelerator, not in
    its documentation: checked against ``encode`` here). ``None`` where it is missing or differs."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    e = _encoder
    try:
        made = make(None, e.default, json.encoder.encode_basestring_ascii, None, e.key_separator, e.item_separator,
                    e.sort_keys, e.skipkeys, e.allow_nan)
        ok = "".join(made({"a": [1, 2.5, None, True, "\u00e9"]}, 0)) == e.encode({"a": [1, 2.5, None, True, "\u00e9"]})
    except Exception:
        return None
    return made if ok else None


_c_encode = _c_encoder()


def _to_json(value: Any) -> str:
    """``_encoder.encode(value)`` (the same text and errors), through the C encoder made once."""
    if _c_encode is None:
        return _encoder.encode(value)
    return "".join(_c_encode(value, 0))


# The decoder's scanner (what JSONDecoder.raw_decode calls, set by its __init__: the stdlib's, not
# in its documentation, hence looked up and not relied on).
_scan: Any = getattr(_strict, "scan_once", None)


def _from_json(text: str) -> Any:
    """``_strict.decode(text)``: a document that its scanner reads whole from its first
    character is returned at once (no whitespace regexes, ~0.8 us of a small one); anything
    else -- whitespace around it, extra data, an error -- goes through ``decode`` itself, for
    its result and errors."""
    if _scan is None:
        return _strict.decode(text)
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return _strict.decode(text)
    if end != len(text):
        return _strict.decode(text)
    return value


def _malformed(kind: str, problem: str) -> ValueError:
    return ValueError(f"malformed payload: tag {kind!r}: {problem}")


def _natural(value: Any) -> int | None:
    """``value`` if it is an int >= 0 (not a bool), else ``None``."""
    return value if type(value) is int and value >= 0 else None


def _blob_index(obj: dict[str, Any], kind: str, count: int) -> int:
    index = _natural(obj.get("i"))
    if index is None or index >= count:
        raise _malformed(kind, f'"i" must index Payload.blobs (0 to {count - 1}), not {short_repr(obj.get("i"))}')
    return index


def _dtype_and_shape(obj: dict[str, Any], kind: str) -> tuple[Any, list[int], int]:
    """An array tag's dtype, shape and item count."""
    import numpy

    typestr, shape = obj.get("d"), obj.get("s")
    if type(typestr) is not str or not _TYPESTR.match(typestr):
        raise _malformed(kind, f'"d" must be a numpy dtype.str without objects, e.g. "<f8", not {short_repr(typestr)}')
    if type(shape) is not list or not all(_natural(extent) is not None for extent in shape):
        raise _malformed(kind, f'"s" must be a list of ints >= 0, not {short_repr(shape)}')
    try:
        dtype = numpy.dtype(typestr)
    except (TypeError, ValueError) as exc:
        raise _malformed(kind, f'"d": {exc}') from None
    return dtype, shape, math.prod(shape)


def _escaped_dict(obj: dict[str, Any]) -> dict[str, Any]:
    pairs = obj.get("v")
    if type(pairs) is not list or not all(type(p) is list and len(p) == 2 and type(p[0]) is str for p in pairs):
        raise _malformed("d", f'"v" must be a list of [str key, value] pairs, not {short_repr(pairs)}')
    return {key: item for key, item in pairs}


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
            except BaseException as exc:
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
        except BaseException as exc:
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
    if array.nbytes >= fast_proto.BIG:
        import numpy

        # A snapshot (the caller may change the array while it is sent), read-only so the wire
        # layer sends it without another copy; numpy's allocator asks for huge pages for big
        # buffers: 50 MiB took 18 ms against tobytes()' 48 (page faults).
        snapshot: Any = buffers.empty(array.nbytes)  # reused memory: no page faults (buffers.py)
        numpy.copyto(snapshot.view(dtype).reshape(array.shape), array, casting="no")
        snapshot.flags.writeable = False
        view: Any = memoryview(snapshot)  # fast_proto sends read-only byte views as bytes (typed bytes)
        out.blobs.append(view)
    else:
        out.blobs.append(array.tobytes())  # C order, whatever the array's layout
    return {_TAG: "a", "i": len(out.blobs) - 1, "d": dtype.str, "s": list(array.shape)}


def _at(exc: BaseException, segment: str) -> BaseException:
    """``exc`` (raised inside the item at ``segment``) as a :class:`_PathError` that names it;
    a stop (``is_failure``) and a ``RecursionError`` as they are."""
    if isinstance(exc, RecursionError) or not is_failure(exc, ()):
        return exc
    if not isinstance(exc, _PathError):
        exc = _PathError(f"cannot be encoded: {_describe(exc)}")
    exc.segments.append(segment)
    return exc


def _describe(exc: BaseException) -> str:
    text = exception_text(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > _REPR_BITS:  # repr() would raise: the digit limit
            return f"<int of {x.bit_length():,} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return super().repr_instance(x, level)
        except BaseException as failed:
            if not is_failure(failed, ()):
                raise
            return f"<{type(x).__name__} object>"


_short_repr = _ShortRepr()


def short_repr(value: Any) -> str:
    """A short ``repr`` for error messages that never raises: big ints (whose ``repr`` would raise
    for their digit count), long strings and containers are abbreviated; a failing ``__repr__``
    gives ``<Type object>``."""
    try:
        return _short_repr.repr(value)
    except BaseException as failed:
        if not is_failure(failed, ()):
            raise
        return f"<{type(value).__name__} object>"
