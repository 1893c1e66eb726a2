"""No regression: the figures a speed-up must not lose, for this tree and a baseline commit, in one run.

    python -m benchmarks.regression [--baseline REV] [--rounds N]

Absolute times on a shared machine drift 2x with load, so a figure is only compared with the
same figure of the baseline measured in the same run: the baseline commit is checked out in a
temporary git worktree, and each round measures this tree and then the baseline (the order
swaps every round), each in a fresh process whose ``trio_bridge`` and ``benchmarks`` come from
the tree under test while the measuring code (this file) is the same for both. What is measured,
per tree and round (the same work as ``benchmarks/bench.py``'s figures of the same names):

- ``stream_chunks_per_s``: chunks/s of ``pool.stream`` into a Trio consumer, the better of a sync
  and an async generator (``count`` / ``acount``, 200,000 chunks, each twice: a stream is over in
  a fraction of a second, so the best of its runs is what load disturbed least), pool of 1;
- ``throughput_64_in_flight_calls_per_s``: calls/s of 64 Trio tasks calling the async no-op tool
  ``anoop`` on a pool of 2 workers, concurrency 16, for ``THROUGHPUT_SECONDS``;
- ``host_rss_mib_10k_sessions``: RSS (MiB) of a fresh host process with 10,000 sessions of 10
  variables (``benchmarks/session_rss.py`` of the tree under test);
- ``watch_fanout_1000_p50_ms``: ms from one ``set_variable`` until all of 1,000 watchers saw it, p50.

The result holds each tree's medians over the rounds and ``<figure>_over_baseline`` (this tree's
median over the baseline's; above 1 is more, which is better for the two rates and worse for RSS
and latency). A baseline that git cannot check out is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

#: the commit before issue 24's work: what "no regression" is measured against
BASELINE_REV = "07c3a49"
ADAPTER = "benchmarks.adapters:Bench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THROUGHPUT_SECONDS = 2.0
FIGURES = ("stream_chunks_per_s", "throughput_64_in_flight_calls_per_s", "host_rss_mib_10k_sessions", "watch_fanout_1000_p50_ms")
#: figures where more is better (the others: less is better)
MORE_IS_BETTER = ("stream_chunks_per_s", "throughput_64_in_flight_calls_per_s")


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "n": len(ordered),
    }


def _no_health_checks() -> Any:
    import trio_bridge

    return trio_bridge.Lifecycle(health_check_interval=0)


async def pool_window(pool: Any, in_flight: int, seconds: float, tool: str) -> tuple[int, float]:
    """Calls completed by ``in_flight`` callers in about ``seconds``, and the seconds it took."""
    import trio

    done = 0
    deadline = trio.current_time() + seconds

    async def caller() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            await pool.execute(tool, {"x": 1})
            done += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(caller)
    return done, time.perf_counter() - t0


async def pool_throughput(in_flight: int, seconds: float, concurrency: int, tool: str) -> float:
    """Calls/s of ``in_flight`` Trio tasks calling ``tool`` on a pool of 2 workers."""
    import trio_bridge

    async with trio_bridge.open_pool(ADAPTER, size=2, concurrency=concurrency, max_queue=256, lifecycle=_no_health_checks()) as pool:
        done, elapsed = await pool_window(pool, in_flight, seconds, tool)
        return done / elapsed


async def stream_rate(tool: str, n: int) -> float:
    """Chunks/s of ``n`` chunks of ``tool`` streamed into a Trio consumer (pool of 1)."""
    import trio_bridge

    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=_no_health_checks()) as pool:
        t0 = time.perf_counter()
        count = 0
        async with pool.stream(tool, {"n": n}) as chunks:
            async for _ in chunks:
                count += 1
        assert count == n
        return n / (time.perf_counter() - t0)


def session_rss(sessions: int, variables: int, root: str = ROOT) -> dict[str, Any]:
    """``benchmarks/session_rss.py`` of the tree at ``root`` in a fresh process: earlier
    benchmarks' memory must not count."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.session_rss", "--sessions", str(sessions), "--variables", str(variables)],
        check=True, cwd=root, capture_output=True, text=True, env=_env_for(root),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def watch_fan_out(watchers: int, rounds: int) -> dict[str, Any]:
    """Seconds from one ``set_variable`` until every one of ``watchers`` watchers has seen it,
    through the host Session API; one write at a time (watch_fanout.py times the writer instead)."""
    import trio

    import trio_bridge

    async with trio_bridge.open_pool(ADAPTER, size=1, lifecycle=_no_health_checks()) as pool, pool.session() as session:
        await session.register_variable("temperature", "float", 0.0)
        target = 0
        seen = 0
        all_seen = trio.Event()

        async def watcher(task_status: trio.TaskStatus[None]) -> None:
            nonlocal seen
            async with session.watch_variables(["temperature"], include_initial=False) as updates:
                task_status.started()
                async for update in updates:
                    if update.version >= target:
                        seen += 1
                        if seen == watchers:
                            all_seen.set()

        samples = []
        async with trio.open_nursery() as nursery:
            for _ in range(watchers):
                await nursery.start(watcher)
            for version in range(1, rounds + 1):
                target, seen, all_seen = version, 0, trio.Event()
                t0 = time.perf_counter()
                await session.set_variable("temperature", float(version))
                with trio.fail_after(60):
                    await all_seen.wait()
                samples.append(time.perf_counter() - t0)
            nursery.cancel_scope.cancel()
    return {"watchers": watchers, **percentiles(samples)}


def measure_here() -> dict[str, float]:
    """The four figures of whichever ``trio_bridge`` this process imports (the RSS one in a
    process of its own, from the current directory's tree)."""
    import trio

    rss = session_rss(10_000, 10, os.getcwd())["rss_mib"]
    stream = max(trio.run(stream_rate, tool, 200_000) for tool in ("count", "acount") for _ in range(2))
    throughput = trio.run(pool_throughput, 64, THROUGHPUT_SECONDS, 16, "anoop")
    watch = trio.run(watch_fan_out, 1000, 100)["p50_us"] / 1000
    return {
        "stream_chunks_per_s": stream, "throughput_64_in_flight_calls_per_s": throughput,
        "host_rss_mib_10k_sessions": rss, "watch_fanout_1000_p50_ms": watch,
    }


def _env_for(root: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    return env


def _measure(root: str) -> dict[str, float]:
    """``measure_here`` in a fresh process whose imports come from the tree at ``root``."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure-here"],
        check=True, cwd=root, capture_output=True, text=True, env=_env_for(root), timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(baseline: str = BASELINE_REV, rounds: int = 3) -> dict[str, Any]:
    """This tree's figures over the baseline commit's, measured in alternating rounds.

    Returns ``{"baseline": REV, "rounds": N, "this": {figure: median}, "baseline_figures":
    {figure: median}, "samples": ..., "<figure>_over_baseline": ratio}``, or ``{"skipped":
    reason}`` when git cannot check the baseline out here.
    """
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as directory:
        tree = os.path.join(directory, "tree")
        added = subprocess.run(
            ["git", "-C", ROOT, "worktree", "add", "--detach", tree, baseline], capture_output=True, text=True,
        )
        if added.returncode != 0:
            return {"baseline": baseline, "skipped": f"git cannot check out {baseline}: {added.stderr.strip()}"}
        try:
            samples: dict[str, list[dict[str, float]]] = {"this": [], "baseline": []}
            for i in range(rounds):
                order = [("this", ROOT), ("baseline", tree)]
                for side, root in order if i % 2 == 0 else reversed(order):
                    samples[side].append(_measure(root))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    medians = {side: {f: statistics.median(s[f] for s in runs) for f in FIGURES} for side, runs in samples.items()}
    return {
        "baseline": baseline, "rounds": rounds, "this": medians["this"], "baseline_figures": medians["baseline"],
        "samples": samples,
        **{f"{f}_over_baseline": medians["this"][f] / medians["baseline"][f] for f in FIGURES},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=BASELINE_REV, help=f"the commit to compare with (default {BASELINE_REV})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure-here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_here:
        print(json.dumps(measure_here()))
        return
    print(json.dumps(compare(args.baseline, args.rounds), indent=2))


if __name__ == "__main__":
    main()
