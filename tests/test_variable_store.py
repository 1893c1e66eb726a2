"""VariableStore (pure): versions, refused writes that change nothing, batches, history,
rollback, dependencies and optimization locks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_bridge import (
    DependencyCycleError,
    InvalidArgumentError,
    InvalidVariableError,
    QuotaExceededError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from trio_bridge._state.variables import VariableStore
from trio_bridge._wire.codec import decode, encode


def store(**kwargs) -> VariableStore:
    s = VariableStore(**kwargs)
    s.register("temperature", "float", 0.7, constraints={"min": 0, "max": 2})
    s.register("model", "choice", "small", constraints={"choices": ["small", "large"]})
    return s


def test_versions_start_at_zero_and_count_changes():
    s = store()
    assert s.get("temperature").version == 0
    v, change = s.set("temperature", 0.9)
    assert v.version == 1 and change.old_value == 0.7 and change.new_value == 0.9
    assert s.get(v.id).version == 1  # by id too


def test_setting_an_equal_value_changes_nothing():
    s = store()
    v, change = s.set("temperature", 0.7)
    assert change is None and v.version == 0


@given(st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans()))
def test_a_refused_write_leaves_value_and_version(value):
    s = store()
    before = s.get("temperature")
    try:
        s.set("temperature", value)
    except InvalidVariableError:
        after = s.get("temperature")
        assert (after.value, after.version) == (before.value, before.version)
        assert len(s.history("temperature")) == 1
    else:
        assert 0 <= value <= 2


def test_stale_expected_version_is_refused():
    s = store()
    s.set("temperature", 1.0, expected_version=0)
    with pytest.raises(VersionConflictError, match="at version 1, not the expected 0"):
        s.set("temperature", 1.5, expected_version=0)
    assert s.get("temperature").value == 1.0


def test_atomic_batch_with_one_bad_value_changes_nothing():
    s = store()
    with pytest.raises(InvalidVariableError, match="model"):
        s.set_many({"temperature": 1.0, "model": "huge"}, atomic=True)
    assert s.get("temperature").value == 0.7 and s.get("temperature").version == 0
    results, changes = s.set_many({"temperature": 1.0, "model": "large"}, atomic=True)
    assert {n: v.version for n, v in results.items()} == {"temperature": 1, "model": 1} and len(changes) == 2


def test_non_atomic_batch_reports_errors_per_key():
    s = store()
    results, changes = s.set_many({"temperature": 1.0, "model": "huge", "missing": 1}, atomic=False)
    assert results["temperature"].value == 1.0
    assert isinstance(results["model"], InvalidVariableError)
    assert isinstance(results["missing"], VariableNotFoundError)
    assert [c.name for c in changes] == ["temperature"]


def test_list_by_glob_and_delete():
    s = store()
    s.register("temp_max", "float", 1.0)
    assert [v.name for v in s.list("temp*")] == ["temp_max", "temperature"]
    s.delete("temp_max")
    assert [v.name for v in s.list()] == ["model", "temperature"]
    with pytest.raises(VariableNotFoundError):
        s.get("temp_max")


def test_history_is_bounded_and_rollback_makes_a_new_version():
    s = store(history_limit=3)
    for value in (1.0, 1.1, 1.2, 1.3):
        s.set("temperature", value)
    assert [e.version for e in s.history("temperature")] == [2, 3, 4]
    v, _ = s.rollback("temperature", 2)
    assert v.value == 1.1 and v.version == 5
    with pytest.raises(VariableNotFoundError, match="no version 0 in its history"):
        s.rollback("temperature", 0)


def test_dependencies_refuse_cycles():
    s = store()
    s.register("prompt", "string", "hi")
    s.add_dependency("prompt", "temperature")
    s.add_dependency("temperature", "model")
    assert s.get("prompt").depends_on == ("temperature",)
    with pytest.raises(DependencyCycleError):
        s.add_dependency("model", "prompt")
    with pytest.raises(DependencyCycleError):
        s.add_dependency("model", "model")
    s.delete("temperature")
    assert s.get("prompt").depends_on == ()


def test_optimization_lock_refuses_other_writers_until_released():
    s = store()
    s.start_optimization("temperature", "grid")
    with pytest.raises(VariableLockedError, match="'grid'"):
        s.set("temperature", 1.0)
    with pytest.raises(VariableLockedError):
        s.start_optimization("temperature", "other")
    s.set("temperature", 1.0, optimizer_id="grid")
    s.stop_optimization("temperature", "grid")
    assert s.set("temperature", 1.5)[0].version == 2


def test_quotas():
    s = store(max_variables=2, max_value_bytes=1000)
    with pytest.raises(QuotaExceededError, match="max_variables"):
        s.register("third", "boolean", True)
    s2 = VariableStore(max_value_bytes=1000)
    s2.register("t", "tensor", np.zeros(10))
    with pytest.raises(QuotaExceededError, match="over the limit of 1,000"):
        s2.set("t", np.zeros(1000))
    assert s2.get("t").value.shape == (10,)


def test_registration_errors():
    s = store()
    with pytest.raises(InvalidVariableError, match="already exists"):
        s.register("temperature", "float", 1.0)
    with pytest.raises(InvalidVariableError, match="invalid variable name"):
        s.register("has space", "float", 1.0)
    with pytest.raises(InvalidVariableError, match="above the maximum"):
        s.register("t2", "float", 5.0, constraints={"max": 1})


def test_stored_arrays_are_copies():
    s = VariableStore()
    array = np.zeros(3, np.float32)
    s.register("e", "embedding", array)
    array[0] = 9
    assert s.get("e").value[0] == 0


def snapshot(s: VariableStore, name: str):
    v = s.get(name)
    return (v.value, v.version, dict(v.metadata), len(s.history(name)))


def test_an_integer_variable_of_5000_digits_is_stored_and_round_trips():
    s = VariableStore()
    v = s.register("big", "integer", 10**5000, constraints={"min": 0})
    assert decode(encode(v.value)) == 10**5000
    v, _ = s.set("big", 10**5001)
    assert decode(encode(v.value)) == 10**5001 and v.version == 1


def test_a_float_variable_given_a_huge_int_is_refused_and_nothing_changes():
    s = store()
    before = snapshot(s, "temperature")
    with pytest.raises(InvalidVariableError, match="too large for a float"):
        s.set("temperature", 10**5000)
    assert snapshot(s, "temperature") == before
    with pytest.raises(InvalidVariableError, match="too large for a float"):
        s.register("f", "float", 10**5000)
    assert len(s) == 2


class Foo:
    pass


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (["not", "a", "dict"], "metadata must be a dict with str keys, not list"),
        ({1: "x"}, "metadata: dict keys must be str, not int (1)"),
        ({"a": {"b": [Foo()]}}, 'metadata["a"]["b"][0]: object of type Foo is not serializable'),
        ({"s": {1, 2}}, 'metadata["s"]: object of type set'),
    ],
)
def test_metadata_must_be_encodable_on_register_and_on_set(metadata, message):
    s = store()
    with pytest.raises(InvalidVariableError, match=re.escape(message)):
        s.register("x", "float", 1.0, metadata=metadata)
    assert len(s) == 2
    before = snapshot(s, "temperature")
    with pytest.raises(InvalidVariableError, match=re.escape(message)):
        s.set("temperature", 1.5, metadata=metadata)
    assert snapshot(s, "temperature") == before


def test_metadata_is_stored_in_its_wire_form_and_merged_on_set():
    s = VariableStore()
    mine = {"tags": ("a", "b"), "nested": {"n": np.int64(3)}}
    v = s.register("x", "float", 1.0, metadata=mine)
    mine["nested"]["n"] = Foo()  # a later change to the caller's objects is not stored
    assert v.metadata == {"tags": ["a", "b"], "nested": {"n": 3}}
    v, _ = s.set("x", 2.0, metadata={"note": "tuned", "big": 10**5000})
    assert v.metadata == {"tags": ["a", "b"], "nested": {"n": 3}, "note": "tuned", "big": 10**5000}
    encode(dict(v.metadata))


def test_metadata_over_max_value_bytes_is_a_quota_error():
    s = VariableStore(max_value_bytes=100)
    with pytest.raises(QuotaExceededError, match=r"variable 'x' metadata is .* bytes encoded"):
        s.register("x", "float", 1.0, metadata={"blob": "x" * 200})
    assert len(s) == 0


def test_odd_keys_and_arguments_are_clean_errors():
    s = store()
    with pytest.raises(VariableNotFoundError):
        s.get(["unhashable"])
    with pytest.raises(VariableNotFoundError):
        s.set({"a": 1}, 1.0)
    with pytest.raises(InvalidVariableError, match="invalid variable name"):
        s.register("temp\n", "float", 1.0)
    with pytest.raises(InvalidArgumentError):
        s.list(pattern=3)
    with pytest.raises(InvalidArgumentError):
        s.set_many(["temperature"], atomic=True)
    with pytest.raises(VersionConflictError, match="not the expected <int of"):
        s.set("temperature", 1.0, expected_version=10**5000)
