"""Tool definitions derived from adapter methods, and argument checks before a tool runs."""

from __future__ import annotations

import re

import pytest

from trio_bridge import InvalidArgumentError
from trio_bridge.worker import Adapter, SessionContext, tool
from trio_bridge.worker._adapter import AdapterLoadError, collect_tools, load_adapter_class


class Sample(Adapter):
    @tool(description="Add numbers")
    def add(self, a: int, b: float = 1.5, *, label: str | None = None) -> float:
        return a + b

    @tool
    def documented(self, ctx: SessionContext, text: str, times: int = 2) -> str:
        """Repeat a text.

        Longer explanation that is not the summary.

        Args:
            text: what to repeat.
            times (int): how many times,
                at least one.
        """
        return text * times

    @tool(name="stream-it")
    def gen(self, n: int):
        yield from range(n)

    @tool
    async def agen(self, n: int):
        yield n

    @tool
    async def coro(self, payload: dict, **extra) -> dict:
        return payload

    def not_a_tool(self) -> None:
        pass


def tools():
    return collect_tools(Sample())


def test_tools_are_the_marked_methods_with_their_names():
    assert sorted(tools()) == ["add", "agen", "coro", "documented", "stream-it"]


def test_kinds_and_streaming_flags():
    t = tools()
    assert [(n, t[n].kind, t[n].streaming) for n in sorted(t)] == [
        ("add", "sync", False),
        ("agen", "async_generator", True),
        ("coro", "async", False),
        ("documented", "sync", False),
        ("stream-it", "generator", True),
    ]


def test_each_instance_gets_the_tools_bound_to_itself():
    """Definitions are derived once per class (a fork-server worker inherits them): every instance
    still calls its own methods, and a method set on the instance is derived from itself."""

    class Counter(Adapter):
        def __init__(self, start: int) -> None:
            self.start = start

        @tool
        def value(self, plus: int = 0) -> int:
            return self.start + plus

    first, second = collect_tools(Counter(1)), collect_tools(Counter(10))
    assert (first["value"].function(plus=1), second["value"].function(plus=1)) == (2, 11)
    assert first["value"].parameters == second["value"].parameters

    odd = Counter(100)

    def value(text: str) -> str:  # set on the instance: not the class's method
        return text

    odd.value = value  # type: ignore[method-assign]
    replaced = collect_tools(odd)["value"]
    assert [p.name for p in replaced.parameters] == ["text"] and replaced.function(text="x") == "x"
    assert collect_tools(Counter(5))["value"].function() == 5  # the class's own again


def test_inline_is_a_flag_of_sync_tools_only():
    class Quick(Adapter):
        @tool(inline=True)
        def quick(self, x: int) -> int:
            return x

        @tool
        def threaded(self, x: int) -> int:
            return x

    found = collect_tools(Quick())
    assert (found["quick"].kind, found["quick"].inline, found["threaded"].inline) == ("sync", True, False)
    assert not any(t.inline for t in tools().values())
    for kind, function in [("an async function", Sample.coro), ("a generator", Sample.gen), ("an async generator", Sample.agen)]:
        with pytest.raises(ValueError, match=f"tool 'nope': only a plain sync function can be inline, not {kind}$"):
            tool(name="nope", inline=True)(function)


def test_parameters_come_from_signature_hints_and_docstring():
    add = tools()["add"]
    assert add.description == "Add numbers"
    assert [(p.name, p.type, p.required, p.default) for p in add.parameters] == [
        ("a", "int", True, None),
        ("b", "float", False, 1.5),
        ("label", "str | None", False, None),
    ]
    documented = tools()["documented"]
    assert documented.description == "Repeat a text."
    assert documented.context_parameter == "ctx"
    assert [(p.name, p.description) for p in documented.parameters] == [
        ("text", "what to repeat."),
        ("times", "how many times, at least one."),
    ]


def test_check_arguments_fills_defaults():
    assert tools()["add"].check_arguments({"a": 1}) == {"a": 1, "b": 1.5, "label": None}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "missing required argument(s) 'a'"),
        ({"a": 1, "c": 2}, "unknown argument(s) 'c'; it takes 'a', 'b', 'label'"),
        ({"a": "1"}, "tool 'add': argument 'a': expected an integer, got '1'"),
        ({"a": True}, "argument 'a': expected an integer, got True"),
        ({"a": 1, "b": "x"}, "argument 'b': expected a number, got 'x'"),
        ({"a": 1, "label": 3}, "argument 'label': expected a string, got 3"),
        ([1], "arguments must be a dict"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(arguments, message):
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        tools()["add"].check_arguments(arguments)


def test_int_is_accepted_for_float_and_none_for_optional():
    assert tools()["add"].check_arguments({"a": 1, "b": 2, "label": None})["b"] == 2


def test_var_keyword_tools_accept_unknown_arguments():
    assert tools()["coro"].check_arguments({"payload": {}, "anything": 1}) == {"payload": {}, "anything": 1}


def test_load_adapter_class_errors_are_clear():
    with pytest.raises(AdapterLoadError, match=r"'no_colon_here' is not of the form package\.module:ClassName"):
        load_adapter_class("no_colon_here")
    with pytest.raises(AdapterLoadError, match=r"^cannot import module 'no_such_module_xyz' for adapter .*PYTHONPATH") as info:
        load_adapter_class("no_such_module_xyz:Thing")
    assert not info.value.in_module_code and isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(AdapterLoadError, match=r"module 'tests.test_adapter' has no 'Nope' .*Sample"):
        load_adapter_class("tests.test_adapter:Nope")
    with pytest.raises(AdapterLoadError, match="not a subclass"):
        load_adapter_class("tests.test_adapter:tools")
    assert load_adapter_class("tests.test_adapter:Sample") is Sample


def test_an_adapter_module_whose_own_code_fails_says_so_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no config file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AdapterLoadError, match=r"No module named 'no_such_dependency_xyz' \(a dependency") as info:
        load_adapter_class("needs_missing_dep:Model")
    assert info.value.in_module_code
    with pytest.raises(AdapterLoadError, match=r"RuntimeError: no config file") as info:
        load_adapter_class("raises_on_import:Model")
    assert info.value.in_module_code and isinstance(info.value.__cause__, RuntimeError)
