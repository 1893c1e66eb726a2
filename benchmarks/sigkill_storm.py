"""Host SIGKILL storm: nothing of a pool may outlive its host.

Each run starts a host program (a pool of 2 workers of ``tests.adapters:Echo``; one tool has
started a ``sleep 1000`` child; a call is in flight: a plain sleep, or a tool that holds the GIL
in one long C call), SIGKILLs the host at a random moment, and then checks for up to 5 s that
no worker, no tool child and no shared-memory directory of that pool is left.

    python -m benchmarks.sigkill_storm --runs 50 [--gil]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

import psutil
from rich.console import Console
from rich.table import Table

HOST = """
import sys, trio, trio_bridge
async def main():
    async with trio_bridge.open_pool("tests.adapters:Echo", size=2) as pool:
        sleeper = await pool.execute("spawn_sleeper")
        shm = pool._plane.directory if pool._plane else "-"
        print(" ".join(str(w.pid) for w in pool.workers()), sleeper, shm, flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.execute, sys.argv[1], {"seconds": 60})
            nursery.start_soon(pool.execute, "sleep", {"seconds": 60})
trio.run(main)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def one_run(tool: str, root: str, delay: float | None = None) -> dict[str, float | int]:
    """One host, SIGKILLed ``delay`` seconds (default: random, up to 0.5) after its pool is
    ready; counts what is left of it after up to 5 s (``started``: all of it was alive first)."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, tool], cwd=root, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert host.stdout is not None
    *workers, sleeper, shm = host.stdout.readline().split()
    pids = [int(p) for p in workers] + [int(sleeper)]
    started = all(_alive(p) for p in pids) and os.path.isdir(shm)
    time.sleep(random.uniform(0.0, 0.5) if delay is None else delay)  # with the calls in flight
    # Every process the host started (the fork server, its spares, the janitor, the workers).
    family = [c.pid for c in psutil.Process(host.pid).children(recursive=True)]
    pids += [p for p in family if p not in pids]
    host.send_signal(signal.SIGKILL)
    host.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 5.0:
        if not any(_alive(p) for p in pids) and not os.path.exists(shm):
            break
        time.sleep(0.01)
    left = sum(_alive(p) for p in pids)
    for pid in pids:  # clean up whatever failed, so that runs stay independent
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {
        "seconds": time.monotonic() - killed, "workers_left": sum(_alive(int(p)) for p in workers),
        "children_left": int(_alive(int(sleeper))), "shm_left": int(os.path.exists(shm)), "left": left,
        "started": int(started), "descendants": len(family),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--gil", action="store_true", help="the call in flight holds the GIL in C")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = "hold_gil" if args.gil else "sleep"
    results = [one_run(tool, root) for _ in range(args.runs)]
    table = Table(title=f"host SIGKILL x{args.runs}, call in flight: {tool}")
    for column in (
        "runs", "workers left", "tool children left", "processes of the host left (of)", "/dev/shm dirs left",
        "gone after (max s)", "median s",
    ):
        table.add_column(column)
    times = sorted(float(r["seconds"]) for r in results)
    table.add_row(
        str(len(results)), str(sum(int(r["workers_left"]) for r in results)),
        str(sum(int(r["children_left"]) for r in results)),
        f"{sum(int(r['left']) for r in results)} ({sum(int(r['descendants']) for r in results)})",
        str(sum(int(r["shm_left"]) for r in results)),
        f"{times[-1]:.3f}", f"{times[len(times) // 2]:.3f}",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
