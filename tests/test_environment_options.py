"""``open_pool``'s options from ``TRIO_BRIDGE_*`` variables: an option the program leaves out
(in ``open_pool`` or in a group) takes its variable; one it passes wins, even when equal to the
default; a variable that does not parse, or sets a value out of range, is refused by name before
anything starts."""

from __future__ import annotations

import pytest

from trio_bridge import InvalidArgumentError, Lifecycle, LocalWorkers, Monitoring, Recycling, open_pool
from trio_bridge._host._options import pool_options

# every variable, and where its value lands
EVERY_VARIABLE = {
    "TRIO_BRIDGE_WORKERS": ("3", lambda o: o.size, 3),
    "TRIO_BRIDGE_CONCURRENCY": ("4", lambda o: o.concurrency, 4),
    "TRIO_BRIDGE_MAX_QUEUE": ("7", lambda o: o.max_queue, 7),
    "TRIO_BRIDGE_TRANSPORT": ("tcp", lambda o: o.transport, "tcp"),
    "TRIO_BRIDGE_STATE": ("redis://h:1/0", lambda o: o.state, "redis://h:1/0"),
    "TRIO_BRIDGE_STARTUP_TIMEOUT": ("61", lambda o: o.lifecycle.startup_timeout, 61.0),
    "TRIO_BRIDGE_SHUTDOWN_TIMEOUT": ("2.5", lambda o: o.lifecycle.shutdown_timeout, 2.5),
    "TRIO_BRIDGE_CANCEL_GRACE": ("0.5", lambda o: o.lifecycle.cancel_grace, 0.5),
    "TRIO_BRIDGE_HEALTH_CHECK_INTERVAL": ("0", lambda o: o.lifecycle.health_check_interval, 0.0),
    "TRIO_BRIDGE_HEARTBEAT_INTERVAL": ("1", lambda o: o.lifecycle.heartbeat_interval, 1.0),
    "TRIO_BRIDGE_NO_WORKER_TIMEOUT": ("9", lambda o: o.lifecycle.no_worker_timeout, 9.0),
    "TRIO_BRIDGE_MAX_CALLS_PER_WORKER": ("100", lambda o: o.recycling.max_calls, 100),
    "TRIO_BRIDGE_MAX_WORKER_AGE": ("60", lambda o: o.recycling.max_age, 60.0),
    "TRIO_BRIDGE_MAX_WORKER_MEMORY": ("1000000", lambda o: o.recycling.max_memory, 1_000_000),
    "TRIO_BRIDGE_METRICS_ADDRESS": ("127.0.0.1:0", lambda o: o.monitoring.address, "127.0.0.1:0"),
    "TRIO_BRIDGE_STATUS_PUBLIC": ("yes", lambda o: o.monitoring.status_public, True),
    "TRIO_BRIDGE_HEALTH_ADDRESS": ("0.0.0.0:7001", lambda o: o.monitoring.health_address, "0.0.0.0:7001"),
    "TRIO_BRIDGE_GPUS_PER_WORKER": ("2", lambda o: o.local.gpus_per_worker, 2),
    "TRIO_BRIDGE_START_METHOD": ("spawn", lambda o: o.local.start_method, "spawn"),
    "TRIO_BRIDGE_SHARED_MEMORY_THRESHOLD": ("none", lambda o: o.local.shared_memory_threshold, None),
    "TRIO_BRIDGE_LIBRARY_THREADS": ("0", lambda o: o.local.library_threads, 0),
}


@pytest.mark.parametrize("variable", sorted(EVERY_VARIABLE))
def test_each_variable_sets_its_field_of_the_options(variable):
    value, field, expected = EVERY_VARIABLE[variable]
    assert field(pool_options("a.b:C", {}, environ={variable: value})) == expected
    assert field(pool_options("a.b:C", {}, environ={variable: " "})) == field(pool_options("a.b:C", {}, environ={}))


def test_variables_replace_only_what_the_call_left_out():
    environ = {"TRIO_BRIDGE_CONCURRENCY": "4", "TRIO_BRIDGE_SHUTDOWN_TIMEOUT": "2.5", "TRIO_BRIDGE_WORKERS": "3",
               "TRIO_BRIDGE_MAX_WORKER_AGE": "60", "TRIO_BRIDGE_STATE": " "}
    options = pool_options("a.b:C", {}, environ=environ)
    assert (options.concurrency, options.lifecycle.shutdown_timeout, options.size) == (4, 2.5, 3)
    assert options.state is None  # an empty variable sets nothing
    assert options.max_queue == 1024  # no variable: the default
    given = pool_options("a.b:C", {
        "concurrency": 1, "size": 2,  # passed by the program, one of them equal to the default
        "lifecycle": Lifecycle(shutdown_timeout=5.0, cancel_grace=1.0), "recycling": Recycling(max_age=None),
    }, environ=environ)
    assert (given.concurrency, given.size, given.lifecycle.shutdown_timeout, given.recycling.max_age) == (1, 2, 5.0, None)
    assert given.lifecycle.cancel_grace == 1.0
    # a field the group left out still takes its variable
    assert pool_options("a.b:C", {"lifecycle": Lifecycle(cancel_grace=1.0)}, environ=environ).lifecycle.shutdown_timeout == 2.5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("TRIO_BRIDGE_CONCURRENCY", "four", "TRIO_BRIDGE_CONCURRENCY='four' does not set concurrency"),
        ("TRIO_BRIDGE_TRANSPORT", "udp", "must be one of unix, tcp"),
        ("TRIO_BRIDGE_MAX_WORKER_AGE", "1h", "does not set Recycling.max_age"),
        ("TRIO_BRIDGE_MAX_QUEUE", "-3", "TRIO_BRIDGE_MAX_QUEUE='-3' does not set max_queue: max_queue must be a whole number >= 0"),
        ("TRIO_BRIDGE_CANCEL_GRACE", "nan", "does not set Lifecycle.cancel_grace: .* seconds >= 0"),
        ("TRIO_BRIDGE_STATUS_PUBLIC", "maybe", "TRIO_BRIDGE_STATUS_PUBLIC='maybe' does not set Monitoring.status_public"),
        ("TRIO_BRIDGE_METRICS_ADDRESS", "nowhere", "does not set Monitoring.address"),
        ("TRIO_BRIDGE_LIBRARY_THREADS", "-2", "does not set LocalWorkers.library_threads: .* whole number >= 0"),
    ],
)
def test_a_variable_that_does_not_parse_or_is_out_of_range_is_refused_by_name(variable, value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        pool_options("a.b:C", {}, environ={variable: value})
    with pytest.raises(InvalidArgumentError, match=message):  # as open_pool reads it, at once
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(variable, value)
            open_pool("a.b:C")


def test_variables_and_groups_together_are_checked_once_complete():
    # the variable makes the status public: the address beyond loopback needs no token then
    environ = {"TRIO_BRIDGE_STATUS_PUBLIC": "1"}
    assert pool_options("a.b:C", {"monitoring": Monitoring(address="0.0.0.0:9464")}, environ=environ).monitoring.status_public
    # the variable gives the GPU count that LocalWorkers(gpus=...) needs
    assert pool_options("a.b:C", {"local": LocalWorkers(gpus=[0, 1])}, environ={"TRIO_BRIDGE_GPUS_PER_WORKER": "1"}).local.gpus == (0, 1)
    with pytest.raises(InvalidArgumentError, match=r"without LocalWorkers\.gpus_per_worker"):
        pool_options("a.b:C", {"local": LocalWorkers(gpus=[0, 1])}, environ={})


@pytest.mark.real_process
async def test_a_deployment_sizes_and_exposes_a_pool_through_the_environment(monkeypatch):
    monkeypatch.setenv("TRIO_BRIDGE_WORKERS", "2")
    monkeypatch.setenv("TRIO_BRIDGE_METRICS_ADDRESS", "127.0.0.1:0")
    async with open_pool("tests.adapters:Echo") as pool:
        assert len(pool.workers()) == 2 and pool.metrics_address is not None
    async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address=None)) as pool:
        assert len(pool.workers()) == 1 and pool.metrics_address is None  # the program's own arguments win
    monkeypatch.setenv("TRIO_BRIDGE_MAX_QUEUE", "-3")
    with pytest.raises(InvalidArgumentError, match="max_queue"):  # parsed, then refused as an argument is
        async with open_pool("tests.adapters:Echo"):
            pytest.fail("the pool opened")
