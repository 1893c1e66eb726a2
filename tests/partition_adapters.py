"""The adapter of the partition tests (tests/test_partitions.py): Echo's tools (echo, pid,
cooperative_sleep, count, ...) and Stateful's (watch, write, ...)."""

from __future__ import annotations

from tests.adapters import Echo
from tests.state_adapters import Stateful


class Partitioned(Echo, Stateful):
    def setup(self) -> None:
        Echo.setup(self)
        Stateful.setup(self)
