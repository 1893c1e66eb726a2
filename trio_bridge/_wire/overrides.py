"""Which releases of grpclib, h2, hyperframe and betterproto2 the wire's fast paths were tested
with, and which fast paths this process uses: decided once, at import.

The fast paths subclass private classes of these libraries and copy some of their methods
(``http2.py``, ``fast_proto.py``, the channel, server and codec classes of ``transport.py``). On
a release outside :data:`TESTED`, or when a private name a fast path needs is missing, that path
is off and the stock one is used: grpclib's own ``Channel``, ``Server``, ``H2Protocol`` and
``ProtoCodec`` (betterproto2's own ``bytes(message)`` and ``parse``): slower, never wrong. One log
line (logger ``trio_bridge.wire``, WARNING) says which and why. ``trio-bridge doctor`` reports it.

:data:`STOCK_WIRE_ENV` forces the stock paths, for debugging (is a problem in our fast paths or in
the libraries?): ``1`` turns off every fast path (``codec``, ``http2``, ``coalesce``, ``calls``,
``worker_calls``); a comma
list names some of them. ``abstract``, the channel that connects to Linux abstract-namespace
sockets itself, is not a speed-up but what makes ``unix:@name`` work on uvloop (its
``create_unix_connection`` rejects such names): it stays on with ``1`` and goes off only by name
(then uvloop workers cannot reach such addresses). The variable is read at import; worker
processes inherit it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = [
    "ABSTRACT", "CALLS", "CODEC", "COALESCE", "FAST_PATHS", "HTTP2", "STOCK_WIRE_ENV", "TESTED", "WORKER_CALLS", "FastPath",
]

#: The releases the fast paths were tested with (the nox sessions ``lowest`` and ``newest`` test
#: both ends). pyproject.toml requires the same ranges (a test checks that they agree).
TESTED: dict[str, str] = {
    "grpclib": ">=0.4.8,<0.5",
    "h2": ">=4.1,<4.5",
    "hyperframe": ">=6.0,<6.2",
    "betterproto2": ">=0.10,<0.11",
}
STOCK_WIRE_ENV = "TRIO_BRIDGE_STOCK_WIRE"
_NAMES = ("codec", "http2", "coalesce", "calls", "worker_calls", "abstract")

logger = logging.getLogger("trio_bridge.wire")


@dataclass(frozen=True)
class FastPath:
    """One fast path and whether this process uses it.

    Attributes:
        name: ``"codec"``, ``"http2"``, ``"coalesce"``, ``"calls"``, ``"worker_calls"`` or ``"abstract"``.
        what: what it replaces, in a few words.
        on: used; otherwise the stock path is.
        why: why not (empty when on).
    """

    name: str
    what: str
    on: bool
    why: str = ""


def installed_versions() -> dict[str, str]:
    """The installed release of each library in :data:`TESTED` (``"not installed"`` if none)."""
    found = {}
    for dist in TESTED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _untested(dists: tuple[str, ...], versions: dict[str, str]) -> str:
    """Why the installed releases of ``dists`` are not all tested ones ("" if they are)."""
    for dist in dists:
        try:
            fits = SpecifierSet(TESTED[dist]).contains(Version(versions[dist]), prereleases=True)
        except InvalidVersion:
            fits = False
        if not fits:
            return f"{dist} {versions[dist]} is not a tested release ({TESTED[dist]})"
    return ""


def _missing(needs: list[tuple[Any, str]]) -> str:
    """The first private name a fast path needs that its library lacks ("" if none)."""
    missing = object()
    for owner, name in needs:  # (without running properties: betterproto2's asserts on Message)
        if inspect.getattr_static(owner, name, missing) is missing:
            return f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{name} is missing"
    return ""


def _codec_needs() -> list[tuple[Any, str]]:
    import betterproto2

    needs: list[tuple[Any, str]] = [
        (betterproto2, name)
        for name in ("PACKED_TYPES", "TYPE_BYTES", "TYPE_MESSAGE", "TYPE_STRING", "FieldMetadata", "_preprocess_single", "_serialize_single")
    ]
    return [*needs, (betterproto2.Message, "_betterproto"), (betterproto2.Message, "load"), (betterproto2.Message, "parse")]


def _http2_needs() -> list[tuple[Any, str]]:
    import grpclib.client
    import grpclib.protocol
    import grpclib.server
    import h2.connection
    import h2.frame_buffer
    import hyperframe.frame

    protocol = grpclib.protocol
    buffer = protocol.Buffer(lambda size: None)
    frames = h2.frame_buffer.FrameBuffer(server=True)
    return [
        (grpclib.client.Channel, "_protocol_factory"),
        (grpclib.server.Server, "_protocol_factory"),
        (protocol, "AckedData"),
        (protocol, "EventsProcessor"),
        *[(protocol.H2Protocol, name) for name in ("data_received", "pause_writing", "resume_writing", "connection_lost")],
        *[(protocol.Connection, name) for name in ("create_stream", "flush", "initialize", "ack", "_close_by_ping_handler")],
        *[(protocol.Stream, name) for name in ("init_stream", "send_data")],
        *[(buffer, name) for name in ("_eof", "_acked", "_acked_size", "_unacked", "_ack_callback")],
        *[(h2.connection.H2Connection, name) for name in ("_receive_frame", "_prepare_for_sending", "local_flow_control_window")],
        *[(frames, name) for name in ("_preamble", "_preamble_len", "_validate_frame_length", "_update_header_buffer", "max_frame_size")],
        (hyperframe.frame.Frame, "parse_frame_header"),
    ]


def _decide(env: str) -> dict[str, FastPath]:
    versions = installed_versions()
    forced = {n.strip() for n in env.split(",") if n.strip()} if env not in ("", "0") else set()
    if forced & {"1", "all", "true", "yes"}:
        forced = {"codec", "http2", "coalesce", "calls", "worker_calls"}
    unknown = forced - set(_NAMES)
    if unknown:
        logger.warning("%s: ignored unknown name(s) %s (known: 1, %s)", STOCK_WIRE_ENV, ", ".join(sorted(unknown)), ", ".join(_NAMES))

    def why_not(name: str, dists: tuple[str, ...], needs: Any) -> str:
        if name in forced:
            return f"{STOCK_WIRE_ENV}={env}"
        untested = _untested(dists, versions)
        if untested:
            return untested
        try:
            return _missing(needs())
        except Exception as exc:  # a library that changed beyond what its names say
            return f"{type(exc).__name__}: {exc}"

    def imports_http2() -> list[tuple[Any, str]]:
        needs = _http2_needs()
        if not _missing(needs):
            importlib.import_module("trio_bridge._wire.http2")  # subclasses those names at import
        return needs

    def worker_calls_needs() -> list[tuple[Any, str]]:
        import grpclib.server

        needs = imports_http2()  # it reads and writes through our FastStream
        return needs + [(grpclib.server.Stream, name) for name in ("send_initial_metadata", "recv_message")]

    def channel_hook() -> list[tuple[Any, str]]:
        import grpclib.client

        return [(grpclib.client.Channel, "_create_connection")]

    http2 = why_not("http2", ("grpclib", "h2", "hyperframe"), imports_http2)
    paths = [
        FastPath("codec", "fast_proto's betterproto2 encoding and parsing",
                 *_state(why_not("codec", ("betterproto2",), _codec_needs))),
        FastPath("http2", "FastH2Protocol: 1 MiB frames, fewer copies, h2's deferred frame repr",
                 *_state(http2)),
        FastPath("coalesce", "a worker's writes in one loop iteration as one write",
                 *_state(why_not("coalesce", ("grpclib", "h2", "hyperframe"), imports_http2))),
        FastPath("calls", "the host's call stream spoken from Trio with h2, without crossing to the asyncio loop",
                 *_state(why_not("calls", ("h2",), list))),
        FastPath("worker_calls", "the worker's call stream: messages taken from h2's events and written at once, "
                 "without grpclib's per-message machinery",
                 *_state(why_not("worker_calls", ("grpclib", "h2", "hyperframe"), worker_calls_needs)
                         or (http2 and f"it needs the http2 fast path ({http2})"))),
        # correctness on uvloop, not speed: needs the hook, whatever grpclib's release
        FastPath("abstract", "the channel that connects to unix:@name sockets itself (uvloop)",
                 *_state(f"{STOCK_WIRE_ENV}={env}" if "abstract" in forced else _missing(channel_hook()))),
    ]
    return {path.name: path for path in paths}


def _state(why: str) -> tuple[bool, str]:
    return not why, why


FAST_PATHS: dict[str, FastPath] = _decide(os.environ.get(STOCK_WIRE_ENV, "").strip().lower())
CODEC = FAST_PATHS["codec"].on
HTTP2 = FAST_PATHS["http2"].on
COALESCE = FAST_PATHS["coalesce"].on
CALLS = FAST_PATHS["calls"].on
WORKER_CALLS = FAST_PATHS["worker_calls"].on
ABSTRACT = FAST_PATHS["abstract"].on

if HTTP2:
    from trio_bridge._wire import http2 as _http2

    _http2.defer_h2_frame_repr()

_off = [path for path in FAST_PATHS.values() if not path.on]
if _off:
    logger.warning(
        "the wire's stock code path is used for %s (slower, never wrong)",
        "; ".join(f"{path.name}: {path.why}" for path in _off),
    )
