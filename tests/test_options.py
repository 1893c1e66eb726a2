"""``open_pool``'s options in groups (``Lifecycle``, ``Recycling``, ``StateLimits``,
``Monitoring``, ``LocalWorkers``, ``RemoteWorkers``): each is frozen and checked when made (a bad
value is an ``InvalidArgumentError`` naming its field, and makes nothing); ``open_pool`` takes
them whole, with few parameters; the keywords of before the groups still work for one release,
with a ``DeprecationWarning`` naming the new spelling."""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle

import pytest

from tests.helpers import require
from trio_bridge import (
    InvalidArgumentError,
    Lifecycle,
    LocalWorkers,
    Monitoring,
    Recycling,
    RemoteWorkers,
    StateLimits,
    open_pool,
)
from trio_bridge._host._options import pool_options
from trio_bridge.testing import open_fake_pool

GROUPS = [Lifecycle, Recycling, StateLimits, Monitoring, LocalWorkers, RemoteWorkers]
TOKEN = "a-shared-secret-of-32-characters"


def test_open_pool_takes_the_everyday_options_and_the_groups():
    parameters = inspect.signature(open_pool).parameters
    assert len(parameters) <= 15
    for group in GROUPS:
        annotation = next(p.annotation for p in parameters.values() if group.__name__ in str(p.annotation))
        assert annotation == f"{group.__name__} | None"


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_a_group_is_frozen_comparable_and_picklable(group):
    made = group()
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.x = 1  # type: ignore[attr-defined]
    assert made == group() and pickle.loads(pickle.dumps(made)) == made
    assert "<default>" not in repr(made)  # what was left out shows its default


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Lifecycle(startup_timeout=-1), "Lifecycle.startup_timeout"),
        (lambda: Lifecycle(cancel_grace=math.nan), "Lifecycle.cancel_grace"),
        (lambda: Lifecycle(restart_backoff=(2, 1)), "Lifecycle.restart_backoff"),
        (lambda: Lifecycle(restart_backoff=(0, math.inf)), "Lifecycle.restart_backoff"),
        (lambda: Lifecycle(handle_signals=1), "Lifecycle.handle_signals"),
        (lambda: Recycling(max_calls=0), "Recycling.max_calls"),
        (lambda: Recycling(max_calls=2.5), "Recycling.max_calls"),
        (lambda: Recycling(max_age=math.inf), "Recycling.max_age"),
        (lambda: Recycling(max_memory=True), "Recycling.max_memory"),
        (lambda: StateLimits(max_sessions=0), "StateLimits.max_sessions"),
        (lambda: StateLimits(history_limit=-1), "StateLimits.history_limit"),
        (lambda: Monitoring(registry=object()), "Monitoring.registry"),
        (lambda: Monitoring(address="nowhere"), "Monitoring.address"),
        (lambda: Monitoring(token="short"), "Monitoring.token"),
        (lambda: LocalWorkers(env={"A": 1}), "LocalWorkers.env"),
        (lambda: LocalWorkers(slot_env={}), "LocalWorkers.slot_env"),
        (lambda: LocalWorkers(gpus="01"), "LocalWorkers.gpus"),
        (lambda: LocalWorkers(start_method="fork"), "LocalWorkers.start_method"),
        (lambda: LocalWorkers(allowed_uids=[-1]), "LocalWorkers.allowed_uids"),
        (lambda: LocalWorkers(shared_memory_threshold=-1), "LocalWorkers.shared_memory_threshold"),
        (lambda: RemoteWorkers(addresses="tcp://h:1"), "RemoteWorkers.addresses"),
        (lambda: RemoteWorkers(listen="h:1"), "RemoteWorkers.listen"),
        (lambda: RemoteWorkers(tls="cert.pem"), "RemoteWorkers.tls"),
        (lambda: RemoteWorkers(addresses=["dns://workers.test"]), "RemoteWorkers.addresses"),
        (lambda: RemoteWorkers(addresses=["dns://:7000"]), "RemoteWorkers.addresses"),
        (lambda: RemoteWorkers(addresses=["dns://workers.test:0"]), "RemoteWorkers.addresses"),
        (lambda: RemoteWorkers(addresses=["dns://workers.test:70000"]), "RemoteWorkers.addresses"),
        (lambda: RemoteWorkers(nameservers=["ns.example.com"]), "RemoteWorkers.nameservers"),
        (lambda: RemoteWorkers(nameservers=["10.0.0.2:0"]), "RemoteWorkers.nameservers"),
        (lambda: RemoteWorkers(nameservers="10.0.0.2"), "RemoteWorkers.nameservers"),
        (lambda: RemoteWorkers(connect_timeout=0), "RemoteWorkers.connect_timeout"),
        (lambda: RemoteWorkers(resolve_interval=math.inf), "RemoteWorkers.resolve_interval"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(make, field):
    with pytest.raises(InvalidArgumentError, match=field.replace(".", r"\.")):
        make()


def test_any_value_either_fits_its_field_or_is_refused_naming_it_and_nothing_changes():
    hypothesis = require("hypothesis")
    st = hypothesis.strategies
    values = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.binary(max_size=8),
        st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=8)), max_size=3),
        st.tuples(st.floats(), st.floats()), st.tuples(st.integers(), st.integers()),
        st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers()), max_size=2),
        st.just(object()), st.just(lambda slot: {}),
    )
    fields = [(group, f.name) for group in GROUPS for f in dataclasses.fields(group)]

    @hypothesis.settings(max_examples=600, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.sampled_from(fields), values)
    def check(field, value):
        group, name = field
        before = group()
        try:
            made = group(**{name: value})
        except InvalidArgumentError as exc:
            assert f"{group.__name__}.{name}" in str(exc) or group is RemoteWorkers  # (RemoteWorkers: the token's absence)
        else:
            assert made == dataclasses.replace(made)  # what it kept is what it accepts again
        assert before == group()

    check()


def test_the_old_keywords_still_work_with_a_warning_that_names_the_new_spelling():
    # the one test of the old spelling (the CHANGELOG: it goes in a release)
    with pytest.warns(DeprecationWarning) as warned:
        options = pool_options("a.b:C", {"max_calls_per_worker": 10, "shutdown_timeout": 1.0}, environ={}, stacklevel=1)
    assert [str(w.message) for w in warned] == [
        "max_calls_per_worker= is deprecated; pass recycling=Recycling(max_calls=...)",
        "shutdown_timeout= is deprecated; pass lifecycle=Lifecycle(shutdown_timeout=...)",
    ]
    assert options.recycling == Recycling(max_calls=10) and options.lifecycle.shutdown_timeout == 1.0
    with pytest.warns(DeprecationWarning) as warned:
        old = pool_options("a.b:C", {
            "remote_workers": ["tcp://127.0.0.2:7000"], "token": TOKEN, "metrics_address": "127.0.0.1:0",
            "worker_env": dict, "history_limit": 3,
        }, environ={}, stacklevel=1)
    assert sorted(str(w.message) for w in warned) == [
        "history_limit= is deprecated; pass state_limits=StateLimits(history_limit=...)",
        "metrics_address= is deprecated; pass monitoring=Monitoring(address=...)",
        "remote_workers= is deprecated; pass remote=RemoteWorkers(addresses=...)",
        "token= is deprecated; pass remote=RemoteWorkers(token=...)",
        "worker_env= is deprecated; pass local=LocalWorkers(slot_env=...)",
    ]
    assert all(w.filename == __file__ for w in warned)  # attributed to the caller's line
    assert old.remote.addresses == ("tcp:127.0.0.2:7000",) and old.monitoring.address == "127.0.0.1:0"
    assert old.local.slot_env is dict and old.state_limits.history_limit == 3 and old.size == 0
    with pytest.warns(DeprecationWarning, match="shutdown_timeout= is deprecated") as warned:
        open_pool("a.b:C", shutdown_timeout=1.0)  # (not entered)
    assert warned[0].filename == __file__


async def test_an_old_keyword_works_in_a_fake_pool_too():
    with pytest.warns(DeprecationWarning, match="cancel_grace= is deprecated") as warned:
        async with open_fake_pool({"add": lambda a: a + 1}, cancel_grace=2.0) as (pool, _):
            assert await pool.execute("add", {"a": 1}) == 2
    assert warned[0].filename == __file__


def test_an_old_keyword_with_its_group_is_refused_and_an_unknown_keyword_is_a_type_error():
    with pytest.warns(DeprecationWarning), pytest.raises(InvalidArgumentError, match=r"max_calls_per_worker= or recycling=Recycling\(\.\.\.\), not both"):
        open_pool("a.b:C", recycling=Recycling(max_age=5.0), max_calls_per_worker=10)
    with pytest.raises(TypeError, match="open_pool\\(\\) got an unexpected keyword argument 'max_calls'"):
        open_pool("a.b:C", max_calls=10)
    with pytest.raises(TypeError, match="open_fake_pool\\(\\) got an unexpected keyword argument 'sizes'"):
        open_fake_pool({}, sizes=2)
    with pytest.raises(InvalidArgumentError, match=r"recycling must be a trio_bridge\.Recycling"):
        open_pool("a.b:C", recycling={"max_calls": 3})  # type: ignore[arg-type]


def test_an_everyday_option_is_refused_under_its_own_name():
    for arguments, message in (({"max_queue": -1}, "^max_queue must be"), ({"transport": "udp"}, "^transport must be one of")):
        with pytest.raises(InvalidArgumentError, match=message):
            open_pool("a.b:C", **arguments)


def test_options_that_only_fit_together_are_checked_when_the_pool_opens():
    with pytest.raises(InvalidArgumentError, match=r"size must be a whole number >= 1, not 0 \(size=0, a head with no local workers, needs remote"):
        pool_options("a.b:C", {"size": 0}, environ={})
    head = pool_options("a.b:C", {"size": 0, "remote": RemoteWorkers(listen="tcp://127.0.0.1:0", token=TOKEN)}, environ={})
    assert head.size == 0 and head.slots == 0
    found = RemoteWorkers(addresses=["dns://workers.ns.svc:7000", "tcp://127.0.0.2:1"], token=TOKEN, insecure=True)
    assert found.names == ("dns://workers.ns.svc:7000",) and found.fixed == ("tcp:127.0.0.2:1",)
    assert pool_options("a.b:C", {"remote": found}, environ={}).slots == 1  # a name's slots come as it resolves
    with pytest.raises(InvalidArgumentError, match=r"plain TCP beyond this machine \(dns://workers.ns.svc:7000\)"):
        RemoteWorkers(addresses=["dns://workers.ns.svc:7000"], token=TOKEN)
    with pytest.raises(InvalidArgumentError, match="a name, not an IP address"):
        RemoteWorkers(addresses=["dns://10.0.0.5:7000"], token=TOKEN, insecure=True)
    assert RemoteWorkers(addresses=["tcp://[::1]:7000"], token=TOKEN).fixed == ("tcp:::1:7000",)
    assert pool_options("a.b:C", {"remote": RemoteWorkers(addresses=["tcp://127.0.0.2:1"], token=TOKEN)}, environ={}).size == 0
    with pytest.raises(InvalidArgumentError, match=r"Monitoring.address 0.0.0.0:9 is not loopback.*Monitoring\(token=...\)"):
        pool_options("a.b:C", {"monitoring": Monitoring(address="0.0.0.0:9")}, environ={})
    for monitoring, remote in ((Monitoring(address="0.0.0.0:9", token=TOKEN), None), (Monitoring(address="0.0.0.0:9"), RemoteWorkers(token=TOKEN))):
        assert pool_options("a.b:C", {"monitoring": monitoring, "remote": remote}, environ={}).status_token == TOKEN
    with pytest.raises(InvalidArgumentError, match="need a token"):
        RemoteWorkers(listen="tcp://127.0.0.1:0")
    remote = pool_options(
        "a.b:C", {"remote": RemoteWorkers(listen="tcp://127.0.0.1:0", token=TOKEN), "lifecycle": Lifecycle(health_check_interval=10)},
        environ={},
    )
    assert remote.lifecycle.health_check_interval == 2.0 and remote.local.shared_memory_threshold is None
