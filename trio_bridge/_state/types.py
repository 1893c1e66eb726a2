"""Variable types and their constraints (pure, sans-IO).

Types and constraints (the seeds' ``Snakepit.Bridge.Variables.Types.*``):

========== ================================================ =================================
type       constraints                                      values
========== ================================================ =================================
float      ``min``, ``max``                                 int or float (not bool); NaN and
                                                            ±inf allowed unless min/max say no
integer    ``min``, ``max``                                 int, or a float with no fraction
                                                            (2.0 -> 2); not bool
string     ``min_length``, ``max_length``, ``pattern``      str; ``pattern`` must match the
           (a regex), ``enum`` (allowed strings)            whole string
boolean    (none)                                           bool
choice     ``choices`` (required, non-empty)                one of the choices
module     ``allowed_modules`` (dotted names)               a dotted name, e.g. ``"dspy.Predict"``
embedding  ``dimensions``                                   1-D numeric array or list of numbers
                                                            (-> float64 array unless already an
                                                            array)
tensor     ``shape`` (ints; ``None`` or -1: any size),      numpy array (or nested lists)
           ``dtype`` (e.g. ``"float32"``)
========== ================================================ =================================

Constraints are checked at registration (``min > max`` is refused, a bad regex is refused, an
unknown constraint name is refused), and values are checked on every write. Bad input of any kind
(wrong types, ints too large for a float, unhashable or unprintable objects) raises
:class:`InvalidVariableError`, never a bare ``TypeError``/``ValueError``/``OverflowError``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any, Literal

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import InvalidVariableError
from trio_bridge._wire.codec import short_repr as _r

__all__ = ["TYPES", "VariableType", "check_constraints", "check_value", "values_equal"]

#: The names of the variable types (the keys of :data:`TYPES`).
VariableType = Literal["float", "integer", "string", "boolean", "choice", "module", "embedding", "tensor"]

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # used with fullmatch


def _fail(message: str) -> InvalidVariableError:
    return InvalidVariableError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(constraints: dict[str, Any], type_name: str, integral: bool) -> None:
    for key in ("min", "max"):
        if key in constraints:
            bound = constraints[key]
            if not _is_number(bound) or (isinstance(bound, float) and math.isnan(bound)):
                raise _fail(f"{type_name} constraint {key!r} must be a number, not {_r(bound)}")
            if integral and isinstance(bound, float):
                if not bound.is_integer():  # also refuses ±inf: leave the bound out instead
                    raise _fail(f"integer constraint {key!r} must be a whole number, not {_r(bound)}")
                bound = int(bound)
            constraints[key] = float(bound) if isinstance(bound, float) else int(bound)  # plain, not subclasses
    # int/float comparisons are exact in Python, at any size: no OverflowError here
    if "min" in constraints and "max" in constraints and constraints["min"] > constraints["max"]:
        raise _fail(f"{type_name} constraints: min ({_r(constraints['min'])}) is greater than max ({_r(constraints['max'])})")


def _check_range(value: float, constraints: dict[str, Any], what: str) -> None:
    if "min" in constraints and not value >= constraints["min"]:
        raise _fail(f"{what} {_r(value)} is below the minimum {_r(constraints['min'])}")
    if "max" in constraints and not value <= constraints["max"]:
        raise _fail(f"{what} {_r(value)} is above the maximum {_r(constraints['max'])}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- constraint checkers: normalize and validate a constraints dict ----
def _float_constraints(c: dict[str, Any]) -> None:
    _bound(c, "float", integral=False)


def _integer_constraints(c: dict[str, Any]) -> None:
    _bound(c, "integer", integral=True)


def _string_constraints(c: dict[str, Any]) -> None:
    for key in ("min_length", "max_length"):
        if key in c:
            if not _is_count(c[key]) or c[key] < 0:
                raise _fail(f"string constraint {key!r} must be a whole number >= 0, not {_r(c[key])}")
            c[key] = int(c[key])
    if c.get("min_length", 0) > c.get("max_length", math.inf):
        raise _fail(
            f"string constraints: min_length ({_r(c['min_length'])}) is greater than max_length ({_r(c['max_length'])})"
        )
    if "pattern" in c:
        if not isinstance(c["pattern"], str):
            raise _fail(f"string constraint 'pattern' must be a regular expression string, not {_r(c['pattern'])}")
        c["pattern"] = str(c["pattern"])
        try:
            with warnings.catch_warnings():  # "[[a]": FutureWarning, not our caller's business
                warnings.simplefilter("ignore")
                re.compile(c["pattern"])
        except (re.error, OverflowError, RecursionError, ValueError) as exc:  # "a{99999999999}": OverflowError
            raise _fail(f"string constraint 'pattern' is not a valid regular expression: {exc}") from None
    if "enum" in c:
        if not isinstance(c["enum"], (list, tuple)) or not c["enum"] or not all(isinstance(v, str) for v in c["enum"]):
            raise _fail("string constraint 'enum' must be a non-empty list of strings")
        c["enum"] = [str(v) for v in c["enum"]]


def _choice_constraints(c: dict[str, Any]) -> None:
    choices = c.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise _fail("choice variables need a non-empty 'choices' list")
    if not all(type(v) in (str, int, float, bool) for v in choices):  # exact types: hashable, encodable
        raise _fail("choices must be strings, numbers or booleans")
    c["choices"] = list(choices)


def _module_constraints(c: dict[str, Any]) -> None:
    if "allowed_modules" in c:
        allowed = c["allowed_modules"]
        if not isinstance(allowed, (list, tuple)) or not all(isinstance(m, str) and _DOTTED.fullmatch(m) for m in allowed):
            raise _fail("module constraint 'allowed_modules' must be a list of dotted names like 'dspy.Predict'")
        c["allowed_modules"] = [str(m) for m in allowed]


def _embedding_constraints(c: dict[str, Any]) -> None:
    if "dimensions" in c:
        d = c["dimensions"]
        if not _is_count(d) or d < 1:
            raise _fail(f"embedding constraint 'dimensions' must be a whole number >= 1, not {_r(d)}")
        c["dimensions"] = int(d)


def _tensor_constraints(c: dict[str, Any]) -> None:
    if "shape" in c:
        shape = c["shape"]
        if not isinstance(shape, (list, tuple)) or not all(s is None or (_is_count(s) and s >= -1) for s in shape):
            raise _fail("tensor constraint 'shape' must be a list of sizes (None or -1 for any size)")
        c["shape"] = [None if s is None or s == -1 else int(s) for s in shape]
    if "dtype" in c:
        import numpy

        if not isinstance(c["dtype"], str):  # a name like "float32": it is stored and sent as text
            raise _fail(f"tensor constraint 'dtype' must be a dtype name like 'float32', not {_r(c['dtype'])}")
        try:
            dtype = numpy.dtype(c["dtype"])
        except Exception:  # numpy raises TypeError, ValueError, SyntaxError... for bad specs
            raise _fail(f"tensor constraint 'dtype' is not a numpy dtype: {_r(c['dtype'])}") from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise _fail(f"tensor constraint 'dtype' {_r(c['dtype'])}: object and structured dtypes cannot travel")
        c["dtype"] = dtype.name


# ---- value checkers: return the normalized value ----
def _float_value(v: Any, c: dict[str, Any]) -> float:
    if not _is_number(v):
        raise _fail(f"expected a float, got {type(v).__name__} {_r(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise _fail(f"integer {_r(v)} is too large for a float") from None
    _check_range(v, c, "value")
    return v


def _integer_value(v: Any, c: dict[str, Any]) -> int:
    if isinstance(v, float) and v.is_integer():  # never inf or nan: no OverflowError
        v = int(v)
    if not _is_count(v):
        raise _fail(f"expected an integer, got {type(v).__name__} {_r(v)}")
    v = int(v)  # a plain int (an IntEnum member or numpy-like subclass is stored as its value)
    _check_range(v, c, "value")
    return v


def _string_value(v: Any, c: dict[str, Any]) -> str:
    if not isinstance(v, str):
        raise _fail(f"expected a string, got {type(v).__name__} {_r(v)}")
    v = str(v)
    if len(v) < c.get("min_length", 0):
        raise _fail(f"string of length {len(v)} is shorter than min_length {c['min_length']}")
    if len(v) > c.get("max_length", math.inf):
        raise _fail(f"string of length {len(v)} is longer than max_length {c['max_length']}")
    if "pattern" in c and re.fullmatch(c["pattern"], v) is None:
        raise _fail(f"string {_r(v)} does not match the pattern {_r(c['pattern'])}")
    if "enum" in c and v not in c["enum"]:
        raise _fail(f"string {_r(v)} is not one of {_r(c['enum'])}")
    return v


def _boolean_value(v: Any, c: dict[str, Any]) -> bool:
    if not isinstance(v, bool):
        raise _fail(f"expected a boolean, got {type(v).__name__} {_r(v)}")
    return bool(v)


def _choice_value(v: Any, c: dict[str, Any]) -> Any:
    if not any(type(v) is type(choice) and v == choice for choice in c["choices"]):
        raise _fail(f"{_r(v)} is not one of the choices {_r(c['choices'])}")
    return v


def _module_value(v: Any, c: dict[str, Any]) -> str:
    if not isinstance(v, str) or not _DOTTED.fullmatch(v):
        raise _fail(f"expected a dotted module name like 'dspy.Predict', got {_r(v)}")
    if "allowed_modules" in c and v not in c["allowed_modules"]:
        raise _fail(f"module {_r(v)} is not one of the allowed modules {_r(c['allowed_modules'])}")
    return str(v)


def _embedding_value(v: Any, c: dict[str, Any]) -> Any:
    import numpy

    if isinstance(v, numpy.ndarray):
        array = v
    elif isinstance(v, (list, tuple)) and all(_is_number(x) for x in v):
        try:
            array = numpy.asarray(v, dtype=numpy.float64)
        except OverflowError:
            raise _fail("an embedding's numbers must fit a float64; one is an integer too large") from None
    else:
        raise _fail(f"expected an embedding (a 1-D numeric array or list of numbers), got {type(v).__name__}")
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise _fail(f"an embedding must be a 1-D numeric array, got shape {array.shape} dtype {array.dtype}")
    if "dimensions" in c and array.shape[0] != c["dimensions"]:
        raise _fail(f"embedding has {array.shape[0]} dimensions, expected {c['dimensions']}")
    return array.copy()  # the store owns its value: later changes to the caller's array are not writes


def _tensor_value(v: Any, c: dict[str, Any]) -> Any:
    import numpy

    if isinstance(v, numpy.ndarray):
        array = v
    elif isinstance(v, (list, tuple)):
        try:
            array = numpy.asarray(v)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise _fail(f"expected a tensor (a numpy array or nested lists): {exc}") from None
    else:
        raise _fail(f"expected a tensor (a numpy array or nested lists), got {type(v).__name__}")
    if array.dtype.hasobject:
        raise _fail("a tensor cannot have dtype object")
    if array.dtype.fields is not None or array.dtype.subdtype is not None:
        raise _fail(f"a tensor cannot have a structured dtype ({array.dtype})")
    if "shape" in c:
        shape = c["shape"]
        if array.ndim != len(shape) or any(want is not None and want != got for want, got in zip(shape, array.shape, strict=True)):
            wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise _fail(f"tensor of shape {tuple(array.shape)} does not fit the shape {wanted}")
    if "dtype" in c and array.dtype.name != c["dtype"]:
        raise _fail(f"tensor of dtype {array.dtype.name} is not of dtype {c['dtype']}")
    return array.copy()


_Checker = Callable[[dict[str, Any]], None]
_ValueChecker = Callable[[Any, dict[str, Any]], Any]

TYPES: dict[str, tuple[frozenset[str], _Checker, _ValueChecker]] = {
    "float": (frozenset({"min", "max"}), _float_constraints, _float_value),
    "integer": (frozenset({"min", "max"}), _integer_constraints, _integer_value),
    "string": (frozenset({"min_length", "max_length", "pattern", "enum"}), _string_constraints, _string_value),
    "boolean": (frozenset(), lambda c: None, _boolean_value),
    "choice": (frozenset({"choices"}), _choice_constraints, _choice_value),
    "module": (frozenset({"allowed_modules"}), _module_constraints, _module_value),
    "embedding": (frozenset({"dimensions"}), _embedding_constraints, _embedding_value),
    "tensor": (frozenset({"shape", "dtype"}), _tensor_constraints, _tensor_value),
}


def check_constraints(type_name: str, constraints: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``constraints`` for ``type_name`` and return them normalized (a new dict).

    Raises:
        InvalidVariableError: unknown type, unknown constraint name, or an invalid constraint.
    """
    if not isinstance(type_name, str) or type_name not in TYPES:
        raise _fail(f"unknown variable type {_r(type_name)}; the types are {', '.join(TYPES)}")
    if constraints is None:
        constraints = {}
    if not isinstance(constraints, dict):
        raise _fail(f"constraints must be a dict, not {type(constraints).__name__}")
    known, checker, _ = TYPES[type_name]
    unknown = sorted(_r(key) for key in constraints if key not in known)
    if unknown:
        raise _fail(
            f"unknown constraint(s) {', '.join(unknown)} for type {type_name}; "
            f"known: {', '.join(sorted(known)) or '(none)'}"
        )
    normalized = {str(key): value for key, value in constraints.items()}
    try:
        checker(normalized)
    except InvalidVariableError:
        raise
    except BaseException as exc:  # a safety net: never bare (the user's objects' methods run here too)
        if not is_failure(exc, ()):
            raise
        raise _fail(f"invalid {type_name} constraints: {type(exc).__name__}: {exception_text(exc)}") from None
    return normalized


def check_value(type_name: str, value: Any, constraints: dict[str, Any]) -> Any:
    """Validate ``value`` against a type and its (already checked) constraints.

    Returns:
        The normalized value (``2.0`` for an integer becomes ``2``; a list for an embedding
        becomes a float64 array; arrays are copied).

    Raises:
        InvalidVariableError: the value does not fit; the message says how.
    """
    if not isinstance(type_name, str) or type_name not in TYPES:
        raise _fail(f"unknown variable type {_r(type_name)}; the types are {', '.join(TYPES)}")
    try:
        return TYPES[type_name][2](value, constraints)
    except InvalidVariableError:
        raise
    except BaseException as exc:  # a safety net: never bare (a value's own __str__, __eq__, ... raising)
        if not is_failure(exc, ()):
            raise
        raise _fail(f"{type_name} value {_r(value)} could not be checked: {type(exc).__name__}: {exception_text(exc)}") from None


def values_equal(a: Any, b: Any) -> bool:
    """Whether setting ``b`` over ``a`` changes nothing (NaN equals NaN; arrays compare by dtype,
    shape and bytes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a).__name__ == "ndarray":
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    return bool(a == b)
