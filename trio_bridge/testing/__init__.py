"""Test support for code that uses trio-bridge.

- :func:`open_fake_pool`: a real pool whose workers are in-memory fakes running plain Python
  functions as tools, in Trio, on Trio's clock (kill them, hang them, fail their starts; no
  process, no wire, no worker side).
- :func:`open_adapter_pool`: a real pool whose workers run your adapter in this process, in
  Trio (async tools on Trio's clock, so the autojump clock works; sync tools in Trio worker
  threads; no process, no wire).
- :func:`open_pool_in_threads`: a real pool whose workers run your adapter with the real worker
  side and the real wire, each in a thread of this process instead of a process (fast to start;
  no process isolation).
- :class:`RedisServer`: a real Redis-protocol server (valkey) for tests of shared state.
- :class:`Certificates`, :class:`RemoteWorkerProcess` and :func:`write_token_file`: remote
  workers over TLS on loopback addresses that stand for other machines.

For pytest, :mod:`trio_bridge.testing.pytest_plugin` offers a ``trio_bridge_pool`` fixture that
opens real pools (worker processes) for a test and closes them after it.
"""

from trio_bridge.testing._fakes import (
    FakeContext,
    FakePool,
    FakeWorker,
    FakeWorkers,
    StartAttempt,
    open_fake_pool,
    stubborn,
)
from trio_bridge.testing._inprocess import open_adapter_pool
from trio_bridge.testing._redis import RedisServer, free_port
from trio_bridge.testing._remote import Certificates, RemoteWorkerProcess, write_token_file
from trio_bridge.testing._threads import open_pool_in_threads

__all__ = [
    "Certificates", "FakeContext", "FakePool", "FakeWorker", "FakeWorkers", "RedisServer", "RemoteWorkerProcess",
    "StartAttempt", "free_port", "open_adapter_pool", "open_fake_pool", "open_pool_in_threads", "stubborn",
    "write_token_file",
]

for _name in __all__:  # shown as trio_bridge.testing.X
    _object = globals()[_name]
    if getattr(_object, "__module__", "").startswith("trio_bridge.testing."):
        _object.__module__ = __name__
del _name, _object
