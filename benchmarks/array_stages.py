"""Where a 100 MB ``plus_one`` round trip's time goes, stage by stage, in one process.

    python -m benchmarks.array_stages [--mb 100] [--rounds 6]

Two planes on one shared-memory directory stand for the host and the worker; each stage is what
that side does in ``pool.execute("plus_one", ...)`` (ordinary arrays) or ``plus_one_into`` with
``pool.empty`` / ``ctx.empty`` buffers; medians after two warm-up rounds, in milliseconds. What it
leaves out (the gRPC messages, the worker's thread hop) is the call's total in ``bench.py``
minus the sum of these stages. ``in-process a + 1`` is the bench's peer: a NEW array each time,
which costs page faults (numpy asks for transparent huge pages) that a reused segment has not;
``a + 1 into a reused array`` (``out=``, pre-faulted) is the like-for-like peer of the buffers
path, whose worker writes into a reused ``ctx.empty`` segment. Both paths time the worker's
mapping of the argument and its sample check the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.adapters import sample_sum
from trio_bridge._wire.shared_memory import SharedMemoryPlane, empty


def stages(n_bytes: int, rounds: int) -> dict[str, float]:
    """Median milliseconds per stage."""
    pattern = (np.arange(n_bytes // 4, dtype=np.int64) % 1021).astype(np.float32)
    directory = tempfile.mkdtemp(prefix=f"trio-bridge-{os.getpid()}-", dir="/dev/shm")
    host, worker = SharedMemoryPlane(directory), SharedMemoryPlane(directory)
    samples: dict[str, list[float]] = {}
    reused = np.zeros_like(pattern)  # the out= peer's array: written now, so its pages are faulted in

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        value = fn(*args)
        samples.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
        return value

    try:
        for i in range(rounds + 2):
            a = pattern + np.float32(i)
            shape = list(a.shape)
            # ordinary arrays: one copy each way
            sent = timed("plain: host copies the argument in", host.write, a)
            received = timed("plain: worker maps it", worker.read, *sent, a.dtype, shape)
            timed("plain: worker's sample check", sample_sum, received)
            result = timed("plain: worker's a + 1 (a new array)", np.add, received, 1)
            back = timed("plain: worker copies the result in", worker.write, result)
            del result, received
            timed("plain: host maps the result", host.read, *back, a.dtype, shape)
            # buffers: pool.empty argument, ctx.empty result
            buffer = empty(host, a.shape, a.dtype)
            np.copyto(buffer, a)  # the program builds its argument (not timed, as `a` above)
            sent = timed("buffers: host hands the argument over", host.write, buffer)
            received = timed("buffers: worker maps it", worker.read, *sent, a.dtype, shape)
            timed("buffers: worker's sample check", sample_sum, received)
            out = timed("buffers: worker's ctx.empty", empty, worker, a.shape, a.dtype)
            timed("buffers: worker's a + 1 into it", np.add, received, 1, out)
            back = timed("buffers: worker hands the result over", worker.write, out)
            del out, received, buffer
            timed("buffers: host maps the result", host.read, *back, a.dtype, shape)
            # the peers
            timed("in-process: sample check and a + 1", _plus_one_in_process, a)
            timed("in-process: sample check and a + 1 into a reused array", _plus_one_in_process, a, reused)
    finally:
        worker.close()
        host.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {name: statistics.median(values[2:]) for name, values in samples.items()}


def _plus_one_in_process(a: Any, out: Any = None) -> Any:
    sample_sum(a)
    return np.add(a, 1, out=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="array size, MB (1e6 bytes)")
    parser.add_argument("--rounds", type=int, default=6)
    options = parser.parse_args()
    for name, ms in stages(int(options.mb * 1e6), options.rounds).items():
        print(f"{name:55s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
