"""Tools in both directions: host tools called by workers, worker-to-worker calls."""

from __future__ import annotations

import pytest
import trio

import trio_bridge
from trio_bridge import InvalidArgumentError, PoolSaturatedError, ToolError

pytestmark = pytest.mark.real_process

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
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
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
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
        register_tools(pool, [])
        described = await pool.execute("describe_proxy", {"name": "lookup"})
    assert described["doc"].startswith("Look a word up in the host's index")
    assert "word: the word to look up." in described["doc"]
    assert described["signature"] == "(*, word: 'str', limit: 'int' = 3)"
    assert {"lookup", "parse", "tail"} <= set(described["names"])


async def test_host_tool_errors_reach_the_worker_clearly():
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
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
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
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
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
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
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
        register_tools(pool, log)
        with trio.move_on_after(1.0):
            await pool.execute("ask_host_safely", {"name": "slow", "arguments": {"seconds": 30}})
        with trio.fail_after(5):
            while not log:
                await trio.sleep(0.02)


async def test_worker_to_worker_calls_are_routed_by_the_host():
    async with trio_bridge.open_pool(AGENT, size=2) as pool:
        result = await pool.execute("relay", {"x": 1.5})
        assert result["other"]["x"] == 1.5 and result["other"]["pid"] != result["me"]
        async with pool.session() as session:
            assert (await session.execute("relay", {"x": 2.0}))["other"]["x"] == 2.0


async def test_reentrant_calls_that_would_deadlock_a_pool_of_one_fail_clearly():
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
        register_tools(pool, [])
        with trio.fail_after(10):  # the point: no hang
            with pytest.raises(ToolError, match="would deadlock"):
                await pool.execute("ask_host", {"name": "reenter", "arguments": {"tool": "pid"}})
            with pytest.raises(ToolError, match="would deadlock"):
                await pool.execute("relay", {"x": 1.0})
    async with trio_bridge.open_pool(AGENT, size=1, concurrency=2) as pool:  # a free slot: it works
        register_tools(pool, [])
        assert await pool.execute("ask_host", {"name": "reenter", "arguments": {"tool": "pid"}}) > 0


async def test_host_tool_registration_is_validated():
    async with trio_bridge.open_pool(AGENT, size=1) as pool:
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
