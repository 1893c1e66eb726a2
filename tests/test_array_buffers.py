"""Zero-copy array buffers against real worker processes: ``pool.empty`` arguments and ``ctx.empty``
results travel through shared memory without a copy, and nothing changes what either side got."""

from __future__ import annotations

import os

import numpy as np
import pytest
import trio

import trio_bridge
from tests.helpers import wait_for
from trio_bridge import InvalidArgumentError, Lifecycle, PoolClosedError, WorkerCrashedError

pytestmark = pytest.mark.real_process

BUFFERS = "tests.buffer_adapters:Buffers"
SHAPE = (512, 1024)  # 2 MiB of float32: over the pool's default threshold (1 MiB)


def _files(directory: str) -> dict[str, int]:
    """Segments in the pool's directory, counted by the pid of the process that wrote them."""
    counts: dict[str, int] = {}
    for name in os.listdir(directory):
        counts[name.split("-")[0]] = counts.get(name.split("-")[0], 0) + 1
    return counts


async def test_buffers_travel_without_a_copy_and_results_stay_valid_after_later_calls():
    async with trio_bridge.open_pool(BUFFERS, size=1, lifecycle=Lifecycle(health_check_interval=0)) as pool:
        directory, pid = pool._plane.directory, pool.workers()[0].pid
        kept = []
        for i in range(4):
            a = pool.empty(SHAPE, np.float32)
            assert a.shape == SHAPE and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous
            a[...] = np.arange(a.size, dtype=np.float32).reshape(SHAPE) + i
            result = await pool.execute("plus_one_into", {"a": a})
            assert result.dtype == np.float32 and np.array_equal(result, a + 1)
            assert not a.flags.writeable and not result.flags.writeable
            with pytest.raises(ValueError, match="read-only"):
                a[0, 0] = 7.0
            for array in (a, a[1:], a.base, result):  # sealed: numpy cannot make them writable again
                with pytest.raises(ValueError, match="WRITEABLE"):
                    array.flags.writeable = True
            if i == 0:  # one segment each way, none written by a copy
                assert _files(directory) == {str(os.getpid()): 1, str(pid): 1}
            kept.append((a, result))
        for i, (a, result) in enumerate(kept):  # later calls changed no earlier argument or result
            assert a[0, 1] == 1 + i and np.array_equal(result, a + 1)
        del kept, a, result
        for i in range(4):  # once both sides let go, the segments are reused
            a = pool.empty(SHAPE, np.float32)
            a[...] = i
            assert (await pool.execute("plus_one_into", {"a": a}))[5, 5] == i + 1
            del a
        assert sum(_files(directory).values()) <= 10


async def test_an_argument_changed_after_the_call_started_does_not_reach_the_worker():
    async with trio_bridge.open_pool(BUFFERS, size=1, lifecycle=Lifecycle(health_check_interval=0)) as pool:
        sealed = pool.empty(SHAPE, np.float32)
        sealed[...] = 1.0
        viewed = pool.empty(SHAPE, np.float32)
        viewed[...] = 2.0
        view = viewed[:]  # alive when it is sent: could write it, so `viewed` is copied
        sums: dict[str, float] = {}

        async def call(name: str, a: np.ndarray) -> None:
            sums[name] = await pool.execute("sum_after", {"a": a, "seconds": 0.5})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "sealed", sealed)
            await wait_for(lambda: pool.statistics().in_flight == 1)
            with pytest.raises(ValueError, match="read-only"):
                sealed[...] = 0.0  # another task writing it during the call is refused
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "viewed", viewed)
            await wait_for(lambda: pool.statistics().in_flight == 1)
            view[...] = 0.0  # allowed (it was copied when sent), and not seen by the worker
        assert sums == {"sealed": float(sealed.size), "viewed": 2.0 * viewed.size}
        assert viewed.flags.writeable and viewed[0, 0] == 0.0


async def test_a_tool_cannot_change_a_result_it_returned():
    async with trio_bridge.open_pool(BUFFERS, size=1, lifecycle=Lifecycle(health_check_interval=0)) as pool:
        n = 300_000  # 2.4 MB of float64
        result = await pool.execute("filled", {"n": n, "value": 3.0, "keep": "array"})
        assert (await pool.execute("write_kept", {"value": 9.0})).startswith("refused: ")
        assert (await pool.execute("write_kept", {"value": 9.0, "unseal": True})).startswith("refused: ")
        # A view of it alive when it was returned: copied, so the tool's later writes stay its own.
        copied = await pool.execute("filled", {"n": n, "value": 4.0, "keep": "view"})
        assert await pool.execute("write_kept", {"value": 9.0}) == "written"
        assert (result == 3.0).all() and (copied == 4.0).all()


async def test_small_buffers_and_pools_without_shared_memory_give_plain_arrays():
    async with trio_bridge.open_pool(BUFFERS, size=1, local=trio_bridge.LocalWorkers(shared_memory_threshold=None)) as pool:
        a = pool.empty(SHAPE, np.float32)
        a[...] = 5.0
        assert np.array_equal(await pool.execute("plus_one_into", {"a": a}), a + 1)
        assert a.flags.writeable  # copied in-band: stays the program's own
        out, writable_in_worker = await pool.execute("empty_of", {"shape": [3, 4], "dtype": "<i2"})
        assert out.dtype == np.int16 and out.shape == (3, 4) and not out.any() and writable_in_worker
    async with trio_bridge.open_pool(BUFFERS, size=1) as pool:
        small = pool.empty(10, "int64")  # under the threshold: in-band
        small[:] = 1
        await pool.execute("sum_after", {"a": small, "seconds": 0})
        assert small.flags.writeable


async def test_the_hosts_free_receive_buffers_are_released_when_idle_and_when_the_pool_closes(monkeypatch):
    from trio_bridge._wire import buffers

    buffers.forget()
    monkeypatch.setattr(buffers, "IDLE_S", 0.5)  # no asyncio loop on the host: the pool releases them
    in_band = trio_bridge.LocalWorkers(shared_memory_threshold=None)  # big replies land in the host's buffers
    async with trio_bridge.open_pool(BUFFERS, size=1, local=in_band) as pool:
        a = np.ones(SHAPE, np.float32)
        held = await pool.execute("plus_one_into", {"a": a})
        await pool.execute("plus_one_into", {"a": a})  # dropped: its buffer is free
        await wait_for(lambda: buffers.kept_bytes()[1] == 0)
        assert buffers.kept_bytes()[0] >= held.nbytes  # the one `held` is on stays
        monkeypatch.setattr(buffers, "IDLE_S", 30.0)
        await pool.execute("plus_one_into", {"a": a})
        assert buffers.kept_bytes()[1] > 0
    assert buffers.kept_bytes() == (0, 0)  # the pool closed: nothing kept, free or held
    assert (held == 2.0).all()


async def test_bad_shapes_and_dtypes_are_refused_naming_the_problem():
    async with trio_bridge.open_pool(BUFFERS, size=1) as pool:
        with pytest.raises(InvalidArgumentError, match="more than any machine has"):
            pool.empty((1 << 40, 1 << 40), np.float32)
        assert pool.empty(np.int64(3), "<u2").shape == (3,)  # numpy's integers are ints
        for shape in [(-1,), (2.5,), "12", None, True, (True,)]:
            with pytest.raises(InvalidArgumentError, match="shape must be an int or a sequence of ints >= 0"):
                pool.empty(shape, np.float32)  # type: ignore[arg-type]
        for dtype, message in [(object, "cannot travel"), ("i4,i4", "cannot travel"), ("nope", "is not a numpy dtype")]:
            with pytest.raises(InvalidArgumentError, match=message):
                pool.empty(4, dtype)
        # In a worker (raised as itself on the host, as a tool's InvalidArgumentError is).
        with pytest.raises(InvalidArgumentError, match=r"shape must be an int or a sequence of ints >= 0, not \(-3,\)"):
            await pool.execute("empty_of", {"shape": [-3], "dtype": "<f4"})
        with pytest.raises(InvalidArgumentError, match="dtype object cannot travel"):
            await pool.execute("empty_of", {"shape": 3, "dtype": "O"})
        assert await pool.execute("sum_after", {"a": np.ones(3), "seconds": 0}) == 3.0  # the worker is fine
    with pytest.raises(PoolClosedError):
        pool.empty(4)


async def test_no_segment_outlives_the_pool_after_a_crash_mid_call_and_a_cancellation():
    before = {n for n in os.listdir("/dev/shm") if n.startswith(f"trio-bridge-{os.getpid()}-")}
    async with trio_bridge.open_pool(BUFFERS, size=1, lifecycle=Lifecycle(health_check_interval=0)) as pool:
        directory = pool._plane.directory
        pid = pool.workers()[0].pid
        with pytest.raises(WorkerCrashedError):
            await pool.execute("fill_then_crash", {"n": 4 << 20})
        await wait_for(lambda: str(pid) not in _files(directory))
        held = pool.empty(SHAPE, np.float32)
        held[...] = 6.0
        with trio.move_on_after(0.3) as scope:
            await pool.execute("sum_after", {"a": held, "seconds": 30})
        assert scope.cancelled_caught
        result = await pool.execute("plus_one_into", {"a": held})
    assert not os.path.exists(directory)
    assert {n for n in os.listdir("/dev/shm") if n.startswith(f"trio-bridge-{os.getpid()}-")} <= before
    assert (held == 6.0).all() and (result == 7.0).all()  # what the program holds stays readable
