"""``open_pool``'s options from ``TRIO_BRIDGE_*`` variables: an option the program leaves at its
default takes its variable; one it passes wins, even when equal to the default; a variable that
does not parse is refused, by name, before anything starts."""

from __future__ import annotations

import inspect

import pytest

from trio_bridge import InvalidArgumentError, open_pool
from trio_bridge._host._environment import VARIABLES, with_environment


def defaults() -> dict:
    return {
        name: p.default for name, p in inspect.signature(open_pool).parameters.items() if name in VARIABLES
    }


def test_variables_replace_only_what_the_call_left_at_its_default():
    environ = {"TRIO_BRIDGE_CONCURRENCY": "4", "TRIO_BRIDGE_SHUTDOWN_TIMEOUT": "2.5", "TRIO_BRIDGE_WORKERS": "3",
               "TRIO_BRIDGE_SHARED_MEMORY_THRESHOLD": "none", "TRIO_BRIDGE_TRANSPORT": "tcp", "TRIO_BRIDGE_STATE": " "}
    options = with_environment(defaults(), environ)
    assert (options["concurrency"], options["shutdown_timeout"], options["size"]) == (4, 2.5, 3)
    assert options["shared_memory_threshold"] is None and options["transport"] == "tcp"
    assert options["state"] is None  # an empty variable sets nothing
    assert options["max_queue"] == 1024  # no variable: the default
    given = {**defaults(), "concurrency": 1, "size": 2}  # passed by the program, one of them equal to the default
    assert with_environment(given, environ)["concurrency"] == 1
    assert with_environment(given, environ)["size"] == 2


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRIO_BRIDGE_CONCURRENCY", "four", "TRIO_BRIDGE_CONCURRENCY='four' does not set concurrency"),
        ("TRIO_BRIDGE_TRANSPORT", "udp", "must be one of unix, tcp"),
        ("TRIO_BRIDGE_MAX_WORKER_AGE", "1h", "does not set max_worker_age"),
    ],
)
def test_a_variable_that_does_not_parse_is_refused_by_name(variable, value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        with_environment(defaults(), {variable: value})


@pytest.mark.real_process
async def test_a_deployment_sizes_and_exposes_a_pool_through_the_environment(monkeypatch):
    monkeypatch.setenv("TRIO_BRIDGE_WORKERS", "2")
    monkeypatch.setenv("TRIO_BRIDGE_METRICS_ADDRESS", "127.0.0.1:0")
    async with open_pool("tests.adapters:Echo") as pool:
        assert len(pool.workers()) == 2 and pool.metrics_address is not None
    async with open_pool("tests.adapters:Echo", size=1, metrics_address=None) as pool:
        assert len(pool.workers()) == 1  # the program's own argument wins
    monkeypatch.setenv("TRIO_BRIDGE_MAX_QUEUE", "-3")
    with pytest.raises(InvalidArgumentError, match="max_queue"):  # parsed, then refused as an argument is
        async with open_pool("tests.adapters:Echo"):
            pytest.fail("the pool opened")
