"""Tool results as strict JSON, for people and programs reading them (``trio-bridge run --json``,
``trio-bridge mcp``): not the wire encoding, which keeps every value exactly (``_wire/codec.py``)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any


def strict_json(value: Any, *, indent: int | None = None) -> str:
    """``value`` as one JSON document that any parser reads: dicts (keys as text), lists and
    tuples, numpy arrays (as nested lists) and scalars, bytes (as base64 text), NaN and
    infinities (as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``: jq and most parsers
    refuse them bare); anything else as its ``repr``."""
    return json.dumps(_plain(value), indent=indent, ensure_ascii=False, allow_nan=False, default=repr)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else json.dumps(value)  # json.dumps: NaN, Infinity, -Infinity
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    if not isinstance(value, (str, int)) and callable(getattr(value, "tolist", None)):
        return _plain(value.tolist())  # numpy arrays and scalars
    return value
