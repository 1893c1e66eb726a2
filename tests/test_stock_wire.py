"""The wire's stock code path: grpclib's own protocol, channels, servers and codec (betterproto2's
own encoding), used on untested releases of grpclib, h2, hyperframe or betterproto2, or with
``TRIO_BRIDGE_STOCK_WIRE``: when it is chosen, and real calls over it, host and worker alike."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import betterproto2
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from trio_bridge._wire import overrides

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_requires_exactly_the_tested_ranges_of_what_we_override():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    required = {Requirement(line).name: Requirement(line).specifier for line in project["dependencies"]}
    for dist, tested in overrides.TESTED.items():
        assert required[dist] == SpecifierSet(tested), (dist, str(required[dist]), tested)
        assert any(s.operator == "<" for s in required[dist]), f"{dist} needs an upper bound"
    compiler = next(Requirement(line) for line in project["optional-dependencies"]["dev"] if line.startswith("betterproto2-compiler"))
    assert compiler.specifier == SpecifierSet(overrides.TESTED["betterproto2"])  # generated code checks major.minor


def test_installed_releases_are_tested_ones_and_every_fast_path_is_on():
    versions = overrides.installed_versions()
    assert all(SpecifierSet(overrides.TESTED[d]).contains(v) for d, v in versions.items()), versions
    assert all(path.on and not path.why for path in overrides.FAST_PATHS.values()), overrides.FAST_PATHS


def test_an_untested_release_or_a_missing_name_turns_its_fast_paths_off(monkeypatch):
    installed = overrides.installed_versions()
    monkeypatch.setattr(overrides, "installed_versions", lambda: {**installed, "h2": "5.0.0"})
    paths = overrides._decide("")
    assert not paths["http2"].on and paths["http2"].why == f"h2 5.0.0 is not a tested release ({overrides.TESTED['h2']})"
    assert not paths["coalesce"].on and not paths["worker_calls"].on and not paths["calls"].on
    assert paths["codec"].on and paths["abstract"].on
    monkeypatch.undo()

    monkeypatch.delattr(betterproto2, "_serialize_single")
    paths = overrides._decide("")
    assert not paths["codec"].on and paths["codec"].why == "betterproto2._serialize_single is missing"
    assert paths["http2"].on
    monkeypatch.undo()

    paths = overrides._decide("1")  # the debugging switch: every speed-up off, abstract sockets still reachable
    assert [name for name, path in paths.items() if path.on] == ["abstract"]
    assert paths["codec"].why == f"{overrides.STOCK_WIRE_ENV}=1"
    assert [name for name, path in overrides._decide("coalesce,abstract").items() if not path.on] == ["coalesce", "abstract"]


@pytest.mark.real_process
def test_unary_stream_arrays_and_cancellation_work_over_the_stock_wire():
    # A fresh interpreter (the choice is made at import), TRIO_BRIDGE_STOCK_WIRE=1 for it and for
    # its workers: grpclib's stock H2Protocol, channels, servers and codec on both sides.
    program = textwrap.dedent("""
        import sys
        import numpy as np
        import trio
        import trio_bridge
        from trio_bridge._wire import overrides

        ADAPTER = "tests.stock_wire_adapters:StockWire"

        async def main():
            assert [n for n, p in overrides.FAST_PATHS.items() if p.on] == ["abstract"], overrides.FAST_PATHS
            big = np.arange(3 << 20, dtype=np.float32) * 0.5  # 12 MiB: many HTTP/2 frames, a big protobuf field
            async with trio_bridge.open_pool(ADAPTER, size=1) as pool:
                assert await pool.execute("wire") == {
                    "codec": False, "http2": False, "coalesce": False, "calls": False, "worker_calls": False, "abstract": True,
                    "http2_loaded": False,
                }
                assert await pool.execute("add", {"a": 1}) == 3

                @pool.host_tool
                def split(text: str) -> list:
                    return text.split()

                # worker to host: grpclib's stock protocol, on uvloop, to the host's unix:@ address
                assert await pool.execute("ask_host", {"name": "split", "arguments": {"text": "a b"}}) == ["a", "b"]
                async with pool.stream("count", {"n": 5}) as chunks:
                    assert [c async for c in chunks] == [0, 1, 2, 3, 4]
                shared = await pool.execute("echo", {"value": big})  # through shared memory (the default)
                assert shared.dtype == big.dtype and np.array_equal(shared, big)
                for tool in ("async_sleep", "cooperative_sleep"):
                    with trio.move_on_after(0.5) as scope:
                        await pool.execute(tool, {"seconds": 60})
                    assert scope.cancelled_caught, tool
                    assert await pool.execute("add", {"a": 2}) == 4  # the worker took the cancellation
            async with trio_bridge.open_pool(ADAPTER, size=1, local=trio_bridge.LocalWorkers(shared_memory_threshold=None)) as pool:
                for value in (big, big[::-1] + 1):  # in-band, both ways
                    echoed = await pool.execute("echo", {"value": value})
                    assert echoed.dtype == value.dtype and np.array_equal(echoed, value)
                    async with pool.stream("echo_chunks", {"value": value[:300_000], "times": 3}) as chunks:
                        assert all([np.array_equal(c, value[:300_000]) async for c in chunks])
            assert "trio_bridge._wire.http2" not in sys.modules  # never imported: nothing of it ran
            print("ok")

        trio.run(main)
    """)
    env = {**os.environ, overrides.STOCK_WIRE_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout[-2000:] + done.stderr[-4000:]
    assert "the wire's stock code path is used for codec: TRIO_BRIDGE_STOCK_WIRE=1" in done.stderr
