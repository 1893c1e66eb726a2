"""Tools in both directions: host tools called by workers, worker-to-worker calls; and the
checking of call arguments against a tool's annotations (pure, no process)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
import pytest
import trio

import trio_bridge
from trio_bridge import InvalidArgumentError, PoolSaturatedError, ToolError
from trio_bridge._core.tools import define_tool
from trio_bridge.testing import open_pool_in_threads

AGENT = "tests.tool_adapters:Agent"


def register_tools(pool: trio_bridge.Pool, log: list) -> None:
    @pool.host_tool(description="Look a word up in the host's index")
    async def lookup(word: str, limit: int = 3) -> list[str]:
        """Find words.

        Args:
            word: the word to look up.
            limit: how many matches at most.
        """
        return [f"{word}-{i}" for i in range(limit)]

    @pool.host_tool
    def parse(text: str) -> dict:  # sync: runs in a thread on the host
        return {"words": text.split()}

    @pool.host_tool
    def explode(message: str) -> None:
        raise ValueError(f"host says {message}")

    @pool.host_tool(streaming=True)
    async def tail(n: int):
        for i in range(n):
            yield {"line": i}

    @pool.host_tool
    async def slow(seconds: float) -> str:
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            log.append("slow cancelled")
            raise
        return "done"

    @pool.host_tool
    async def reenter(tool: str) -> object:
        return await pool.execute(tool)


async def test_a_worker_calls_host_tools_and_gets_decoded_values():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, [])
        assert await pool.execute("ask_host", {"name": "lookup", "arguments": {"word": "cat"}}) == ["cat-0", "cat-1", "cat-2"]
        assert await pool.execute("ask_host_async", {"name": "parse", "arguments": {"text": "a b"}}) == {"words": ["a", "b"]}
        assert await pool.execute("use_proxy", {"word": "dog"}) == ["dog-0", "dog-1", "dog-2"]
        assert await pool.execute("tail", {"n": 500}) == [{"line": i} for i in range(500)]
        assert await pool.execute("tail_async", {"n": 3}) == [{"line": 0}, {"line": 1}, {"line": 2}]
        sides = {(t.name, t.side): t.streaming for t in pool.tools()}
        assert sides[("lookup", "host")] is False and ("ask_host", "worker") in sides
        assert sides[("tail", "host")] is True and sides[("tail", "worker")] is False  # separate namespaces


async def test_the_proxy_carries_the_docstring_and_signature():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, [])
        described = await pool.execute("describe_proxy", {"name": "lookup"})
    assert described["doc"].startswith("Look a word up in the host's index")
    assert "word: the word to look up." in described["doc"]
    assert described["signature"] == "(*, word: 'str', limit: 'int' = 3)"
    assert {"lookup", "parse", "tail"} <= set(described["names"])


async def test_host_tool_errors_reach_the_worker_clearly():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, [])
        unknown = await pool.execute("ask_host_safely", {"name": "nope", "arguments": {}})
        assert unknown["error"] == "ToolNotFoundError" and "lookup" in unknown["message"] and "parse" in unknown["message"]
        raised = await pool.execute("ask_host_safely", {"name": "explode", "arguments": {"message": "no"}})
        assert raised["error"] == "ToolError" and raised["remote_type"] == "ValueError"
        assert "host says no" in raised["message"] and "in explode" in raised["traceback"]
        bad = await pool.execute("ask_host_safely", {"name": "lookup", "arguments": {"wrod": "x"}})
        assert bad["error"] == "InvalidArgumentError" and "unknown argument(s) 'wrod'" in bad["message"]
        with pytest.raises(ToolError, match="ValueError: host says boom"):  # unhandled in the worker
            await pool.execute("ask_host", {"name": "explode", "arguments": {"message": "boom"}})


async def test_a_per_session_host_tool_is_invisible_to_other_sessions():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        async with pool.session() as mine, pool.session() as other:
            mine.register_host_tool(lambda: "classified", name="secret")
            assert await mine.execute("ask_host", {"name": "secret", "arguments": {}}) == "classified"
            hidden = await other.execute("ask_host_safely", {"name": "secret", "arguments": {}})
            assert hidden["error"] == "ToolNotFoundError"
            assert (await pool.execute("ask_host_safely", {"name": "secret", "arguments": {}}))["error"] == "ToolNotFoundError"
            assert "secret" in {t.name for t in mine.tools()} and "secret" not in {t.name for t in other.tools()}
        async with pool.session() as later:  # gone with its session
            assert (await later.execute("ask_host_safely", {"name": "secret", "arguments": {}}))["error"] == "ToolNotFoundError"


async def test_cancelling_the_outer_call_cancels_the_host_tool():
    log: list[str] = []
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, log)
        for tool in ("ask_host", "ask_host_async"):  # a sync tool in a thread, and an async tool
            with trio.move_on_after(0.5):
                await pool.execute(tool, {"name": "slow", "arguments": {"seconds": 30}})
            with trio.fail_after(5):
                while len(log) < (1 if tool == "ask_host" else 2):
                    await trio.sleep(0.02)
        assert log == ["slow cancelled", "slow cancelled"]
        assert await pool.execute("pid") > 0


async def test_the_callers_deadline_bounds_the_host_tool():
    log: list[str] = []
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, log)
        with trio.move_on_after(1.0):
            await pool.execute("ask_host_safely", {"name": "slow", "arguments": {"seconds": 30}})
        with trio.fail_after(5):
            while not log:
                await trio.sleep(0.02)


async def test_worker_to_worker_calls_are_routed_by_the_host():
    async with open_pool_in_threads(AGENT, size=2) as pool:
        result = await pool.execute("relay", {"x": 1.5})
        assert result["other"]["x"] == 1.5 and result["other"]["worker"] != result["me"]
        async with pool.session() as session:
            assert (await session.execute("relay", {"x": 2.0}))["other"]["x"] == 2.0


async def test_reentrant_calls_that_would_deadlock_a_pool_of_one_fail_clearly():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, [])
        with trio.fail_after(10):  # the point: no hang
            with pytest.raises(ToolError, match="would deadlock"):
                await pool.execute("ask_host", {"name": "reenter", "arguments": {"tool": "pid"}})
            with pytest.raises(ToolError, match="would deadlock"):
                await pool.execute("relay", {"x": 1.0})
    async with open_pool_in_threads(AGENT, size=1, concurrency=2) as pool:  # a free slot: it works
        register_tools(pool, [])
        assert await pool.execute("ask_host", {"name": "reenter", "arguments": {"tool": "pid"}}) > 0


async def test_host_tool_registration_is_validated():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        register_tools(pool, [])
        for kwargs, message in (
            ({"name": "9lives"}, "invalid tool name"),
            ({"name": "lookup"}, "already registered"),
            ({"name": "ok", "description": "x" * 5000}, "over 4,096"),
            ({"name": "ok2", "streaming": True}, "streaming=True but the callable is not a generator"),
            ({"name": "ok3", "metadata": {"blob": "x" * 20_000}}, "metadata is over"),
        ):
            with pytest.raises(InvalidArgumentError, match=message):
                pool.host_tool(lambda: None, **kwargs)
        assert PoolSaturatedError  # the re-entrancy guard's error type is public


async def test_big_ints_cross_both_ways_and_mistyped_arguments_are_refused_before_the_tool_runs():
    async with open_pool_in_threads(AGENT, size=1) as pool:
        pool.host_tool(lambda: -(10**5000), name="big")
        assert await pool.execute("ask_host", {"name": "big", "arguments": {}}) == -(10**5000)
        with pytest.raises(InvalidArgumentError, match=re.escape("tool 'where': argument 'x': expected a number, got 'a'")):
            await pool.execute("where", {"x": "a"})
        with pytest.raises(InvalidArgumentError, match="argument 'x': expected a number that fits a float"):
            await pool.execute("where", {"x": 10**5000})
        assert (await pool.execute("where", {"x": 2}))["x"] == 2  # an int is a fine float, and is not converted


# ---- argument checking in depth (pure) ----
class Point(pydantic.BaseModel):
    x: int
    y: int


class Unknowable:
    """pydantic builds no schema for this without arbitrary types; with them: isinstance."""


def predict(
    x: list[float],
    weights: dict[str, int] | None = None,
    scale: float | None = None,
    mode: int | str = 0,
    pair: tuple[int, int] = (0, 0),
    image: np.ndarray | None = None,
    raw: bytes = b"",
    anything: Any = None,
    untyped=None,
    point: Point | None = None,
    kind: Literal["fast", "slow"] = "fast",
    nested: list[dict[str, list[int | None]]] | None = None,
    count: int = 0,
    other: Unknowable | None = None,
):
    """Predict."""


@pytest.fixture(scope="module")
def tool():
    return define_tool(predict, "predict", None)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"x": ["a", "b"]}, "argument 'x'[0]: expected a number, got 'a'"),
        ({"x": [1.0, "2"]}, "argument 'x'[1]: expected a number, got '2'"),
        ({"x": [True]}, "argument 'x'[0]: expected a number, got True"),
        ({"x": "1.5"}, "argument 'x': expected a list, got '1.5'"),
        ({"x": [1], "weights": {"a": 1.5}}, "argument 'weights'[\"a\"]: expected an integer, got 1.5"),
        ({"x": [1], "weights": {"a": "1"}}, "argument 'weights'[\"a\"]: expected an integer, got '1'"),
        ({"x": [1], "scale": "0.5"}, "argument 'scale': expected a number, got '0.5'"),
        ({"x": [1], "mode": 1.5}, "argument 'mode': expected an integer or a string, got 1.5"),
        ({"x": [1], "pair": [1]}, "argument 'pair'[1]: missing"),
        ({"x": [1], "pair": [1, "2"]}, "argument 'pair'[1]: expected an integer, got '2'"),
        ({"x": [1], "image": [[1, 2]]}, "argument 'image': expected an instance of ndarray, got [[1, 2]]"),
        ({"x": [1], "raw": "text"}, "argument 'raw': expected bytes, got 'text'"),
        ({"x": [1], "point": {"x": 1}}, "argument 'point'[\"y\"]: missing"),
        ({"x": [1], "kind": "medium"}, "argument 'kind': input should be 'fast' or 'slow', got 'medium'"),
        ({"x": [1], "nested": [{"k": [1, None, "z"]}]}, "argument 'nested'[0][\"k\"][2]: expected an integer, got 'z'"),
        ({"x": [1], "count": 2.0}, "argument 'count': expected an integer, got 2.0"),
        ({"x": [1], "count": True}, "argument 'count': expected an integer, got True"),
        ({"x": [1], "other": 3}, "argument 'other': expected an instance of Unknowable, got 3"),
    ],
)
def test_arguments_are_checked_in_depth_and_the_error_names_tool_argument_and_place(tool, arguments, message):
    with pytest.raises(InvalidArgumentError) as info:
        tool.check_arguments(arguments)
    assert str(info.value) == f"tool 'predict': {message}"


def test_fitting_arguments_pass_unconverted(tool):
    image = np.zeros((2, 2), np.float32)
    arguments = {
        "x": [1, 2.5, float("nan")], "weights": {"a": 10**5000}, "scale": 3, "mode": "m", "pair": [1, 2],
        "image": image, "raw": b"\x00", "anything": object(), "untyped": {1, 2}, "point": {"x": 1, "y": 2},
        "kind": "slow", "nested": [{"k": [1, None]}], "count": -(10**5000), "other": Unknowable(),
    }
    checked = tool.check_arguments(arguments)
    assert checked["x"] is arguments["x"] and checked["scale"] == 3 and type(checked["scale"]) is int
    assert checked["pair"] == [1, 2] and checked["point"] == {"x": 1, "y": 2} and checked["image"] is image


def test_none_fits_a_parameter_whose_default_is_none():
    def f(x: float = None, y: float = 1.0):  # noqa: RUF013 - the sloppy spelling is common
        pass

    definition = define_tool(f, "f", None)
    assert definition.check_arguments({"x": None}) == {"x": None, "y": 1.0}
    with pytest.raises(InvalidArgumentError, match="argument 'y': expected a number, got None"):
        definition.check_arguments({"y": None})


class NoSchema:
    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        raise TypeError("no schema for me")


def explode(value):
    raise RecursionError("deep")


def test_annotations_pydantic_cannot_handle_are_not_checked():
    def f(a: NoSuchName, b: Any, c: object, d: NoSchema, e: list[NoSchema], g: list[Unknowable], h: dict[str, int]):  # noqa: F821
        pass

    definition = define_tool(f, "f", None)  # never fails at definition time
    checks = {p.name: p.check is not None for p in definition.parameters}
    assert checks == {"a": False, "b": False, "c": False, "d": False, "e": False, "g": True, "h": True}
    definition.check_arguments({"a": 1, "b": 2, "c": 3, "d": 4, "e": [5], "g": [Unknowable()], "h": {}})


def test_a_validator_that_raises_oddly_still_gives_an_invalid_argument_error():
    def f(x: Annotated[int, pydantic.AfterValidator(explode)]):
        pass

    with pytest.raises(InvalidArgumentError, match="argument 'x': could not be checked: RecursionError"):
        define_tool(f, "f", None).check_arguments({"x": 1})
