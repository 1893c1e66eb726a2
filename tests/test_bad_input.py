"""Bad input gets a clear error and changes nothing.

Arbitrary values (ints of any size, NaN and infinities, unhashable and unprintable objects, sets,
numpy arrays of odd dtypes, dicts with non-str keys, ...) are thrown at the codec, the variable
types, the variable store and the session store: only :class:`TrioBridgeError` subclasses may come
out, a refused write leaves everything as it was, and whatever is accepted can be encoded.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_bridge import (
    EncodeError,
    InvalidArgumentError,
    InvalidVariableError,
    SessionExistsError,
    TrioBridgeError,
)
from trio_bridge._state.sessions import SessionStore
from trio_bridge._state.types import TYPES, check_constraints, check_value, values_equal
from trio_bridge._state.variables import VariableStore
from trio_bridge._wire import codec


class Opaque:
    """Neither encodable nor printable."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class Liar(float):
    def __repr__(self) -> str:
        raise ValueError("nor for me")


# (sign, base, exponent): hypothesis reprs its strategies, and repr(10**5000) would raise
_huge = st.sampled_from([(1, 10, 5000), (-1, 10, 9000), (1, 2, 2048), (-1, 2, 2049), (1, 10, 400)]).map(
    lambda t: t[0] * t[1] ** t[2]
)
_odd_objects = st.sampled_from([
    "object", "opaque", "liar", "set", "frozenset", "complex", "object array", "structured array",
    "longdouble", "datetime array", "string array", "bytearray", "empty array", "range", "type",
]).map(lambda name: {
    "object": object(), "opaque": Opaque(), "liar": Liar(1.5), "set": {1, 2}, "frozenset": frozenset({"a"}),
    "complex": 1 + 2j, "object array": np.array([object(), 1], dtype=object),
    "structured array": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]), "longdouble": np.longdouble(1.5),
    "datetime array": np.array(["2020-01-01"], dtype="M8[D]"), "string array": np.array(["a", "bc"]),
    "bytearray": bytearray(b"xy"), "empty array": np.zeros((0, 3)), "range": range(3), "type": int,
}[name])
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), _huge, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10), st.binary(max_size=10), _odd_objects,
    st.sampled_from([0.5, 1, 2, -1, 3.0, "small", "large", "a.b", "float32", "[a-z]+", None]),  # near-valid
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4).map(np.asarray),
)
junk = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none(), st.just("\x00tb")), children, max_size=4),
    ),
    max_leaves=10,
)
_constraint_names = sorted({name for known, _, _ in TYPES.values() for name in known} | {"minimum", ""})
constraints = st.one_of(
    st.none(), junk, st.dictionaries(st.sampled_from(_constraint_names), junk, max_size=3),
)
type_names = st.one_of(st.sampled_from(sorted(TYPES)), junk)

# Valid constraints per type, to check values against.
_VALID = {
    "float": [None, {"min": 0, "max": 2}, {"min": -math.inf, "max": 10**5000}],
    "integer": [None, {"min": -(10**5000), "max": 3}],
    "string": [None, {"min_length": 1, "max_length": 3, "pattern": "[a-z]*", "enum": ["a", "bc"]}],
    "boolean": [None],
    "choice": [{"choices": ["small", "large", 1, 2.5, True]}],
    "module": [None, {"allowed_modules": ["a.b"]}],
    "embedding": [None, {"dimensions": 2}],
    "tensor": [None, {"shape": [None, 2], "dtype": "float64"}],
}
valid_constraints = st.sampled_from([(t, c) for t, cs in _VALID.items() for c in cs])

_settings = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_our_errors(call, *args, **kwargs):
    """Run ``call``; return (result, None) or (None, the TrioBridgeError it raised). Any other
    exception fails the test (pytest shows it)."""
    try:
        return call(*args, **kwargs), None
    except TrioBridgeError as exc:
        str(exc)  # the message itself must be printable
        return None, exc


def assert_encodable(value):
    codec.decode(codec.encode(value, plane=None))


@_settings
@given(junk)
def test_the_codec_raises_only_encode_error_and_check_agrees(value):
    payload, error = only_our_errors(codec.encode, value, path="result", plane=None)
    _, checked = only_our_errors(codec.check, value, path="result")
    if error is None:
        assert checked is None
        codec.decode(payload)
    else:
        assert isinstance(error, EncodeError) and str(error).startswith("result")
        assert type(checked) is EncodeError and str(checked) == str(error)


@_settings
@given(type_names, constraints)
def test_check_constraints_raises_only_invalid_variable_error(type_name, given_constraints):
    normalized, error = only_our_errors(check_constraints, type_name, given_constraints)
    if error is not None:
        assert isinstance(error, InvalidVariableError)
    else:
        assert_encodable(normalized)  # constraints travel to workers too


@_settings
@given(valid_constraints, junk)
def test_check_value_raises_only_invalid_variable_error_and_accepts_only_encodable_values(typed, value):
    type_name, given_constraints = typed
    normalized = check_constraints(type_name, given_constraints)
    result, error = only_our_errors(check_value, type_name, value, normalized)
    if error is not None:
        assert isinstance(error, InvalidVariableError)
    else:
        assert_encodable(result)
        assert values_equal(result, check_value(type_name, result, normalized))  # normalizing is idempotent


def _store() -> VariableStore:
    s = VariableStore(max_value_bytes=10_000)
    for type_name, cs in _VALID.items():
        value = {"float": 1.0, "integer": 3, "string": "a", "boolean": True, "choice": "small", "module": "a.b",
                 "embedding": [1.0, 2.0], "tensor": np.zeros((1, 2))}[type_name]
        s.register(type_name, type_name, value, constraints=cs[-1], metadata={"kind": type_name})
    return s


def _state(s: VariableStore):
    return [(v.name, v.value, v.version, dict(v.metadata), len(s.history(v.name))) for v in s.list()]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and values_equal(x[1], y[1]) and x[2:] == y[2:] for x, y in zip(a, b, strict=True)
    )


@_settings
@given(st.one_of(st.sampled_from(sorted(TYPES)), junk), junk, junk, constraints)
def test_set_variable_raises_only_our_errors_and_a_refused_write_changes_nothing(key, value, metadata, _):
    s = _store()
    before = _state(s)
    result, error = only_our_errors(s.set, key, value, metadata=metadata)
    if error is not None:
        assert _same(_state(s), before)
    else:
        variable, _change = result
        assert_encodable(variable.value)
        assert_encodable(dict(variable.metadata))


@_settings
@given(st.one_of(st.just("fresh"), junk), type_names, junk, constraints, junk)
def test_register_variable_raises_only_our_errors_and_a_refused_one_changes_nothing(name, type_name, value, cs, metadata):
    s = _store()
    before = _state(s)
    variable, error = only_our_errors(s.register, name, type_name, value, constraints=cs, metadata=metadata)
    if error is not None:
        assert _same(_state(s), before)
    else:
        assert variable.version == 0 and len(s) == len(before) + 1
        assert_encodable(variable.value)
        assert_encodable(dict(variable.metadata))
        assert_encodable(dict(variable.constraints))


@_settings
@given(valid_constraints, junk, junk)
def test_atomic_batches_of_junk_change_nothing_when_refused(typed, value, other):
    type_name, _ = typed
    s = _store()
    before = _state(s)
    _, error = only_our_errors(s.set_many, {"float": other, type_name: value}, atomic=True)
    if error is not None:
        assert _same(_state(s), before)


@_settings
@given(st.one_of(st.none(), st.just("ok-id"), junk), st.one_of(st.none(), st.just(60), junk), junk)
def test_session_creation_raises_only_invalid_argument_error_and_a_refused_one_changes_nothing(session_id, ttl, metadata):
    sessions = SessionStore(max_value_bytes=10_000)
    sessions.create("taken", ttl=None, metadata=None, now=0.0)
    record, error = only_our_errors(sessions.create, session_id, ttl=ttl, metadata=metadata, now=0.0)
    if error is not None:
        assert isinstance(error, InvalidArgumentError) and len(sessions) == 1
    else:
        assert len(sessions) == 2
        assert record.ttl is None or (type(record.ttl) is float and 0 < record.ttl < math.inf)
        assert_encodable(record.metadata)
        assert sessions.pop_expired(1e300) in ([], [record])  # no OverflowError in the expiry arithmetic


# ---- sessions: each kind of bad input gets its own message ----
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"session_id": ""}, "invalid session id ''"),
        ({"session_id": "a" * 129}, "invalid session id"),
        ({"session_id": "has space"}, "invalid session id 'has space'"),
        ({"session_id": "trailing\n"}, "invalid session id"),
        ({"session_id": 42}, "invalid session id 42"),
        ({"session_id": ["x"]}, "invalid session id ['x']"),
        ({"ttl": 0}, "ttl must be a positive finite number"),
        ({"ttl": -1.5}, "ttl must be a positive finite number"),
        ({"ttl": math.inf}, "ttl must be a positive finite number"),
        ({"ttl": math.nan}, "ttl must be a positive finite number"),
        ({"ttl": 10**5000}, "ttl must be a positive finite number of seconds or None, not <int of"),
        ({"ttl": True}, "ttl must be a positive number of seconds or None, not bool"),
        ({"ttl": "60"}, "not str '60'"),
        ({"metadata": [1]}, "session metadata must be a dict with str keys, not list"),
        ({"metadata": {1: "x"}}, "invalid session metadata: metadata: dict keys must be str, not int (1)"),
        ({"metadata": {"a": [object()]}}, 'invalid session metadata: metadata["a"][0]: object of type object'),
    ],
)
def test_each_bad_session_argument_is_named_and_is_not_session_exists(kwargs, message):
    sessions = SessionStore()
    sessions.create("taken", ttl=None, metadata=None, now=0.0)
    arguments = {"session_id": "taken", "ttl": None, "metadata": None} | kwargs
    with pytest.raises(InvalidArgumentError, match=re.escape(message)) as info:
        sessions.create(arguments.pop("session_id"), now=0.0, **arguments)
    assert not isinstance(info.value, SessionExistsError)  # the id is taken, but the input is bad first
    assert len(sessions) == 1


def test_a_taken_session_id_is_session_exists_error():
    sessions = SessionStore()
    sessions.create("a:b.c-d_1", ttl=30, metadata={"user": "x"}, now=0.0)
    with pytest.raises(SessionExistsError, match="already exists"):
        sessions.create("a:b.c-d_1", ttl=None, metadata=None, now=0.0)
    assert issubclass(SessionExistsError, InvalidArgumentError)


def test_unhashable_session_ids_are_just_not_found():
    from trio_bridge import SessionNotFoundError

    sessions = SessionStore()
    with pytest.raises(SessionNotFoundError):
        sessions.get(["x"])  # type: ignore[arg-type]
    assert ["x"] not in sessions
    assert sessions.remove({"x": 1}) is None  # type: ignore[arg-type]
