"""The transport's changes to its libraries' behaviour: h2 formats received frames only when its
logger logs; a worker's connections write once per loop iteration."""

from __future__ import annotations

import asyncio
import inspect
import io

import h2.config
import h2.connection
import hyperframe.frame
import pytest

from trio_bridge._wire import transport


def _exchange(logger: object) -> tuple[list[hyperframe.frame.Frame], int]:
    """A client's HEADERS and DATA received by an h2 server connection with ``logger``: the
    frames received, and how many times a DATA frame was formatted."""
    reprs = 0
    original = hyperframe.frame.DataFrame.__repr__

    def counting(frame: hyperframe.frame.Frame) -> str:
        nonlocal reprs
        reprs += 1
        return original(frame)

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "w")])
    client.send_data(1, b"\x00\x01" * 5000)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, logger=logger))
    server.initiate_connection()
    received: list[hyperframe.frame.Frame] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hyperframe.frame.DataFrame, "__repr__", counting)
        receive = server._receive_frame

        def recording(frame: hyperframe.frame.Frame) -> list[object]:
            received.append(frame)
            return receive(frame)

        patch.setattr(server, "_receive_frame", recording)
        server.receive_data(client.data_to_send())
    return received, reprs


def test_h2_formats_received_frames_only_for_a_logger_that_logs():
    # The patch's premise, checked on every h2 upgrade: one repr() call in h2.connection, the trace log's.
    source = inspect.getsource(h2.connection)
    assert source.count("repr(") == 1 and 'self.config.logger.trace("Received frame: %s", repr(frame))' in source
    assert vars(h2.connection)["repr"] is transport._DeferredRepr

    frames, reprs = _exchange(None)  # h2's default logger: discards everything
    assert any(isinstance(f, hyperframe.frame.DataFrame) for f in frames) and reprs == 0

    out = io.StringIO()
    frames, reprs = _exchange(h2.config.OutputLogger(out, trace_level=True))
    assert reprs == 1  # formatted once, by the logger, with the same text as before
    data = next(f for f in frames if isinstance(f, hyperframe.frame.DataFrame))
    assert f"h2 (trace): Received frame: {data!r}\n" in out.getvalue()


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info {name}"


def test_writes_within_one_loop_iteration_go_out_as_one():
    async def main() -> None:
        real = _RecordingTransport()
        coalescing = transport._CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write(b"HEADERS")
        coalescing.write(b"")
        coalescing.write(b"DATA")
        coalescing.write(b"TRAILERS")
        assert real.writes == []
        await asyncio.sleep(0)
        assert real.writes == [b"HEADERSDATATRAILERS"]
        coalescing.write(b"GOAWAY")
        coalescing.close()  # what was written before close goes out before it
        assert real.writes == [b"HEADERSDATATRAILERS", b"GOAWAY"] and real.closed
        coalescing.write(b"late")
        await asyncio.sleep(0)  # dropped: the connection is closed, as a closed transport would
        assert real.writes == [b"HEADERSDATATRAILERS", b"GOAWAY"]
        assert coalescing.get_extra_info("peername") == "info peername"

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
        loop = runner.get_loop()
    # A handler finalised after its loop has closed writes at once (it cannot schedule a flush).
    real = _RecordingTransport()
    transport._CoalescingTransport(real, loop).write(b"RST_STREAM")  # type: ignore[arg-type]
    assert real.writes == [b"RST_STREAM"]
