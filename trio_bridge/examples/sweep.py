"""A Trio "optimizer" sweeps a variable while workers use it (``trio-bridge run --example sweep``).

The worker tool ``sample`` draws tokens from a softmax over fixed logits, scaled by the session
variable ``temperature``, and reports which value and version of ``temperature`` it used. The
host holds the optimization lock on ``temperature``, sets each value of a grid, and fans calls
out over all workers after each write: every call must report the value set before it started
(read-your-writes, no stale cache), and the sweep picks the temperature whose samples come
closest to a target entropy.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from trio_bridge.worker import Adapter, SessionContext, tool

VOCABULARY = {"small": 32, "large": 256}


class Sampler(Adapter):
    """Token sampling at the session's ``temperature`` (``sample``), and a write that the host's
    optimization lock refuses while it holds the variable (``try_to_set_temperature``)."""

    @tool
    def sample(self, ctx: SessionContext, prompt: str, tokens: int = 256) -> dict[str, Any]:
        """Sample ``tokens`` token ids for ``prompt`` at the session's temperature.

        Returns:
            ``{"temperature", "version", "entropy", "distinct", "pid"}``: the temperature value
            and version this call used, the entropy (nats) of its samples, how many distinct
            tokens it drew, and the worker's pid.
        """
        temperature = ctx.get_variable("temperature")
        size = VOCABULARY[ctx.variables["model"]]
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        logits = rng.standard_normal(size) * 3
        p = np.exp((logits - logits.max()) / temperature.value)
        p /= p.sum()
        draws = rng.choice(size, size=tokens, p=p)
        counts = np.bincount(draws, minlength=size) / tokens
        nonzero = counts[counts > 0]
        return {
            "temperature": temperature.value, "version": temperature.version,
            "entropy": float(-(nonzero * np.log(nonzero)).sum()), "distinct": len(nonzero), "pid": os.getpid(),
        }

    @tool
    def try_to_set_temperature(self, ctx: SessionContext, value: float) -> str:
        """Try to write ``temperature`` from a worker (refused while the optimizer holds it)."""
        try:
            ctx.set_variable("temperature", value)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "written"


async def run(console: Any, workers: int, grid: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), calls_per_step: int = 8, target_entropy: float = 2.5) -> bool:
    """The host side: the sweep. Returns whether every call saw the value current at its start."""
    import trio
    from rich.table import Table

    import trio_bridge

    async with trio_bridge.open_pool("trio_bridge.examples.sweep:Sampler", size=workers, concurrency=2) as pool:
        async with pool.session(affinity="prefer") as session:
            await session.register_variable("temperature", "float", 1.0, constraints={"min": 0.05, "max": 5.0})
            await session.register_variable("model", "choice", "large", constraints={"choices": list(VOCABULARY)})
            table = Table(title=f"temperature sweep: {calls_per_step} calls per step over {workers} worker(s)")
            for column in ("set to", "version", "values seen by the calls", "workers", "mean entropy (nats)"):
                table.add_column(column)
            consistent = 0
            total = 0
            scores = {}
            async with session.optimizing("temperature", optimizer_id="sweep") as optimizer:
                refusal = await session.execute("try_to_set_temperature", {"value": 3.0})
                for value in grid:
                    variable = await optimizer.set(value)
                    results: list[dict] = []

                    async def call(i: int, results: list[dict] = results) -> None:
                        results.append(await session.execute("sample", {"prompt": f"prompt {i}"}))

                    async with trio.open_nursery() as nursery:
                        for i in range(calls_per_step):
                            nursery.start_soon(call, i)
                    seen = sorted({(r["temperature"], r["version"]) for r in results})
                    total += len(results)
                    consistent += sum(r["temperature"] == value and r["version"] == variable.version for r in results)
                    scores[value] = float(np.mean([r["entropy"] for r in results]))
                    table.add_row(
                        f"{value:g}", str(variable.version), ", ".join(f"{t:g} (v{v})" for t, v in seen),
                        str(len({r["pid"] for r in results})), f"{scores[value]:.3f}",
                    )
            best = min(scores, key=lambda t: abs(scores[t] - target_entropy))
            await session.set_variable("temperature", best)
            console.print(table)
            console.print(f"a worker's write while the sweep held the lock: [italic]{refusal}[/]")
            console.print(
                f"{consistent}/{total} calls used the value current at their start; "
                f"best temperature for entropy {target_entropy}: [bold]{best:g}[/] (now set, version "
                f"{(await session.get_variable('temperature')).version})"
            )
            history = await session.variable_history("temperature")
            console.print(f"history of temperature: {[e.value for e in history]}")
            return consistent == total
