"""Tools described for LLM programs: each tool's arguments as JSON Schema (made by pydantic from
the annotations the argument check uses, so the two agree), and ``Pool.tools(format=...)`` in the
shapes the OpenAI, Anthropic and MCP APIs take."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import jsonschema
import numpy as np
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_bridge
from tests.helpers import require
from trio_bridge import InvalidArgumentError, ToolNotFoundError
from trio_bridge._core.tools import NUMERIC_ARRAY_REF, ToolDefinition, define_tool
from trio_bridge._host._tools import tool_info
from trio_bridge._wire.generated.trio_bridge import v1 as pb
from trio_bridge._wire.tool_spec import tool_spec
from trio_bridge.testing import open_pool_in_threads

ECHO = "tests.adapters:Echo"
AGENT = "tests.tool_adapters:Agent"
Validator = jsonschema.Draft202012Validator


def fits_schema(schema: dict[str, Any], arguments: Any) -> bool:
    return Validator(schema).is_valid(arguments)


def fits_check(definition: ToolDefinition, arguments: Any) -> bool:
    try:
        definition.check_arguments(arguments)
    except InvalidArgumentError:
        return False
    return True


# ---- the schemas of the test adapters' tools, as the pool reports them ----
@pytest.mark.parametrize("adapter", [ECHO, AGENT])
async def test_every_tool_has_a_valid_json_schema_of_its_arguments_object(adapter: str) -> None:
    async with open_pool_in_threads(adapter, size=1) as pool:
        tools = pool.tools()
    assert tools
    for info in tools:
        schema = info.parameters_schema
        Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert set(schema["properties"]) == {p.name for p in info.parameters}, info.name
        assert schema["required"] == [p.name for p in info.parameters if p.required]
        assert schema["additionalProperties"] is False
        assert "ctx" not in schema["properties"]  # the SessionContext parameter is no argument


#: The JSON Schema of tests.adapters:Echo's ``add(a: int, b: int = 2)``, from its signature and docstring.
ADD_SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "description": "the first term."},
        "b": {"type": "integer", "description": "the second term.", "default": 2},
    },
    "required": ["a"],
    "additionalProperties": False,
}


async def test_echo_schemas_say_types_descriptions_and_defaults() -> None:
    async with open_pool_in_threads(ECHO, size=1) as pool:
        tools = {t.name: t.parameters_schema for t in pool.tools()}
    assert tools["add"] == ADD_SCHEMA
    assert tools["echo"]["properties"] == {"value": {"default": None}}  # object: any value
    assert tools["environment"]["properties"] == {"name": {"type": "string"}}
    assert tools["pid"] == {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
    assert tools["count"]["properties"]["delay"] == {"type": "number", "default": 0.0}


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("add", {"a": 1}), ("add", {"a": 1, "b": -(10**30)}), ("add", {"a": "1"}), ("add", {"a": 1.5}),
        ("add", {"a": True}), ("add", {}), ("add", {"a": 1, "c": 3}), ("add", {"a": None}),
        ("sleep", {"seconds": 1}), ("sleep", {"seconds": 0.5}), ("sleep", {"seconds": "0.5"}),
        ("environment", {"name": "HOME"}), ("environment", {"name": 3}), ("echo", {"value": {"any": [1, "x"]}}),
        ("echo", {}), ("count", {"n": 3, "delay": 0}), ("count", {"n": 3, "delay": None}), ("pid", {"x": 1}),
    ],
)
async def test_the_schema_and_the_pools_own_check_agree(tool: str, arguments: dict[str, Any]) -> None:
    async with open_pool_in_threads(ECHO, size=1) as pool:
        schema = next(t.parameters_schema for t in pool.tools() if t.name == tool)
        try:
            if tool == "count":
                async with pool.stream(tool, arguments) as chunks:
                    [c async for c in chunks]
            elif tool != "sleep":  # (the check runs before the tool: sleeping is not needed)
                await pool.execute(tool, arguments)
            else:
                await pool.execute("add", {"a": 1})  # warm; then the check alone, as the worker runs it
                from tests.adapters import Echo
                from trio_bridge.worker._adapter import collect_tools

                collect_tools(Echo())["sleep"].check_arguments(arguments)
            accepted = True
        except InvalidArgumentError:
            accepted = False
    assert fits_schema(schema, arguments) == accepted


# ---- in depth, against the check itself ----
class Point(pydantic.BaseModel):
    """A point on the grid."""

    x: int
    y: int = 0


def rich(
    x: list[float],
    weights: dict[str, int] | None = None,
    scale: float | None = None,
    mode: int | str = 0,
    pair: tuple[int, int] = (0, 0),
    kind: Literal["fast", "slow"] = "fast",
    nested: list[dict[str, list[int | None]]] | None = None,
    count: Annotated[int, pydantic.Field(ge=0)] = 0,
    flag: bool = False,
    sloppy: float = None,  # noqa: RUF013 - the common spelling: the check lets None through
):
    """A tool with rich annotations.

    Args:
        x: the values.
        count: how many, at least 0.
    """


@pytest.fixture(scope="module")
def rich_tool() -> ToolDefinition:
    return define_tool(rich, "rich", None)


def test_rich_annotations_are_described(rich_tool: ToolDefinition) -> None:
    schema = rich_tool.parameters_schema
    Validator.check_schema(schema)
    properties = schema["properties"]
    assert properties["x"] == {"type": "array", "items": {"type": "number"}, "description": "the values."}
    assert properties["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "integer"}]
    assert properties["pair"]["default"] == [0, 0]  # a tuple default, as JSON has it
    assert properties["kind"]["enum"] == ["fast", "slow"]
    assert properties["count"]["minimum"] == 0 and properties["count"]["description"] == "how many, at least 0."
    assert {"type": "null"} in properties["sloppy"]["anyOf"]


# JSON values, as an LLM or an MCP client sends them. Integral floats are left out: JSON Schema
# counts 1.0 as an integer, the check (strict: no float for an int) does not.
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.sampled_from(["fast", "slow", "", "x"])
)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "k", "x"]), inner, max_size=3), max_leaves=12)
_names = ["x", "weights", "scale", "mode", "pair", "kind", "nested", "count", "flag", "sloppy"]


@st.composite
def _arguments(draw: st.DrawFn) -> dict[str, Any]:
    typed = {
        "x": st.lists(st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()), max_size=3),
        "weights": st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        "pair": st.lists(st.integers(), min_size=1, max_size=3),
        "nested": st.lists(st.dictionaries(st.text(max_size=1), st.lists(st.none() | st.integers() | st.just("z"), max_size=2), max_size=2), max_size=2),
        "count": st.integers(-3, 3),
    }
    names = draw(st.lists(st.sampled_from([*_names, "unknown"]), unique=True, max_size=4))
    if draw(st.integers(0, 9)):  # mostly with the required one
        names.append("x")
    arguments = {}
    for name in names:
        arguments[name] = draw(typed[name] if name in typed and draw(st.integers(0, 3)) else _json)
    return arguments


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arguments=_arguments())
def test_schema_and_check_agree_on_any_json_arguments(rich_tool: ToolDefinition, arguments: dict[str, Any]) -> None:
    assert fits_schema(rich_tool.parameters_schema, arguments) == fits_check(rich_tool, arguments), arguments


# ---- what JSON cannot say exactly ----
class Opaque:
    pass


def test_numpy_arrays_are_nested_lists_of_numbers_and_say_so() -> None:
    def f(image: np.ndarray, batch: list[np.ndarray] | None = None):
        """F.

        Args:
            image: the picture.
        """

    schema = define_tool(f, "f", None).parameters_schema
    Validator.check_schema(schema)
    image = schema["properties"]["image"]
    assert image["type"] == "array" and image["items"] == {"$ref": NUMERIC_ARRAY_REF}
    assert "nested lists of numbers" in image["description"] and image["description"].startswith("the picture.")
    assert "nested lists of numbers" in schema["properties"]["batch"]["description"]
    for good in ([[1, 2.5], [3, 4]], [1, 2], [[[0]]]):
        assert fits_schema(schema, {"image": good})
    for bad in ("abc", 3, [["a"]], [True]):
        assert not fits_schema(schema, {"image": bad})


def test_a_parameter_pydantic_cannot_describe_takes_any_value_and_says_so() -> None:
    def f(thing: Opaque, later: NotDefinedAnywhere = None, **options: Any):  # type: ignore[name-defined] # noqa: F821
        """F."""

    schema = define_tool(f, "f", None).parameters_schema
    Validator.check_schema(schema)
    assert set(schema["properties"]["thing"]) == {"description"}
    assert "no JSON Schema" in schema["properties"]["thing"]["description"]
    assert "Opaque" in schema["properties"]["thing"]["description"]
    assert "no JSON Schema" in schema["properties"]["later"]["description"]
    assert "additionalProperties" not in schema  # **options: any other name is fine
    assert fits_schema(schema, {"thing": 1, "other": 2})


def test_two_different_models_of_one_name_keep_their_own_definitions() -> None:
    first = pydantic.create_model("Point", x=(int, ...))
    second = pydantic.create_model("Point", label=(str, ...))

    def f(a, b):
        pass

    f.__annotations__ = {"a": list[first], "b": list[second]}  # (string annotations would not resolve here)

    schema = define_tool(f, "f", None).parameters_schema
    Validator.check_schema(schema)
    assert len(schema["$defs"]) == 2
    assert fits_schema(schema, {"a": [{"x": 1}], "b": [{"label": "p"}]})
    assert not fits_schema(schema, {"a": [{"x": 1}], "b": [{"label": 3}]})
    assert not fits_schema(schema, {"a": [{"x": "1"}], "b": [{"label": "p"}]})


def test_schemas_are_built_once_per_annotation() -> None:
    def f(a: dict[str, list[float]]):
        pass

    def g(b: dict[str, list[float]]):
        pass

    one, two = define_tool(f, "f", None), define_tool(g, "g", None)
    assert one.parameters[0].schema is two.parameters[0].schema  # shared, like the validators
    one.parameters_schema["properties"]["a"]["description"] = "changed"  # a tool's copy is its own
    assert "description" not in define_tool(g, "g", None).parameters_schema["properties"]["b"]


def test_the_schema_travels_in_the_tool_spec_and_an_old_peers_spec_gets_a_loose_one() -> None:
    definition = define_tool(rich, "rich", None)
    assert tool_info(tool_spec(definition)).parameters_schema == definition.parameters_schema
    old = tool_spec(definition)
    old.parameters_json_schema = ""  # a worker of a release before the field
    loose = tool_info(old).parameters_schema
    Validator.check_schema(loose)
    assert loose["required"] == ["x"] and loose["properties"]["x"] == {"description": "the values."}
    assert loose["properties"]["pair"]["default"] == [0, 0]
    assert tool_info(pb.ToolSpec(name="t", parameters_json_schema="not json")).parameters_schema["type"] == "object"


# ---- Pool.tools(format=...) ----
def _register(pool: trio_bridge.Pool) -> None:
    @pool.host_tool
    async def lookup(word: str, limit: int = 3) -> list[str]:
        """Find words.

        Args:
            word: the word to look up.
        """
        return [f"{word}-{i}" for i in range(limit)]

    @pool.host_tool
    def tail(n: int):
        """The last lines."""
        yield from range(n)

    @pool.host_tool(name="pid")
    def host_pid() -> str:  # named like a worker tool: the worker tool wins
        return "host"


async def test_openai_anthropic_and_mcp_shapes() -> None:
    async with open_pool_in_threads(ECHO, size=1) as pool:
        _register(pool)
        infos = {t.name: t for t in pool.tools() if not (t.side == "host" and t.name == "pid")}
        openai = pool.tools(format="openai")
        anthropic = pool.tools(format="anthropic")
        mcp = pool.tools(format="mcp")
    for shaped in (openai, anthropic, mcp):
        assert len(shaped) == len(infos)  # the host "pid" is left out: the worker's has that name
    for tool in openai:
        assert set(tool) == {"type", "function"} and tool["type"] == "function"
        assert set(tool["function"]) == {"name", "description", "parameters"}
        assert tool["function"]["parameters"] == infos[tool["function"]["name"]].parameters_schema
    for tool in anthropic:
        assert set(tool) == {"name", "description", "input_schema"}
        assert tool["input_schema"] == infos[tool["name"]].parameters_schema
    for tool in mcp:
        assert set(tool) == {"name", "description", "inputSchema"}
        assert tool["inputSchema"] == infos[tool["name"]].parameters_schema
    by_name = {t["name"]: t for t in anthropic}
    assert by_name["add"]["description"] == "Add two integers."
    assert by_name["lookup"]["input_schema"]["properties"]["word"] == {"type": "string", "description": "the word to look up."}
    # streaming tools (worker and host) are there, and say what their result is
    assert by_name["count"]["description"].startswith("Yield 0 .. n-1")
    assert "list of its chunks" in by_name["count"]["description"]
    assert "list of its chunks" in by_name["tail"]["description"]
    assert "list of its chunks" not in by_name["add"]["description"]


async def test_the_mcp_shape_is_the_sdks_tool() -> None:
    types = require("mcp.types")
    async with open_pool_in_threads(ECHO, size=1) as pool:
        shaped = pool.tools(format="mcp")
    for tool in shaped:
        parsed = types.Tool.model_validate(tool)
        assert parsed.model_dump(by_alias=True, exclude_none=True) == tool


@pytest.mark.parametrize("bad", ["OpenAI", "gemini", "", 3])
async def test_a_bad_format_names_the_allowed_ones(bad: Any) -> None:
    async with open_pool_in_threads(ECHO, size=1) as pool:
        with pytest.raises(InvalidArgumentError, match="'openai', 'anthropic', 'mcp'"):
            pool.tools(format=bad)
        assert pool.tools(format=None) == pool.tools()


# ---- Pool.call_host_tool: what a program dispatching an LLM's tool calls runs host tools with ----
async def test_call_host_tool_runs_sync_async_and_streaming_host_tools() -> None:
    async with open_pool_in_threads(ECHO, size=1) as pool:
        _register(pool)
        assert await pool.call_host_tool("lookup", {"word": "w", "limit": 2}) == ["w-0", "w-1"]
        assert await pool.call_host_tool("tail", {"n": 3}) == [0, 1, 2]
        assert await pool.call_host_tool("pid") == "host"
        with pytest.raises(InvalidArgumentError, match="argument 'limit': expected an integer"):
            await pool.call_host_tool("lookup", {"word": "w", "limit": math.pi})
        with pytest.raises(ToolNotFoundError, match="add"):
            await pool.call_host_tool("add", {"a": 1})  # a worker tool: pool.execute runs those


def test_arguments_from_json_make_arrays_where_the_schema_has_them() -> None:
    class Batch(pydantic.BaseModel, arbitrary_types_allowed=True):
        images: list[np.ndarray]

    def f(image: np.ndarray, maybe: np.ndarray | None = None, named: dict[str, np.ndarray] | None = None,
          batch: Batch | None = None, plain: list[int] | None = None, other: Any = None):
        pass

    f.__annotations__ = {
        "image": np.ndarray, "maybe": np.ndarray | None, "named": dict[str, np.ndarray] | None,
        "batch": Batch | None, "plain": list[int] | None, "other": Any,
    }
    definition = define_tool(f, "f", None)
    info = tool_info(tool_spec(definition))
    given = {
        "image": [[1, 2], [3, 4]], "maybe": [0.5], "named": {"a": [1.5, 2]}, "batch": {"images": [[1], [2]]},
        "plain": [1, 2], "other": [1, 2], "unknown": [1],
    }
    converted = info.arguments_from_json(given)
    assert isinstance(converted["image"], np.ndarray) and converted["image"].dtype == np.int64
    assert converted["image"].tolist() == [[1, 2], [3, 4]]
    assert isinstance(converted["maybe"], np.ndarray) and converted["maybe"].dtype == np.float64
    assert isinstance(converted["named"]["a"], np.ndarray)
    assert all(isinstance(a, np.ndarray) for a in converted["batch"]["images"])
    assert converted["plain"] == [1, 2] and converted["other"] == [1, 2] and converted["unknown"] == [1]
    assert not isinstance(converted["plain"], np.ndarray)
    definition.check_arguments({k: v for k, v in converted.items() if k != "unknown"})  # what the check wants
    assert info.arguments_from_json({"image": [[1], [2, 3]]}) == {"image": [[1], [2, 3]]}  # ragged: as given
    assert info.arguments_from_json({"maybe": None}) == {"maybe": None}
