"""Tools in both directions (``trio-bridge run --example tools``).

The worker tool ``research`` calls the host tool ``lookup`` (through the ``ctx.host_tools``
proxy), asks another worker's tool ``score`` to rank what it found (``ctx.call_tool``, routed by
the host), and follows the streaming host tool ``tail`` (``ctx.stream_host_tool``). The host tools
are plain functions in this module, so the same run works from the command line::

    trio-bridge run trio_bridge.examples.agent:Researcher research --arg topic=cat \\
        --host-tools trio_bridge.examples.agent:lookup,trio_bridge.examples.agent:tail --workers 2
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

from trio_bridge.worker import Adapter, SessionContext, tool

# The host's "index": what only the host process knows.
INDEX = {
    "cat": ["feline", "kitten", "tabby", "lion", "tiger"],
    "dog": ["canine", "puppy", "hound", "wolf", "terrier"],
    "bird": ["avian", "sparrow", "eagle", "finch", "owl"],
}


async def lookup(word: str, limit: int = 5) -> list[str]:
    """Look a word up in the host's index.

    Args:
        word: the word to look up.
        limit: how many related words at most.
    """
    return INDEX.get(word, [])[:limit]


async def tail(n: int) -> AsyncIterator[dict[str, Any]]:
    """Stream the host's last ``n`` log lines."""
    import trio

    for i in range(n):
        yield {"line": i, "at": time.time(), "text": f"host log line {i}"}
        await trio.sleep(0)


class Researcher(Adapter):
    """Worker tools that call back: ``research`` (host tools, another worker's ``score``) and ``score``."""

    @tool
    def research(self, ctx: SessionContext, topic: str) -> dict[str, Any]:
        """Research a topic with the host's index, another worker's scoring, and the host's log.

        Args:
            topic: a word, e.g. "cat".
        """
        related = ctx.host_tools.lookup(word=topic)                     # worker -> host tool
        scored = ctx.call_tool("score", words=related)                    # worker -> another worker
        log = [chunk["text"] for chunk in ctx.stream_host_tool("tail", n=3)]  # streaming host tool
        return {"topic": topic, "related": related, "ranked": scored["ranked"],
                "researcher_pid": os.getpid(), "scorer_pid": scored["pid"], "host_log": log}

    @tool
    def score(self, words: list[str]) -> dict[str, Any]:
        """Rank words by a (toy) relevance score: shorter and rarer letters first."""
        rare = set("qxzjkvbw")
        ranked = sorted(words, key=lambda w: (-sum(c in rare for c in w), len(w), w))
        return {"ranked": ranked, "pid": os.getpid()}


async def run(console: Any, workers: int) -> bool:
    """The host side: register the host tools, research a few topics, show who did what."""
    import trio
    from rich.table import Table

    import trio_bridge

    # research holds a slot while score needs another: two slots per worker, and at most one
    # research call per worker at a time, so a score call can always find a slot.
    size = max(workers, 2)
    async with trio_bridge.open_pool("trio_bridge.examples.agent:Researcher", size=size, concurrency=2) as pool:
        pool.host_tool(lookup)
        pool.host_tool(tail)
        table = Table(title="worker tools calling host tools and each other")
        for column in ("topic", "host lookup", "ranked by another worker", "researcher pid", "scorer pid", "streamed from the host"):
            table.add_column(column)
        results = []
        limiter = trio.CapacityLimiter(size)

        async def research(topic: str) -> None:
            async with limiter:
                results.append(await pool.execute("research", {"topic": topic}))

        async with trio.open_nursery() as nursery:
            for topic in INDEX:
                nursery.start_soon(research, topic)
        for r in sorted(results, key=lambda r: r["topic"]):
            table.add_row(r["topic"], ", ".join(r["related"]), ", ".join(r["ranked"]),
                          str(r["researcher_pid"]), str(r["scorer_pid"]), f"{len(r['host_log'])} lines")
        console.print(table)
        for info in pool.tools():
            console.print(f"  {info.side:6} {'streaming ' if info.streaming else ''}tool {info.name}: {info.description}")
        return all(r["related"] and r["ranked"] and len(r["host_log"]) == 3 for r in results)
