"""``open_pool``'s options: the groups a program passes (:class:`Lifecycle`, :class:`Recycling`,
:class:`StateLimits`, :class:`Monitoring`, :class:`LocalWorkers`, :class:`RemoteWorkers`) and
:class:`PoolOptions`, all of one pool's options, made once by :func:`pool_options` from the
arguments, then the ``TRIO_BRIDGE_*`` variables, then the defaults. Every option is checked
here and nowhere else: a field's own check when it is set, the checks that span fields when the
pool's options are complete.

An option left out is :data:`DEFAULT` (``<default>``), the one sentinel: a group fills in its
default and remembers that it was left out, so that its variable (a deployment's setting) takes
its place when a pool opens. An option passed wins, even one equal to its default (``None``
included). As in grpclib's ``Configuration``, each field carries its default, its check and its
variable in its metadata.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar, Final, Literal, TypeVar, final

from prometheus_client.registry import CollectorRegistry

from trio_bridge._checks import positive_seconds, whole
from trio_bridge._errors import InvalidArgumentError
from trio_bridge._host._cpus import usable_cpus
from trio_bridge._host._environment import choice, flag, optional_whole, read_variable
from trio_bridge._host._forkserver import START_METHODS, StartMethod
from trio_bridge._state.backend import StateBackend
from trio_bridge._state.calls import DEFAULT_IDEMPOTENCY_TTL, DEFAULT_MAX_IDEMPOTENCY_RECORDS
from trio_bridge._util import public_module
from trio_bridge._wire.codec import short_repr
from trio_bridge._wire.listeners import MIN_TOKEN, beyond_loopback, loopback
from trio_bridge._wire.tls import TLSConfig
from trio_bridge._wire.transport import parse_address

__all__ = [
    "DEFAULT", "LocalWorkers", "Lifecycle", "Monitoring", "PoolOptions", "Recycling", "RemoteWorkers", "StateLimits",
    "check_seconds", "pool_options", "tcp_address",
]

Transport = Literal["unix", "tcp"]
G = TypeVar("G", bound="_Group")


class _Default:
    """The type of :data:`DEFAULT`."""

    def __repr__(self) -> str:
        return "<default>"

    def __reduce__(self) -> str:
        return "DEFAULT"  # pickles as this module's one instance


DEFAULT: Final[Any] = _Default()
"""An option left out: its ``TRIO_BRIDGE_*`` variable's value where that is set, else its default."""

_SPEC = "trio_bridge.option"
_HEALTH_CHECK_OF_REMOTE = 2.0  # seconds: a lost remote worker is noticed within seconds
DNS_SCHEME = "dns://"


# ---- the checks of one value: (qualified name, value) -> the value to keep ----
Check = Callable[[str, Any], Any]


def check_seconds(name: str, value: Any) -> float:
    """``value``, a number of seconds >= 0.

    Raises:
        InvalidArgumentError: it is not one (``name`` names it).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # (NaN is not)
        raise InvalidArgumentError(f"{name} must be a number of seconds >= 0, not {short_repr(value)}")
    return value


def _limit(unit: str, *, whole: bool) -> Check:
    def check(name: str, value: Any) -> float | None:
        if value is None:
            return None
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
            what = "a whole number" if whole else "a number"
            raise InvalidArgumentError(f"{name} must be None or {what} of {unit} > 0, not {short_repr(value)}")
        return value

    return check


def _optional(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def _one_of(*allowed: str, none: str | None = None) -> Check:
    """One of ``allowed``; or ``None`` too, when ``none`` says what it means."""
    def check(name: str, value: Any) -> str | None:
        if value is None and none is not None:
            return None
        if not isinstance(value, str) or value not in allowed:
            also = f" or None ({none})" if none is not None else ""
            raise InvalidArgumentError(f"{name} must be one of {', '.join(map(repr, allowed))}{also}, not {short_repr(value)}")
        return value

    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, not {short_repr(value)}")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{name} must be a non-empty str, not {short_repr(value)}")
    return value


def _instance(cls: type, what: str) -> Check:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, cls):
            raise InvalidArgumentError(f"{name} must be {what}, not {short_repr(value)}")
        return value

    return check


def _backoff(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = value
        if isinstance(low, bool) or isinstance(high, bool) or not 0 <= low <= high < math.inf:
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"{name} must be (first, longest) seconds, 0 <= first <= longest, not {short_repr(value)}"
        ) from None
    return (low, high)


def _adapter(name: str, value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise InvalidArgumentError(f"{name} must be 'package.module:ClassName', not {short_repr(value)}")
    return value


def _json(name: str, value: Any) -> dict[str, Any] | None:
    try:
        json.dumps(value or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{name} must be JSON-able: {exc}") from None
    return value


def _state(name: str, value: Any) -> StateBackend | str | None:
    if value is not None and not isinstance(value, (StateBackend, str)):
        raise InvalidArgumentError(f"{name} must be a StateBackend, a Redis URL or None, not {short_repr(value)}")
    return value


def _environment(name: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgumentError(f"{name} must be a mapping of str to str, not {short_repr(value)}")
    return dict(value)


def _callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise InvalidArgumentError(f"{name} must be a callable of the slot, not {short_repr(value)}")
    return value


def _devices(name: str, value: Any) -> tuple[int | str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
        isinstance(d, (int, str)) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgumentError(f"{name} must be a list of GPU indices or UUIDs, not {short_repr(value)}")
    return tuple(value)


def _uids(name: str, value: Any) -> frozenset[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
        raise InvalidArgumentError(f"{name} must be a collection of uids (e.g. [1001]), not {short_repr(value)}")
    for uid in value:
        if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
            raise InvalidArgumentError(f"{name} must hold uids, whole numbers >= 0, not {short_repr(uid)}")
    return frozenset(value)


def tcp_address(name: str, value: Any) -> str:
    """``value``, ``tcp://HOST:PORT`` (or ``tcp:HOST:PORT``), as ``"tcp:HOST:PORT"``.

    Raises:
        InvalidArgumentError: it is not one (``name`` names it).
    """
    if isinstance(value, str):
        try:
            scheme, host, port = parse_address(value)
        except ValueError:
            scheme = ""
        if scheme == "tcp":
            return f"tcp:{host}:{port}"
    raise InvalidArgumentError(f"{name}: an address is tcp://HOST:PORT, not {short_repr(value)}")


def _worker_address(name: str, value: Any) -> str:
    """A remote worker's address: ``tcp:HOST:PORT``, or ``dns://NAME:PORT`` kept as it is
    (a name whose every A/AAAA record is a worker: see :mod:`trio_bridge._host._discovery`)."""
    if isinstance(value, str) and value.startswith(DNS_SCHEME):
        host, _, port = value.removeprefix(DNS_SCHEME).rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host and not _is_ip(host):
            return f"{DNS_SCHEME}{host}:{int(port)}"
        raise InvalidArgumentError(
            f"{name}: a DNS name of workers is dns://NAME:PORT (a name, not an IP address: give that as tcp://), "
            f"not {short_repr(value)}"
        )
    return tcp_address(name, value)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _addresses(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"{name} must be a list of tcp://HOST:PORT or dns://NAME:PORT, not {short_repr(value)}")
    return tuple(_worker_address(name, address) for address in value)


def _nameservers(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"{name} must be a list of 'HOST' or 'HOST:PORT', not {short_repr(value)}")
    for server in value:
        host, _ = split_nameserver(server) if isinstance(server, str) else ("", 0)
        if not host:
            raise InvalidArgumentError(f"{name}: a name server is 'HOST' or 'HOST:PORT' (an IP address), not {short_repr(server)}")
    return tuple(value)


def split_nameserver(server: str) -> tuple[str, int]:
    """``"10.0.0.2"`` -> ``("10.0.0.2", 53)``; ``"10.0.0.2:5353"`` and ``"[::1]:53"`` -> host and port;
    ``("", 0)`` if it is not an IP address (with a port of 1..65535)."""
    host, port = server, "53"
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "", 0
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "", 0
    return host, int(port)


def _host_port(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be 'HOST:PORT', not {short_repr(value)}")
    try:
        parse_address(value if value.startswith("tcp:") else f"tcp:{value}")
    except ValueError as exc:
        raise InvalidArgumentError(f"{name}: {exc}") from None
    return value


def _token(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) < MIN_TOKEN:
        raise InvalidArgumentError(f"{name} must be a shared secret of at least {MIN_TOKEN} characters")
    return value


# ---- fields and groups ----
@dataclass(frozen=True)
class _Spec:
    default: Any
    check: Check
    variable: str | None
    parse: Callable[[str], Any]


def _option(default: Any, check: Check, variable: str | None = None, parse: Callable[[str], Any] = str) -> Any:
    """A field left out (:data:`DEFAULT`) until its group fills in ``default``; ``check`` runs on
    a value set; ``variable`` (parsed by ``parse``) may set it when it was left out."""
    return field(default=DEFAULT, metadata={_SPEC: _Spec(default, check, variable, parse)})


def _specs(cls: type) -> dict[str, _Spec]:
    return {f.name: f.metadata[_SPEC] for f in fields(cls) if _SPEC in f.metadata}


class _Group:
    """A frozen dataclass of :func:`_option` fields: each value set is checked, each left out
    takes its default, and the group remembers which were set."""

    _set: frozenset[str]
    _prefix: ClassVar[str | None] = None  # what its fields' names start with in messages (default: "Class.")

    def __post_init__(self) -> None:
        chosen = []
        prefix = self._prefix if self._prefix is not None else f"{type(self).__name__}."
        for name, spec in _specs(type(self)).items():
            value = getattr(self, name)
            if value is DEFAULT:
                value = spec.default
            else:
                value = spec.check(f"{prefix}{name}", value)
                chosen.append(name)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_set", frozenset(chosen))
        self._check_together()

    def _check_together(self) -> None:
        """What no field's own check sees (only fields no variable can change)."""


def _with_environment(cls: type[G], given: Mapping[str, Any], environ: Mapping[str, str], *, prefix: str) -> G:
    """A ``cls`` of ``given``, each field left out set by its variable where that is set."""
    values = dict(given)
    for name, spec in _specs(cls).items():
        if spec.variable is None or values.get(name, DEFAULT) is not DEFAULT:
            continue
        qualified = f"{prefix}{name}"
        found, value = read_variable(environ, spec.variable, spec.parse, qualified, partial(spec.check, qualified))
        if found:
            values[name] = value
    return cls(**values)


def _resolved(group: G, environ: Mapping[str, str]) -> G:
    cls = type(group)
    return _with_environment(cls, {name: getattr(group, name) for name in group._set}, environ, prefix=f"{cls.__name__}.")


@final
@public_module
@dataclass(frozen=True)
class Lifecycle(_Group):
    """How a pool's workers start, are watched and stop: ``open_pool(lifecycle=Lifecycle(...))``.

    A field left out takes its ``TRIO_BRIDGE_*`` variable where that is set (named below), else
    its default.

    Attributes:
        startup_timeout: seconds a worker may take to import its adapter, run ``setup()`` and
            report ready (default 60; ``TRIO_BRIDGE_STARTUP_TIMEOUT``).
        shutdown_timeout: seconds workers get to finish their calls when the pool closes
            (default 5; ``TRIO_BRIDGE_SHUTDOWN_TIMEOUT``).
        cancel_grace: seconds a worker gets to free its slot after a call was cancelled,
            before it is recycled (default 5; ``TRIO_BRIDGE_CANCEL_GRACE``).
        health_check_interval: seconds between pings of each worker; one that does not answer
            within that time is recycled; 0 disables them (default 10, at most 2 in a pool
            with remote workers; ``TRIO_BRIDGE_HEALTH_CHECK_INTERVAL``).
        heartbeat_interval: seconds between the workers' heartbeats to the host (default 5;
            ``TRIO_BRIDGE_HEARTBEAT_INTERVAL``).
        restart_backoff: ``(first, longest)`` delay in seconds before restarting a worker that
            failed again within 10 s of its restart (or start); it doubles on each failure in
            a row. A worker's first failure after a stable run is restarted at once (default
            ``(0.1, 5.0)``).
        no_worker_timeout: seconds a call waits while no worker runs and the last start
            failed, or while a pool with no local workers has no remote one yet (none found
            or joined); then it raises ``WorkerStartError`` carrying that failure (default 30;
            ``TRIO_BRIDGE_NO_WORKER_TIMEOUT``).
        handle_signals: while the pool is open, SIGINT and SIGTERM -- where the process still
            has Python's default handlers for them and the pool runs in the main thread --
            cancel the block and close the pool in order, then ``KeyboardInterrupt`` (SIGINT)
            or ``SystemExit(143)`` (SIGTERM) leaves the ``async with``; a second signal skips
            the drain. Without it (or with handlers of your own) SIGTERM ends the process at
            once, and the workers die with it (default ``True``).

    Raises:
        InvalidArgumentError: a number of seconds is not >= 0 (NaN neither), ``restart_backoff``
            is not ``0 <= first <= longest`` with ``longest`` finite, or ``handle_signals`` is
            not a bool (on construction; the message names the field).
    """

    startup_timeout: float = _option(60.0, check_seconds, "TRIO_BRIDGE_STARTUP_TIMEOUT", float)
    shutdown_timeout: float = _option(5.0, check_seconds, "TRIO_BRIDGE_SHUTDOWN_TIMEOUT", float)
    cancel_grace: float = _option(5.0, check_seconds, "TRIO_BRIDGE_CANCEL_GRACE", float)
    health_check_interval: float = _option(10.0, check_seconds, "TRIO_BRIDGE_HEALTH_CHECK_INTERVAL", float)
    heartbeat_interval: float = _option(5.0, check_seconds, "TRIO_BRIDGE_HEARTBEAT_INTERVAL", float)
    restart_backoff: tuple[float, float] = _option((0.1, 5.0), _backoff)
    no_worker_timeout: float = _option(30.0, check_seconds, "TRIO_BRIDGE_NO_WORKER_TIMEOUT", float)
    handle_signals: bool = _option(True, _bool)


@final
@public_module
@dataclass(frozen=True)
class Recycling(_Group):
    """When a worker is replaced by a fresh one: ``open_pool(recycling=Recycling(max_calls=1000))``.

    ``None`` (the default of each): no such limit. Recycling fails no call and never lowers
    capacity: the replacement starts first and takes the worker's place (the old worker serves
    on meanwhile, so it may pass the limit by the calls of one start-up), then the old worker
    finishes its calls, however long they take, and exits. What the old worker kept in memory
    (objects stored with ``store_as``) goes with it, as on a restart.
    ``WorkerInfo.last_recycle_reason`` says why; the log says it once.

    Attributes:
        max_calls: calls a worker is given (any outcome) before it is recycled
            (``TRIO_BRIDGE_MAX_CALLS_PER_WORKER``).
        max_age: seconds a worker runs, from when it became ready
            (``TRIO_BRIDGE_MAX_WORKER_AGE``).
        max_memory: bytes of the worker process's resident set size (RSS), sampled every
            second with psutil; local workers only (``TRIO_BRIDGE_MAX_WORKER_MEMORY``).

    Raises:
        InvalidArgumentError: a limit is neither ``None`` nor a positive finite number (whole
            for calls and bytes) (on construction; the message names the field).
    """

    max_calls: int | None = _option(None, _limit("calls", whole=True), "TRIO_BRIDGE_MAX_CALLS_PER_WORKER", int)
    max_age: float | None = _option(None, _limit("seconds", whole=False), "TRIO_BRIDGE_MAX_WORKER_AGE", float)
    max_memory: int | None = _option(None, _limit("bytes", whole=True), "TRIO_BRIDGE_MAX_WORKER_MEMORY", int)

    def __bool__(self) -> bool:
        """Whether it sets any limit."""
        return (self.max_calls, self.max_age, self.max_memory) != (None, None, None)


@final
@public_module
@dataclass(frozen=True)
class StateLimits(_Group):
    """Quotas of the state backend a pool makes from ``open_pool(state=...)`` (an in-memory one,
    or a :class:`RedisBackend` for a URL); a backend passed as an object keeps its own:
    ``open_pool(state_limits=StateLimits(max_sessions=100))``.

    Attributes:
        max_sessions: sessions that may exist at once (default 10,000).
        max_variables_per_session: variables a session may hold (default 1,000).
        max_value_bytes: the largest encoded value a variable (or a session's metadata) may
            hold, in bytes (default 64 MiB).
        history_limit: past values kept per variable (default 50).
        idempotency_ttl: seconds an idempotent call's record lives after its last write
            (``Pool.execute(..., idempotency_key=...)``; default 3600).
        max_idempotency_records: idempotency keys an in-memory backend keeps at most
            (default 100,000): beyond it the oldest records are dropped first (their keys are
            new again, as when they expire); a new key is refused (``QuotaExceededError``)
            while all are running calls'. Redis keys expire with their TTL: Redis's own
            ``maxmemory`` bounds them there.

    Raises:
        InvalidArgumentError: a quota is not a whole number >= 1 (``history_limit``: >= 0),
            or ``idempotency_ttl`` not a number of seconds > 0 (on construction; the message
            names the field).
    """

    max_sessions: int = _option(10_000, whole(1))
    max_variables_per_session: int = _option(1000, whole(1))
    max_value_bytes: int = _option(64 * 2**20, whole(1))
    history_limit: int = _option(50, whole(0))
    idempotency_ttl: float = _option(DEFAULT_IDEMPOTENCY_TTL, positive_seconds)
    max_idempotency_records: int = _option(DEFAULT_MAX_IDEMPOTENCY_RECORDS, whole(1))


@final
@public_module
@dataclass(frozen=True)
class Monitoring(_Group):
    """Where a pool's Prometheus metrics and its ``/status`` go:
    ``open_pool(monitoring=Monitoring(address="127.0.0.1:9100"))``.

    Attributes:
        registry: the prometheus_client registry the pool's metrics are on while it is open
            (default ``None``: prometheus_client's global ``REGISTRY``); see the README's
            "Metrics" for the metrics, each labelled with ``pool`` (the adapter).
        address: ``"HOST:PORT"`` where the pool serves ``registry`` as Prometheus text
            (``http://HOST:PORT/metrics``) while it is open (port 0: a free one;
            ``Pool.metrics_address`` says which); ``None`` (the default): not served
            (``TRIO_BRIDGE_METRICS_ADDRESS``). The same address serves ``/status`` (what
            ``trio-bridge top`` shows: pids, addresses, recent error text), open on loopback;
            on any other address (``0.0.0.0`` included) only to a request bearing ``token``
            (``Authorization: Bearer TOKEN``), so such an address needs ``token`` or
            ``status_public``. ``/metrics`` is open to anyone who reaches it.
        token: the bearer token ``/status`` asks for beyond loopback, at least 16 characters
            (default ``None``: :class:`RemoteWorkers`' ``token``).
        status_public: serve ``/status`` without a token on an address beyond loopback too
            (default ``False``; ``TRIO_BRIDGE_STATUS_PUBLIC``).
        health_address: ``"HOST:PORT"`` where the pool serves ``grpc.health.v1`` alone while
            it is open, for an orchestrator's native probes (Kubernetes' ``grpc:`` probe): in
            plain TCP and without a token, since such probes have neither, so on any address it
            reveals only two statuses and serves no other RPC. Service ``""``: SERVING while the
            pool is open, NOT_SERVING once it closes; ``"ready"``: SERVING while at least one
            worker is ready. Port 0: a free one (``Pool.health_address`` says which). ``None``
            (the default): not served (``TRIO_BRIDGE_HEALTH_ADDRESS``).
        session_metrics: how many sessions get their own series in the per-session metrics
            (``trio_bridge_session_queue_length``, ``..._session_calls_in_flight``,
            ``..._session_queue_wait_seconds``, labelled ``session``): at each scrape, those
            with the most calls queued, then in flight; so the series stay bounded however
            many sessions there are. A whole number >= 0 (default 10; 0: none).

    Raises:
        InvalidArgumentError: ``registry`` is not a ``CollectorRegistry``, ``address`` or
            ``health_address`` is not ``HOST:PORT``, ``token`` is too short, ``status_public`` is not a bool,
            ``session_metrics`` is not a whole number >= 0 (on construction); an address beyond loopback with neither a token nor
            ``status_public=True`` (when the pool opens).
    """

    registry: CollectorRegistry | None = _option(
        None, _optional(_instance(CollectorRegistry, "a prometheus_client CollectorRegistry"))
    )
    address: str | None = _option(None, _optional(_host_port), "TRIO_BRIDGE_METRICS_ADDRESS")
    token: str | None = _option(None, _optional(_token))
    status_public: bool = _option(False, _bool, "TRIO_BRIDGE_STATUS_PUBLIC", flag)
    health_address: str | None = _option(None, _optional(_host_port), "TRIO_BRIDGE_HEALTH_ADDRESS")
    session_metrics: int = _option(10, whole(0))


@final
@public_module
@dataclass(frozen=True)
class LocalWorkers(_Group):
    """How a pool starts its local worker processes: ``open_pool(local=LocalWorkers(...))``.

    Attributes:
        python: the interpreter for workers (default ``None``: the host's).
        env: extra environment variables for the workers (default: none).
        slot_env: ``slot_env(slot) -> {name: value}``, extra environment variables of each
            local slot's workers (``slot``: 0 .. size-1), e.g. to pin each to a device. Called
            once per slot when the pool opens; the slot's replacements get the same.
        gpus_per_worker: give each local slot that many GPUs of ``gpus`` in
            ``CUDA_VISIBLE_DEVICES`` (slot ``i`` gets the ``gpus_per_worker`` from
            ``i * gpus_per_worker`` on; with more slots than GPUs, slots share them
            round-robin), so a pool spreads model replicas over a machine's GPUs; ``slot_env``
            applies after it (``TRIO_BRIDGE_GPUS_PER_WORKER``).
        gpus: the GPUs ``gpus_per_worker`` shares out, as ``CUDA_VISIBLE_DEVICES`` names them
            (indices or UUIDs); default: the host's own ``CUDA_VISIBLE_DEVICES`` if set, else
            what ``nvidia-smi`` lists.
        start_method: ``"forkserver"`` -- one preloaded process per pool imports the worker
            and the adapter's module once, and forks each worker and each replacement
            (milliseconds instead of an interpreter's start-up); ``"spawn"`` -- each worker is
            a fresh interpreter. Default (``None``): ``"forkserver"`` where it is safe, else
            ``"spawn"`` (other platforms than Linux; a fork server with more than one thread
            after importing the adapter's module, as numpy's BLAS or torch make; others listed
            in ``trio_bridge._host._forkserver``). ``Pool.start_method`` says which it uses
            (``TRIO_BRIDGE_START_METHOD``).
        allowed_uids: uids besides this process's (and root's) whose processes may connect to
            the host's and the workers' Unix sockets (the pool's sockets are in Linux's
            abstract namespace, which any local user can reach: a connection from another uid
            is closed before its first byte). TCP is not checked this way: the token and TLS
            guard it. Workers get it in ``TRIO_BRIDGE_ALLOWED_UIDS`` (this wins over that
            variable in ``env`` or the host's environment).
        shared_memory_threshold: numpy arrays of at least this many bytes travel through
            shared-memory segments on ``/dev/shm`` instead of the gRPC stream, and arrive as
            read-only views of them, not copies (Unix transport only; ``None`` disables;
            default 1 MiB; ``TRIO_BRIDGE_SHARED_MEMORY_THRESHOLD``, ``none`` to disable).
        library_threads: threads each local worker's native libraries start (BLAS, OpenMP, MKL,
            BLIS, numba, numexpr), given to each worker in the variables they read as they load
            (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``,
            ``BLIS_NUM_THREADS``, ``VECLIB_MAXIMUM_THREADS``, ``NUMBA_NUM_THREADS``,
            ``NUMEXPR_NUM_THREADS``). A whole number >= 1: that many; 0: none of them is set (each
            library's own default: a thread per CPU); default ``None``: ``max(1, usable CPUs //
            size)`` (the CPUs the host may run on, ``os.sched_getaffinity``, at most a
            container's CPU quota, as loky's ``cpu_count()`` counts them), so that ``size``
            workers computing at once do not share each CPU between several threads each -- as
            joblib's loky backend (``max(cpu_count() // n_jobs, 1)``) and Dask's nanny (1) do.
            A variable that ``env`` or ``slot_env`` sets wins over it, one by one, and so does
            one the host's environment sets while ``library_threads`` is left out (a value given
            here wins over the host's, as joblib's ``inner_max_num_threads`` does); a variable
            whose library reads one the user set in its place gets that value (OpenBLAS, MKL,
            BLIS and numexpr read ``OMP_NUM_THREADS``). Forked and spawned workers start the same
            OpenBLAS threads (``slot_env`` reaches other libraries the fork server loaded only as
            they read it later); remote workers are not touched (``TRIO_BRIDGE_LIBRARY_THREADS``).

    Raises:
        InvalidArgumentError: a field is of the wrong type or out of range (on construction;
            the message names it); ``gpus`` without ``gpus_per_worker`` (when the pool opens).
    """

    python: str | None = _option(None, _optional(_text))
    env: Mapping[str, str] | None = _option(None, _optional(_environment))
    slot_env: Callable[[int], Mapping[str, str]] | None = _option(None, _optional(_callable))
    gpus_per_worker: int | None = _option(None, _optional(whole(1)), "TRIO_BRIDGE_GPUS_PER_WORKER", int)
    gpus: Sequence[int | str] | None = _option(None, _optional(_devices))
    start_method: StartMethod | None = _option(
        None, _one_of(*START_METHODS, none="the safe one"), "TRIO_BRIDGE_START_METHOD", choice(*START_METHODS)
    )
    allowed_uids: Collection[int] = _option(frozenset(), _uids)
    shared_memory_threshold: int | None = _option(
        1 << 20, _optional(whole(0)), "TRIO_BRIDGE_SHARED_MEMORY_THRESHOLD", optional_whole
    )
    library_threads: int | None = _option(None, _optional(whole(0)), "TRIO_BRIDGE_LIBRARY_THREADS", int)


@final
@public_module
@dataclass(frozen=True)
class RemoteWorkers(_Group):
    """Workers on other machines (``trio-bridge worker`` processes serving the same adapter),
    and how they reach the host: ``open_pool(remote=RemoteWorkers(addresses=[...], token=...))``.

    Attributes:
        addresses: where the remote workers are, one slot each on top of the ``size`` local
            ones (``size`` may then be 0: a head with no local workers). Each entry is
            ``tcp://HOST:PORT``, one worker; or ``dns://NAME:PORT``, every A and AAAA record of
            ``NAME`` (a Kubernetes headless Service answers one per ready pod), re-resolved every
            ``resolve_interval`` seconds: a new address becomes a slot, a slot whose address is
            gone drains (its calls finish) and leaves; while the name cannot be resolved (the
            resolver does not answer), the last known set is kept; a name that does not exist
            (NXDOMAIN) or has no address means no workers. A worker found by name must present a
            certificate for ``NAME``. Calls are dispatched over local and
            remote workers alike. A remote worker the host loses (health checks every
            ``min(health_check_interval, 2)`` seconds, or a failed call) fails only its own
            calls, with ``WorkerCrashedError`` ("lost connection to worker at ADDR"); its slot
            dials it again, each dial bounded by ``connect_timeout``, after a backoff
            (``Lifecycle.restart_backoff``), so it rejoins within seconds of being reachable; the
            calls it may still run for this host are cancelled as it rejoins, and it takes calls
            once they have ended. Shared memory is off in such a pool (arrays travel in-band).
        listen: ``tcp://HOST:PORT`` where remote workers call the host back (host tools,
            variables, worker-to-worker calls) and join (``trio-bridge worker --join``); port
            0 picks a free port.
        advertise: ``HOST`` or ``HOST:PORT`` remote workers use to reach ``listen`` (default:
            its host, or this machine's name when it listens on all addresses).
        token: the shared secret of the host and its remote workers (at least 16 characters),
            sent as gRPC metadata both ways and compared in constant time; also guards
            ``/status`` beyond loopback (see :class:`Monitoring`).
        tls: certificates for TLS both ways (mutual when it has a ``ca``).
        insecure: allow plain TCP beyond loopback (without it, ``tls`` is required there).
        connect_timeout: seconds a dial of a remote worker may take to open its TCP connection
            (default 3): a worker behind a partition is given up on at once, and dialled
            again after the backoff, instead of waiting out the kernel (minutes).
        resolve_interval: seconds between resolutions of each ``dns://`` name (default 5).
        nameservers: ``"HOST"`` or ``"HOST:PORT"`` (IP addresses) of the DNS servers that
            resolve ``dns://`` names (default: those of ``/etc/resolv.conf``, with its search
            domains; ``/etc/hosts`` is not read).

    Raises:
        InvalidArgumentError: an address is neither ``tcp://HOST:PORT`` nor
            ``dns://NAME:PORT``; ``addresses`` or ``listen`` without a ``token``; ``tls`` is not
            a :class:`TLSConfig`; plain TCP to an address beyond loopback (or any ``dns://``
            name) without ``insecure=True`` (on construction).
    """

    addresses: Sequence[str] = _option((), _addresses)
    listen: str | None = _option(None, _optional(tcp_address))
    advertise: str | None = _option(None, _optional(_text))
    token: str | None = _option(None, _optional(_token))
    tls: TLSConfig | None = _option(None, _optional(_instance(TLSConfig, "a trio_bridge.TLSConfig")))
    insecure: bool = _option(False, _bool)
    connect_timeout: float = _option(3.0, positive_seconds)
    resolve_interval: float = _option(5.0, positive_seconds)
    nameservers: Sequence[str] = _option((), _nameservers)

    @property
    def fixed(self) -> tuple[str, ...]:
        """The ``tcp:HOST:PORT`` addresses: one slot each from the start."""
        return tuple(a for a in self.addresses if not a.startswith(DNS_SCHEME))

    @property
    def names(self) -> tuple[str, ...]:
        """The ``dns://NAME:PORT`` entries: slots found by resolving them."""
        return tuple(a for a in self.addresses if a.startswith(DNS_SCHEME))

    def _check_together(self) -> None:
        if not self.addresses and self.listen is None:
            return
        if self.token is None:
            raise InvalidArgumentError(
                f"remote workers need a token: a shared secret of at least {MIN_TOKEN} characters "
                "(RemoteWorkers(token=...))"
            )
        if self.tls is None and not self.insecure:
            exposed = [a for a in (*self.fixed, *([self.listen] if self.listen else [])) if beyond_loopback(a)]
            exposed += list(self.names)  # whatever a DNS server answers
            if exposed:
                raise InvalidArgumentError(
                    f"plain TCP beyond this machine ({', '.join(exposed)}): give RemoteWorkers(tls=TLSConfig(...)), "
                    "or RemoteWorkers(insecure=True)"
                )


_GROUPS: dict[str, type[_Group]] = {
    "lifecycle": Lifecycle, "recycling": Recycling, "state_limits": StateLimits, "monitoring": Monitoring,
    "local": LocalWorkers, "remote": RemoteWorkers,
}


@final
@dataclass(frozen=True)
class PoolOptions(_Group):
    """All of one pool's options, complete and checked (made by :func:`pool_options`): the
    everyday ones, and the groups, each passed whole to the part of the pool that uses it."""

    _prefix = ""  # its fields are open_pool's arguments

    adapter: str = _option("", _adapter)
    size: int = _option(None, _optional(whole(0)), "TRIO_BRIDGE_WORKERS", int)  # None: filled in when made
    concurrency: int = _option(1, whole(1), "TRIO_BRIDGE_CONCURRENCY", int)
    max_queue: int = _option(1024, whole(0), "TRIO_BRIDGE_MAX_QUEUE", int)
    transport: Transport = _option("unix", _one_of("unix", "tcp"), "TRIO_BRIDGE_TRANSPORT", choice("unix", "tcp"))
    adapter_options: dict[str, Any] | None = _option(None, _json)
    state: StateBackend | str | None = _option(None, _state, "TRIO_BRIDGE_STATE")
    lifecycle: Lifecycle = _option(Lifecycle(), _instance(Lifecycle, "a trio_bridge.Lifecycle"))
    recycling: Recycling = _option(Recycling(), _instance(Recycling, "a trio_bridge.Recycling"))
    state_limits: StateLimits = _option(StateLimits(), _instance(StateLimits, "a trio_bridge.StateLimits"))
    monitoring: Monitoring = _option(Monitoring(), _instance(Monitoring, "a trio_bridge.Monitoring"))
    local: LocalWorkers = _option(LocalWorkers(), _instance(LocalWorkers, "a trio_bridge.LocalWorkers"))
    remote: RemoteWorkers = _option(RemoteWorkers(), _instance(RemoteWorkers, "a trio_bridge.RemoteWorkers"))

    def _check_together(self) -> None:
        if self.size is None:  # one per usable CPU, or none beside remote workers
            object.__setattr__(self, "size", 0 if self.remote.addresses else usable_cpus())
        if self.size < 1 and not self.remote.addresses and self.remote.listen is None:
            raise InvalidArgumentError(
                f"size must be a whole number >= 1, not {short_repr(self.size)} (size=0, a head with no local workers, "
                "needs remote workers: RemoteWorkers(addresses=[...]) or RemoteWorkers(listen=...))"
            )
        if self.local.gpus is not None and self.local.gpus_per_worker is None:
            raise InvalidArgumentError("LocalWorkers.gpus is given without LocalWorkers.gpus_per_worker")
        monitoring = self.monitoring
        if monitoring.address is not None and not monitoring.status_public and self.status_token is None:
            _, host, port = parse_address(monitoring.address if monitoring.address.startswith("tcp:") else f"tcp:{monitoring.address}")
            if not loopback(host):
                raise InvalidArgumentError(
                    f"Monitoring.address {host}:{port} is not loopback, and its /status shows the pool's pids, addresses "
                    f"and recent error text to whoever reaches it: give Monitoring(token=...) (a shared secret of at least "
                    f"{MIN_TOKEN} characters, which `trio-bridge top --token-file FILE` sends), bind 127.0.0.1, or pass "
                    "Monitoring(status_public=True) (TRIO_BRIDGE_STATUS_PUBLIC=1) to show it to anyone; /metrics stays "
                    "open either way"
                )
        if self.remote.addresses or self.remote.listen is not None:
            if self.lifecycle.health_check_interval > _HEALTH_CHECK_OF_REMOTE:  # a lost remote worker is noticed soon
                object.__setattr__(
                    self, "lifecycle", dataclasses.replace(self.lifecycle, health_check_interval=_HEALTH_CHECK_OF_REMOTE)
                )
            if self.local.shared_memory_threshold is not None:  # remote workers cannot read this machine's /dev/shm
                object.__setattr__(self, "local", dataclasses.replace(self.local, shared_memory_threshold=None))

    @property
    def slots(self) -> int:
        """The slots of the start: local ones and those of fixed remote addresses (a ``dns://``
        name's slots, and joining workers', are added as they are found)."""
        return self.size + len(self.remote.fixed)

    @property
    def adapter_options_json(self) -> str:
        return json.dumps(self.adapter_options or {}, allow_nan=False)

    @property
    def status_token(self) -> str | None:
        """The bearer token of ``/status`` beyond loopback."""
        return self.monitoring.token if self.monitoring.token is not None else self.remote.token


# old keyword -> (group, its field); for one release (see the CHANGELOG)
_DEPRECATED: dict[str, tuple[str, str]] = {
    **{name: ("lifecycle", name) for name in (
        "startup_timeout", "shutdown_timeout", "cancel_grace", "health_check_interval", "heartbeat_interval",
        "restart_backoff", "no_worker_timeout", "handle_signals",
    )},
    "max_calls_per_worker": ("recycling", "max_calls"), "max_worker_age": ("recycling", "max_age"),
    "max_worker_memory": ("recycling", "max_memory"),
    **{name: ("state_limits", name) for name in ("max_sessions", "max_variables_per_session", "max_value_bytes", "history_limit")},
    "metrics_registry": ("monitoring", "registry"), "metrics_address": ("monitoring", "address"),
    "status_public": ("monitoring", "status_public"),
    "python": ("local", "python"), "env": ("local", "env"), "worker_env": ("local", "slot_env"),
    "gpus_per_worker": ("local", "gpus_per_worker"), "gpus": ("local", "gpus"), "start_method": ("local", "start_method"),
    "allowed_uids": ("local", "allowed_uids"), "shared_memory_threshold": ("local", "shared_memory_threshold"),
    "remote_workers": ("remote", "addresses"), "listen": ("remote", "listen"), "advertise": ("remote", "advertise"),
    "token": ("remote", "token"), "tls": ("remote", "tls"), "insecure": ("remote", "insecure"),
}


def pool_options(
    adapter: Any, arguments: Mapping[str, Any], *, caller: str = "open_pool", environ: Mapping[str, str] | None = None,
    stacklevel: int = 2,
) -> PoolOptions:
    """A pool's options from ``open_pool``'s keyword ``arguments`` (those left out are
    :data:`DEFAULT` or absent; a group left out is ``None``), then ``environ``'s
    ``TRIO_BRIDGE_*`` variables (default: ``os.environ``; the fakes of ``trio_bridge.testing``
    pass ``{}``), then the defaults. A keyword of before the groups is taken with a
    ``DeprecationWarning`` that names its new spelling, attributed to the frame ``stacklevel``
    up from the caller (2: the caller's caller, the user's code calling ``open_pool``).

    Raises:
        TypeError: a keyword ``open_pool`` does not have (``caller`` names the function).
        InvalidArgumentError: an option is out of range, options do not fit together, an old
            keyword is given with its group, or a variable does not parse (its message names
            the variable).
    """
    environ = os.environ if environ is None else environ
    everyday = _specs(PoolOptions).keys() - _GROUPS.keys() - {"adapter"}
    given: dict[str, Any] = {"adapter": adapter}
    groups: dict[str, Any] = {}
    old: dict[str, dict[str, Any]] = {}
    for name, value in arguments.items():
        if name in everyday:
            given[name] = value
        elif name in _GROUPS:
            if value is not None:
                groups[name] = value
        elif name in _DEPRECATED:
            group, attribute = _DEPRECATED[name]
            warnings.warn(
                f"{name}= is deprecated; pass {group}={_GROUPS[group].__name__}({attribute}=...)",
                DeprecationWarning, stacklevel=stacklevel + 1,
            )
            if name == "status_public" and value is None:
                continue  # its old default, which meant "left out"
            old.setdefault(group, {})[attribute] = value
        else:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    for group, values in old.items():
        if group in groups:
            names = ", ".join(f"{k}=" for k, (g, _) in _DEPRECATED.items() if g == group and _DEPRECATED[k][1] in values)
            raise InvalidArgumentError(f"pass {names} or {group}={_GROUPS[group].__name__}(...), not both")
        groups[group] = _GROUPS[group](**values)
    for name, cls in _GROUPS.items():
        group = groups.get(name, cls())
        if not isinstance(group, cls):
            raise InvalidArgumentError(f"{name} must be a trio_bridge.{cls.__name__}, not {short_repr(group)}")
        given[name] = _resolved(group, environ)
    return _with_environment(PoolOptions, given, environ, prefix="")
