"""Variable types and constraints (pure): hypothesis checks that accepted values fit and refused
ones break a stated rule."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trio_bridge import InvalidVariableError
from trio_bridge._state.types import check_constraints, check_value, values_equal

numbers = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True))


@given(value=numbers, low=st.floats(-1e6, 1e6), high=st.floats(-1e6, 1e6))
def test_float_accepts_exactly_the_numbers_within_bounds(value, low, high):
    assume(low <= high)
    constraints = check_constraints("float", {"min": low, "max": high})
    if not math.isnan(value) and low <= value <= high:
        assert check_value("float", value, constraints) == float(value)
    else:
        with pytest.raises(InvalidVariableError):
            check_value("float", value, constraints)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_unconstrained_float_keeps_nan_and_infinities(value):
    result = check_value("float", value, check_constraints("float", None))
    assert values_equal(result, value)


@given(value=st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)), low=st.integers(-100, 0))
def test_integer_takes_whole_numbers_only(value, low):
    constraints = check_constraints("integer", {"min": low})
    whole = isinstance(value, int) or float(value).is_integer()
    if whole and value >= low:
        result = check_value("integer", value, constraints)
        assert type(result) is int and result == value
    else:
        with pytest.raises(InvalidVariableError):
            check_value("integer", value, constraints)


@pytest.mark.parametrize("type_name", ["float", "integer"])
def test_numbers_refuse_bools(type_name):
    with pytest.raises(InvalidVariableError, match="got bool"):
        check_value(type_name, True, {})


@given(st.text(max_size=20), st.integers(0, 10), st.integers(0, 10))
def test_string_lengths(text, low, high):
    assume(low <= high)
    constraints = check_constraints("string", {"min_length": low, "max_length": high})
    if low <= len(text) <= high:
        assert check_value("string", text, constraints) == text
    else:
        with pytest.raises(InvalidVariableError, match=r"min_length|max_length"):
            check_value("string", text, constraints)


def test_string_pattern_must_match_the_whole_string_and_enum_limits_values():
    c = check_constraints("string", {"pattern": r"[a-z]+", "enum": ["abc", "xyz", "ABC"]})
    assert check_value("string", "abc", c) == "abc"
    with pytest.raises(InvalidVariableError, match="does not match the pattern"):
        check_value("string", "ABC", c)
    with pytest.raises(InvalidVariableError, match="is not one of"):
        check_value("string", "def", c)


@given(st.lists(st.one_of(st.text(max_size=3), st.integers(-3, 3)), min_size=1, max_size=5), st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans()))
def test_choice_accepts_only_listed_values_of_the_same_type(choices, value):
    c = check_constraints("choice", {"choices": choices})
    if any(type(value) is type(x) and value == x for x in choices):
        assert check_value("choice", value, c) == value
    else:
        with pytest.raises(InvalidVariableError, match="not one of the choices"):
            check_value("choice", value, c)


def test_module_names_are_dotted_and_may_be_restricted():
    c = check_constraints("module", {"allowed_modules": ["dspy.Predict", "dspy.ChainOfThought"]})
    assert check_value("module", "dspy.Predict", c) == "dspy.Predict"
    for bad, message in (("os.system", "not one of the allowed"), ("not a name", "dotted module name"), (3, "dotted module name")):
        with pytest.raises(InvalidVariableError, match=message):
            check_value("module", bad, c)


def test_embedding_dimensions_and_shape():
    c = check_constraints("embedding", {"dimensions": 3})
    assert check_value("embedding", [1, 2, 3], c).dtype == np.float64
    kept = check_value("embedding", np.ones(3, np.float32), c)
    assert kept.dtype == np.float32
    with pytest.raises(InvalidVariableError, match="has 4 dimensions, expected 3"):
        check_value("embedding", np.ones(4), c)
    with pytest.raises(InvalidVariableError, match="1-D numeric"):
        check_value("embedding", np.ones((3, 1)), c)
    with pytest.raises(InvalidVariableError, match="1-D numeric"):
        check_value("embedding", np.array(["a", "b", "c"]), c)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_tensor_shape_wildcards_and_dtype(shape, data):
    wildcard = data.draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    spec = [None if w else s for s, w in zip(shape, wildcard, strict=True)]
    c = check_constraints("tensor", {"shape": spec, "dtype": "float32"})
    assert check_value("tensor", np.zeros(shape, np.float32), c).shape == tuple(shape)
    with pytest.raises(InvalidVariableError, match="dtype"):
        check_value("tensor", np.zeros(shape, np.float64), c)
    with pytest.raises(InvalidVariableError, match="does not fit the shape"):
        check_value("tensor", np.zeros([*shape, 1], np.float32), c)


@pytest.mark.parametrize(
    ("type_name", "constraints", "message"),
    [
        ("float", {"min": 2, "max": 1}, "min (2) is greater than max (1)"),
        ("integer", {"min": 1.5}, "must be a whole number"),
        ("string", {"min_length": 5, "max_length": 2}, "min_length (5) is greater than max_length (2)"),
        ("string", {"pattern": "("}, "not a valid regular expression"),
        ("choice", {}, "non-empty 'choices'"),
        ("embedding", {"dimensions": 0}, "'dimensions' must be a whole number >= 1"),
        ("tensor", {"dtype": "nonsense"}, "not a numpy dtype"),
        ("float", {"minimum": 0}, "unknown constraint(s) 'minimum' for type float; known: max, min"),
        ("complex", {}, "unknown variable type 'complex'"),
    ],
)
def test_invalid_constraints_are_refused_at_registration(type_name, constraints, message):
    with pytest.raises(InvalidVariableError, match=re.escape(message)):
        check_constraints(type_name, constraints)


def test_values_equal_treats_nan_as_equal_and_compares_arrays_exactly():
    assert values_equal(float("nan"), float("nan"))
    assert values_equal(np.arange(3), np.arange(3))
    assert not values_equal(np.arange(3), np.arange(3).astype(np.float64))
    assert not values_equal(1, 1.0)


# ---- bad input: always InvalidVariableError, never a bare TypeError/ValueError/OverflowError ----
def test_an_integer_too_large_for_a_float_is_refused_cleanly():
    with pytest.raises(InvalidVariableError, match="too large for a float"):
        check_value("float", 10**5000, {})
    with pytest.raises(InvalidVariableError, match="too large"):
        check_value("embedding", [1.0, 10**400], {})


def test_integers_of_any_size_are_checked_exactly_and_reported_without_their_digits():
    c = check_constraints("integer", {"min": 0, "max": 10**5000})
    assert check_value("integer", 10**5000, c) == 10**5000
    with pytest.raises(InvalidVariableError, match=r"<int of 16,610 bits> is below the minimum 0"):
        check_value("integer", -(10**5000), c)
    with pytest.raises(InvalidVariableError, match=r"value 1e\+300 is below the minimum <int of 16,610 bits>"):
        check_value("float", 1e300, check_constraints("float", {"min": 10**5000}))  # exact int/float comparison
    with pytest.raises(InvalidVariableError, match="expected a string, got int <int of"):
        check_value("string", 10**5000, {})
    with pytest.raises(InvalidVariableError, match="is greater than max"):
        check_constraints("float", {"min": 10**5000, "max": 1e308})


def test_infinite_bounds_are_fine_for_floats_and_refused_for_integers():
    c = check_constraints("float", {"min": float("-inf"), "max": float("inf")})
    assert check_value("float", float("inf"), c) == float("inf")
    with pytest.raises(InvalidVariableError, match="must be a whole number"):
        check_constraints("integer", {"max": float("inf")})
    with pytest.raises(InvalidVariableError, match="must be a number"):
        check_constraints("float", {"max": float("nan")})


@pytest.mark.parametrize(
    ("type_name", "constraints", "message"),
    [
        ("string", {"pattern": "a{99999999999}"}, "not a valid regular expression"),  # re: OverflowError
        ("string", {"pattern": b"abc"}, "must be a regular expression string"),
        ("string", {"max_length": 2.5}, "must be a whole number >= 0"),
        ("choice", {"choices": [[1], {"a": 1}]}, "strings, numbers or booleans"),  # unhashable
        ("tensor", {"dtype": "i4,i4"}, "structured dtypes cannot travel"),
        ("tensor", {"dtype": object}, "must be a dtype name"),
        ("tensor", {"dtype": "O"}, "object and structured dtypes cannot travel"),
        ("tensor", {"dtype": "(("}, "not a numpy dtype"),
        ("float", {1: 0, "max": 1}, "unknown constraint(s) 1 for type float"),  # mixed key types
        ("float", {10**5000: 0, None: 1}, "unknown constraint(s)"),
        (["float"], {}, "unknown variable type ['float']"),  # unhashable type name
        ("module", {"allowed_modules": ["os.path\n"]}, "dotted names"),
    ],
)
def test_bad_constraints_are_invalid_variable_errors(type_name, constraints, message):
    with pytest.raises(InvalidVariableError, match=re.escape(message)):
        check_constraints(type_name, constraints)


def test_bad_values_of_odd_kinds_are_invalid_variable_errors():
    for type_name, value in (
        ("tensor", [[1, 2], [3]]), ("tensor", [{"a": 1}]), ("tensor", [10**5000]),
        ("tensor", np.zeros(2, dtype=[("x", "i4")])), ("embedding", np.array([object()])),
        ("module", "dspy.Predict\n"), ("choice", {1, 2}), ("string", object()),
    ):
        constraints = check_constraints(type_name, {"choices": [1]} if type_name == "choice" else None)
        with pytest.raises(InvalidVariableError):
            check_value(type_name, value, constraints)
    with pytest.raises(InvalidVariableError, match="unknown variable type"):
        check_value({"unhashable": 1}, 1, {})
