"""``trio-bridge doctor``: is this machine ready to run trio-bridge? One verdict per check.

Each check returns a :class:`Check`; none raises (an unexpected error is that check's failure).
The network checks (Redis, a bind) run only when asked, each bounded by a timeout.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import importlib.metadata
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from rich.filesize import decimal

__all__ = ["Check", "Status", "run_checks"]

Status = Literal["ok", "warn", "fail"]

#: The dependencies that matter at run time: distribution name -> module name.
KEY_DEPENDENCIES: dict[str, str] = {
    "trio": "trio",
    "grpclib": "grpclib",
    "h2": "h2",
    "hyperframe": "hyperframe",
    "betterproto2": "betterproto2",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "protobuf": "google.protobuf",
    "psutil": "psutil",
    "prometheus-client": "prometheus_client",
    "uvloop": "uvloop",
}
#: Those trio-bridge runs without, and what it does then.
OPTIONAL_DEPENDENCIES: dict[str, str] = {"uvloop": "workers use asyncio's own event loop (slower calls)"}
#: Python versions tested when the package's metadata cannot say (its classifiers).
TESTED_PYTHONS: tuple[tuple[int, int], ...] = ((3, 11), (3, 12), (3, 13), (3, 14))
#: Below this much free space on /dev/shm, big arrays may not fit (docker's default is 64 MB).
SHM_LOW_BYTES = 256 * 1024 * 1024
#: A certificate that expires within this many days gets a warning.
EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True)
class Check:
    """One check's verdict.

    Attributes:
        name: what was checked (``"python"``, ``"dependency trio"``, ``"/dev/shm"``, ...).
        status: ``"ok"``; ``"warn"`` (trio-bridge works, with a limit worth knowing); ``"fail"``
            (it will not work as configured).
        detail: why, in one line.
    """

    name: str
    status: Status
    detail: str


def run_checks(
    *, redis_url: str | None = None, address: str | None = None, tls_cert: str | None = None,
    tls_key: str | None = None, tls_ca: str | None = None, timeout: float = 2.0,
) -> list[Check]:
    """Every check that applies, in a stable order.

    Args:
        redis_url: a Redis URL to PING (skipped when ``None``).
        address: an address to bind (``tcp://HOST:PORT``, ``HOST:PORT`` or ``unix:PATH``;
            skipped when ``None``).
        tls_cert, tls_key, tls_ca: PEM files to load and date-check (skipped when all ``None``).
        timeout: seconds for each network check (connect and each reply).
    """
    checks = [_guarded("python", check_python)]
    requirements = _requirements()
    checks += [
        _guarded(f"dependency {dist}", lambda d=dist, m=module: check_dependency(d, m, requirements))
        for dist, module in KEY_DEPENDENCIES.items()
    ]
    checks += check_wire()
    checks.append(_guarded("/dev/shm", check_shared_memory))
    checks.append(_guarded("fork server", check_fork_server))
    if redis_url is not None:
        checks.append(_guarded("redis", lambda: check_redis(redis_url, timeout)))
    if address is not None:
        checks.append(_guarded("address", lambda: check_address(address)))
    if tls_cert is not None or tls_key is not None or tls_ca is not None:
        checks += check_tls(tls_cert, tls_key, tls_ca)
    return checks


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # a check must not take the report down with it
        return Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}")


def check_python() -> Check:
    """Fails below the oldest supported Python; warns above the newest tested one or off CPython."""
    version = f"{platform.python_implementation()} {platform.python_version()}"
    tested = _tested_pythons()
    oldest, newest = min(tested), max(tested)
    span = f"{oldest[0]}.{oldest[1]}-{newest[0]}.{newest[1]}"
    current = sys.version_info[:2]
    if current < oldest:
        return Check("python", "fail", f"{version}: trio-bridge needs Python {oldest[0]}.{oldest[1]} or newer")
    if current > newest:
        return Check("python", "warn", f"{version}: not tested (CPython {span} are)")
    if platform.python_implementation() != "CPython":
        return Check("python", "warn", f"{version}: only CPython is tested")
    return Check("python", "ok", f"{version} (tested: {span})")


def _tested_pythons() -> tuple[tuple[int, int], ...]:
    """From the installed package's classifiers (``Programming Language :: Python :: 3.11``)."""
    try:
        classifiers = importlib.metadata.metadata("trio-bridge").get_all("Classifier") or []
    except importlib.metadata.PackageNotFoundError:
        return TESTED_PYTHONS
    found = []
    for classifier in classifiers:
        major, dot, minor = classifier.removeprefix("Programming Language :: Python :: ").partition(".")
        if dot and major.isdigit() and minor.isdigit():
            found.append((int(major), int(minor)))
    return tuple(sorted(found)) or TESTED_PYTHONS


def _requirements() -> dict[str, Requirement]:
    """trio-bridge's own run-time requirements (no extras), by canonical name; empty when the
    package is not installed (run from a source tree)."""
    try:
        lines = importlib.metadata.requires("trio-bridge") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = {}
    for line in lines:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        found[canonicalize_name(requirement.name)] = requirement
    return found


def check_dependency(dist: str, module: str, requirements: dict[str, Requirement]) -> Check:
    """Installed, within trio-bridge's requirement, and importable (a broken build fails here)."""
    name = f"dependency {dist}"
    requirement = requirements.get(canonicalize_name(dist))
    if requirement is not None and requirement.marker is not None and not requirement.marker.evaluate():
        return Check(name, "ok", f"not used on this platform ({requirement.marker})")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        if dist in OPTIONAL_DEPENDENCIES:
            return Check(name, "warn", f"not installed: {OPTIONAL_DEPENDENCIES[dist]}")
        return Check(name, "fail", f"not installed (pip install {requirement or dist})")
    needs = f"needs {requirement.specifier}" if requirement is not None and requirement.specifier else "any version"
    if requirement is not None and not requirement.specifier.contains(installed, prereleases=True):
        return Check(name, "fail", f"{installed} installed, trio-bridge {needs}")
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or whatever its import raised
        return Check(name, "fail", f"{installed} installed, but `import {module}` fails: {type(exc).__name__}: {exc}")
    if not requirements:
        needs = "trio-bridge's requirements unknown: it is not installed"
    return Check(name, "ok", f"{installed} ({needs})")


#: the libraries each of the wire's fast paths depends on (see trio_bridge/_wire/overrides.py)
_WIRE_LIBRARIES = {
    "codec": ("betterproto2",), "http2": ("grpclib", "h2", "hyperframe"), "coalesce": ("grpclib", "h2", "hyperframe"), "abstract": ("grpclib",),
}


def check_wire() -> list[Check]:
    """One check per fast path of the wire: on, or off and why (an untested release of what it
    overrides, a missing private name, ``TRIO_BRIDGE_STOCK_WIRE``), with the releases it was
    tested with. Off is a warning: the stock code path is slower, never wrong; an ``abstract``
    path off means ``unix:@name`` addresses fail on uvloop."""
    try:
        from trio_bridge._wire import overrides
    except Exception as exc:
        return [Check("wire", "fail", f"trio_bridge._wire does not import: {type(exc).__name__}: {exc}")]
    versions = overrides.installed_versions()
    checks = []
    for name, path in overrides.FAST_PATHS.items():
        libraries = ", ".join(f"{d} {versions[d]} (tested {overrides.TESTED[d]})" for d in _WIRE_LIBRARIES.get(name, ()))
        if path.on:
            checks.append(Check(f"wire {name}", "ok", f"on: {path.what}; {libraries}"))
            continue
        effect = "unix:@name addresses fail on uvloop" if name == "abstract" else "the stock code path is used (slower, never wrong)"
        checks.append(Check(f"wire {name}", "warn", f"off ({path.why}): {effect}; {libraries}"))
    return checks


def check_shared_memory(root: str | None = None) -> Check:
    """Arrays of 1 MiB or more travel through files on ``/dev/shm``; without it they go in-band."""
    from trio_bridge._wire.shared_memory import SHM_ROOT

    root = root or SHM_ROOT
    fallback = "arrays travel in-band, through the gRPC stream (slower for big arrays)"
    if not os.path.isdir(root):
        return Check("/dev/shm", "warn", f"{root} does not exist: {fallback}")
    if not os.access(root, os.W_OK | os.X_OK):
        return Check("/dev/shm", "warn", f"{root} is not writable by this user: {fallback}")
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix="trio-bridge-doctor-") as probe:
            probe.write(b"\0")
            probe.flush()
    except OSError as exc:
        return Check("/dev/shm", "warn", f"cannot create a file in {root} ({exc}): {fallback}")
    usage = shutil.disk_usage(root)
    space = f"{decimal(usage.free)} free of {decimal(usage.total)}"
    if usage.free < SHM_LOW_BYTES:
        return Check(
            "/dev/shm", "warn",
            f"writable, but only {space}: an array needs its size there while it travels "
            "(in a container: docker run --shm-size=1g)",
        )
    return Check("/dev/shm", "ok", f"writable, {space}")


def check_fork_server() -> Check:
    """Whether pools can fork workers from a preloaded fork server (fast starts) or must spawn."""
    from trio_bridge._host._forkserver import unsafe_reason

    reason = unsafe_reason(None, True, 1)
    if not reason and "fork" not in multiprocessing.get_all_start_methods():
        reason = "no fork start method"
    if reason:
        return Check("fork server", "warn", f"unavailable ({reason}): workers are spawned, ~0.4 s each to start")
    return Check(
        "fork server", "ok",
        "available: pools fork their workers from a preloaded process (unless the adapter's import starts threads)",
    )


def check_redis(url: str, timeout: float) -> Check:
    """PING the server at ``url`` and read its version; ``timeout`` bounds connect and each reply."""
    import redis

    shown = _without_password(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as exc:
        return Check("redis", "fail", f"{shown}: not a Redis URL: {exc}")
    try:
        client.ping()
        info = client.info("server")
    except redis.RedisError as exc:
        return Check("redis", "fail", f"{shown}: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    server = "Valkey" if "valkey_version" in info else "Redis"
    version = info.get("valkey_version") or info.get("redis_version") or "?"
    return Check("redis", "ok", f"{shown}: reachable, {server} {version}")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{parts.username or ''}:***@{host}", parts.path, parts.query, parts.fragment))


def check_address(address: str) -> Check:
    """Bind ``address`` as a worker's ``--listen`` would (``tcp://HOST:PORT``, ``HOST:PORT`` or
    ``unix:PATH``), then let go of it."""
    from trio_bridge._wire.transport import parse_address, tcp_listener

    try:
        scheme, host, port = parse_address(address if address.startswith(("tcp:", "unix:")) else f"tcp:{address}")
    except ValueError:
        return Check("address", "fail", f"{address!r} is not tcp://HOST:PORT, HOST:PORT or unix:PATH")
    try:
        if scheme == "tcp":
            with tcp_listener(host, port) as listener:
                bound = listener.getsockname()[1]
            return Check("address", "ok", f"tcp:{host}:{bound} can be bound" + (" (a free port)" if port == 0 else ""))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(host)
        if not host.startswith("\0"):
            os.unlink(host)
        return Check("address", "ok", f"{address} can be bound")
    except OSError as exc:
        hint = " (is a worker or another server already there?)" if exc.errno == errno.EADDRINUSE else ""
        return Check("address", "fail", f"{address} cannot be bound: {exc.strerror or exc}{hint}")


def check_tls(cert: str | None, key: str | None, ca: str | None, *, now: datetime.datetime | None = None) -> list[Check]:
    """The TLS files as a worker or a pool would use them: each readable and parseable PEM, the
    key matching the certificate, no certificate expired or not yet valid (warned when it expires
    within ``EXPIRY_WARNING_DAYS``)."""
    checks = []
    if (cert is None) != (key is None):
        checks.append(Check("tls", "fail", "give both a certificate and its key (--tls-cert and --tls-key), or neither"))
    for name, path in (("tls cert", cert), ("tls ca", ca)):
        if path is not None:
            checks.append(_guarded(name, lambda n=name, p=path: _check_certificates(n, p, now)))
    if cert is not None and key is not None:
        checks.append(_guarded("tls key", lambda: _check_key(cert, key)))
    return checks


def _check_certificates(name: str, path: str, now: datetime.datetime | None) -> Check:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return Check(name, "fail", f"cannot read {path}: {exc.strerror or exc}")
    try:
        ssl.create_default_context().load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        return Check(name, "fail", f"{path} holds no PEM certificate: {exc}")
    try:
        from cryptography import x509
    except ImportError:  # (trustme brings it with [examples] and [dev]; ssl cannot read dates)
        return Check(name, "ok", f"{path}: a PEM certificate (dates not checked: pip install cryptography)")
    certificates = x509.load_pem_x509_certificates(data)
    now = now or datetime.datetime.now(datetime.UTC)
    first = min(certificates, key=lambda c: c.not_valid_after_utc)
    subject = first.subject.rfc4514_string() or "(no subject)"
    until = first.not_valid_after_utc
    for certificate in certificates:
        if certificate.not_valid_before_utc > now:
            return Check(name, "fail", f"{path}: {subject} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if until <= now:
        return Check(name, "fail", f"{path}: {subject} expired on {until:%Y-%m-%d %H:%M} UTC")
    days = (until - now).days
    count = f"{len(certificates)} certificates, the first to expire: " if len(certificates) > 1 else ""
    status: Status = "warn" if days < EXPIRY_WARNING_DAYS else "ok"
    return Check(name, status, f"{path}: {count}{subject}, valid until {until:%Y-%m-%d} ({days} days)")


def _check_key(cert: str, key: str) -> Check:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    encrypted = []

    def no_passphrase() -> bytes:  # called only for an encrypted key: OpenSSL would prompt on the terminal
        encrypted.append(True)
        return b""

    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:  # (before OSError: it is one)
        if encrypted:
            return Check("tls key", "fail", f"{key} is encrypted: trio-bridge needs a key without a passphrase")
        return Check("tls key", "fail", f"{key} does not load with {cert}: {exc.reason or exc}")
    except OSError as exc:
        return Check("tls key", "fail", f"cannot read {cert} or {key}: {exc.strerror or exc}")
    return Check("tls key", "ok", f"{key} matches {cert}")
