"""buffers: a big buffer is handed out again only once nothing refers to it (whatever was made
of it), and what is kept stays within its bounds."""

from __future__ import annotations

import gc

import numpy
import pytest

from trio_bridge._wire import buffers, codec

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(buffers, "KEEP_BYTES", 64 * MIB)
    buffers.forget()
    yield
    buffers.forget()


def _same_memory(a, b) -> bool:
    return numpy.shares_memory(numpy.asarray(a), numpy.asarray(b))


@pytest.mark.parametrize("hold", [
    lambda b: b,
    lambda b: b[10:],
    lambda b: memoryview(b)[16:],
    lambda b: numpy.frombuffer(memoryview(b)[16:], dtype=numpy.float32).reshape(-1, 4)[::3],
    lambda b: b.view(numpy.float64).reshape(2, -1).T,
])
def test_a_buffer_is_not_handed_out_while_anything_made_of_it_lives(hold):
    held = hold(buffers.empty(4 * MIB))
    numpy.asarray(held)[...] = 7  # whatever it is, it is ours to write
    for _ in range(3):
        other = buffers.empty(4 * MIB)
        assert not _same_memory(other, held)
        other[:] = 1
        del other
    assert (numpy.asarray(held) == 7).all()
    del held
    gc.collect()
    assert buffers.kept_bytes()[1] >= 4 * MIB  # free now: the next one of that size reuses it
    again = buffers.empty(4 * MIB)
    assert buffers.kept_bytes()[1] < buffers.kept_bytes()[0]
    assert again.shape == (4 * MIB,) and again.dtype == numpy.uint8 and again.flags.writeable


def test_what_is_kept_stays_within_its_bounds(monkeypatch):
    small = buffers.empty(buffers.MIN_BYTES - 1)
    assert buffers.kept_bytes() == (0, 0)  # small buffers are malloc's
    held = [buffers.empty(10 * MIB) for _ in range(10)]  # 100 MiB in use: only 64 MiB are kept
    assert buffers.kept_bytes()[0] <= 64 * MIB
    assert all(b.shape == (10 * MIB,) for b in held) and len({b.ctypes.data for b in held}) == 10
    del held
    monkeypatch.setattr(buffers, "IDLE_S", 0.0)
    buffers.empty(2 * MIB)  # free buffers idle for IDLE_S go at the next empty()
    assert buffers.kept_bytes()[0] <= 4 * MIB
    monkeypatch.setattr(buffers, "KEEP_BYTES", 0)  # TRIO_BRIDGE_BUFFER_CACHE=0: nothing kept
    buffers.forget()
    buffers.empty(2 * MIB)
    assert buffers.kept_bytes() == (0, 0)
    del small


def test_an_argument_changed_after_encoding_is_sent_as_it_was_when_its_buffer_is_reused():
    for i in range(4):  # the snapshots reuse one buffer once each message is dropped
        array = numpy.arange(MIB, dtype=numpy.float32) + i
        message = codec.encode(array)
        array += 100  # after the call started: not what is sent
        assert numpy.array_equal(codec.decode(message), numpy.arange(MIB, dtype=numpy.float32) + i)
        del message
    assert buffers.kept_bytes()[0] > 0


def test_idle_buffers_are_released_by_the_loop_that_received_them(monkeypatch):
    import asyncio

    monkeypatch.setattr(buffers, "IDLE_S", 0.05)

    async def receive_then_idle() -> None:
        held = buffers.empty(4 * MIB)
        buffers.empty(8 * MIB)
        assert buffers.kept_bytes() == (12 * MIB, 8 * MIB)
        await asyncio.sleep(0.3)  # nothing else happens: the free one goes, the held one stays
        assert buffers.kept_bytes() == (4 * MIB, 0)
        del held
        await asyncio.sleep(0.3)
        assert buffers.kept_bytes() == (0, 0)

    asyncio.run(receive_then_idle())


def test_where_reference_counts_cannot_be_trusted_no_buffer_is_reused(monkeypatch):
    from trio_bridge._wire import holders

    kept = buffers.empty(4 * MIB)
    del kept
    monkeypatch.setattr(holders, "TRUSTED", False)  # a free-threaded build, or one without sys.getrefcount
    first = buffers.empty(4 * MIB)
    first[:] = 5
    second = buffers.empty(4 * MIB)
    assert not _same_memory(first, second) and buffers.kept_bytes()[1] == 0  # none counts as free
    del first, second
    gc.collect()
    assert buffers.kept_bytes()[1] == 0


def test_a_buffer_pins_little_more_than_its_message():
    """A kept result's memory is its buffer: a big buffer may not serve a much smaller message."""
    big = buffers.empty(8 * MIB)
    del big  # free, kept
    result = buffers.empty(3 * MIB)
    assert result.base.nbytes <= 3 * MIB * 1.125  # not the 8 MiB one
    odd = buffers.empty(2 * MIB + 1)  # a fresh one is not rounded up to the next 2 MiB
    assert odd.base.nbytes <= (2 * MIB + 1) * 1.0625
    assert buffers.kept_bytes()[0] - 8 * MIB <= (3 * MIB + 2 * MIB + 1) * 1.125
    address = result.ctypes.data
    del result
    assert buffers.empty(3 * MIB - 4096).ctypes.data == address  # a close fit is reused


def test_the_last_pool_to_close_lets_go_of_the_kept_buffers():
    buffers.pool_opened()
    buffers.pool_opened()
    try:
        buffers.empty(4 * MIB)  # dropped at once: kept, free
        buffers.pool_closed()  # another pool is still open: it goes on reusing them
        assert buffers.kept_bytes()[1] >= 4 * MIB
    finally:
        buffers.pool_closed()
    assert buffers.kept_bytes() == (0, 0)
