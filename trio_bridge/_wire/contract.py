"""The wire contract's constants, shared by host and worker: what the .proto cannot say.

The worker is started as ``python -m trio_bridge.worker --adapter M:C --listen ADDRESS`` with
the environment below; once it serves, it prints one line ``TRIO_BRIDGE_READY <address>`` on
stdout. The host then sends ``Describe`` carrying its release and :data:`WIRE_VERSION`; each side
refuses a peer whose contract version differs (:func:`incompatibility`).
"""

from __future__ import annotations

from trio_bridge._version import __version__

WIRE_VERSION = 5  # 5: a spawned worker may get its secret on stdin (TRIO_BRIDGE_SECRET_ON_STDIN); 4: failed RPCs end with a gRPC status carrying ErrorInfo; 3: payloads are standard JSON (NaN, ±inf, ints past 2**53 tagged); 2: calls on one stream, shared-memory segments
"""The contract's version: raised on any change an older peer would misread (a changed field's
meaning, a new required behaviour). Peers of different releases interoperate while it matches."""

READY_PREFIX = "TRIO_BRIDGE_READY "

# A pool's HTTP endpoint (open_pool(monitoring=Monitoring(address=))), as trio-bridge top reads it.
METRICS_PATH = "/metrics"  # Prometheus text
STATUS_PATH = "/status"  # the pool's status as JSON

# Environment variables the host sets for a worker (never argv, which ``ps`` shows).
SECRET_ENV = "TRIO_BRIDGE_SECRET"
SECRET_ON_STDIN_ENV = "TRIO_BRIDGE_SECRET_ON_STDIN"  # "1": the secret is stdin's first line instead
HOST_ADDRESS_ENV = "TRIO_BRIDGE_HOST_ADDRESS"
WORKER_ID_ENV = "TRIO_BRIDGE_WORKER_ID"
ADAPTER_OPTIONS_ENV = "TRIO_BRIDGE_ADAPTER_OPTIONS"  # a JSON object -> Adapter.options
HOST_PID_ENV = "TRIO_BRIDGE_HOST_PID"  # the worker dies with this process (PR_SET_PDEATHSIG)
ALLOWED_UIDS_ENV = "TRIO_BRIDGE_ALLOWED_UIDS"  # "1001,1002": other uids a worker's Unix socket accepts

# gRPC metadata keys.
SECRET_METADATA = "x-trio-bridge-secret"
WORKER_METADATA = "x-trio-bridge-worker"  # who is calling: the source of its writes
WATCH_BUFFER_METADATA = "x-trio-bridge-watch-buffer"  # WatchVariables: the watcher's buffer_size (decimal)

DEFAULT_WATCH_BUFFER = 1024  # updates a watcher may fall behind by before it coalesces (both sides)

# Streams: chunks per message (a worker's tool, a streaming host tool), and how far a generator
# may run ahead of the sender.
MAX_CHUNKS_PER_MESSAGE = 256
STREAM_BUFFER = 256

# Limits on requests (docs/wire.md, "Limits"): a server refuses more, before any handler runs
# (see limits.py), with INVALID_ARGUMENT and an ErrorInfo naming the field.
MAX_NAME_BYTES = 1024
"""Bytes (UTF-8) of any string field of a request: a tool, session, variable, call, optimizer
or worker name or id, a pattern, an address, a version."""
MAX_NAMES = 10_000
"""Items of a repeated string field of a request (GetVariables' names, WatchVariables' names,
Join's tools)."""

# What a failed RPC's trailers carry at most (the status message, its ErrorInfo): longer text is
# cut, never sent whole. HPACK-encoding a header costs time quadratic in its length in the
# Python h2 stack (1 MB: minutes, during which nothing else runs), and grpcio refuses trailers
# over 8 KiB by default. In-band ErrorInfos (a CallResult on the Calls stream) are not cut.
MAX_STATUS_MESSAGE_BYTES = 512
MAX_STATUS_DETAILS_BYTES = 4096  # grpc-status-details-bin before base64: an ErrorInfo's traceback is cut first

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two log lines of a server about refused requests of one kind (the lines say
how many were held back)."""

DEADLINE_SLACK = 0.5
"""Seconds a worker lets a call run past its deadline: the host's own cancel normally arrives first."""

KEEPALIVE = 10.0
"""Seconds between a remote worker's pings to a host with calls open (``trio-bridge worker
--keepalive``): a host silent as long again is taken for gone, its connection closed and its
calls cancelled, within ``2 * KEEPALIVE`` of its going."""


def timeout_to_wire(remaining: float | None) -> float:
    """A call's remaining time (seconds; ``None``: no deadline) as ``timeout_seconds`` on the
    wire, where 0 means none: a deadline already passed still sends a tiny positive value."""
    return 0.0 if remaining is None else max(remaining, 1e-3)


def timeout_from_wire(timeout_seconds: float) -> float | None:
    """``timeout_seconds`` from the wire as seconds remaining (``None``: no deadline)."""
    return timeout_seconds if timeout_seconds > 0 else None


# Worker exit codes (besides 0, a clean exit after Shutdown, and 2, bad command-line usage).
EXIT_ADAPTER_IMPORT = 3  # its stderr's first WORKER_MESSAGE_PREFIX line says why, in one line
EXIT_ADAPTER_SETUP = 4
EXIT_HOST_GONE = 5
WORKER_MESSAGE_PREFIX = "trio-bridge worker: "  # how a worker's own messages on stderr begin


def incompatibility(*, local_release: str, local_wire: int, peer: str, peer_release: str, peer_wire: int) -> str | None:
    """Why a peer cannot be served, naming both sides' versions; ``None`` if it fits.

    Args:
        peer: what the peer is, e.g. ``"worker w3"`` or ``"host"``.
        peer_release, peer_wire: what it sent (``""``/0 from a release before the handshake).
    """
    if peer_wire == local_wire:
        return None
    theirs = f"trio-bridge {peer_release or '< 0.2 (no version sent)'}, wire contract {peer_wire or 'unknown'}"
    return (
        f"the {peer} runs {theirs}, but this side runs trio-bridge {local_release}, wire contract "
        f"{local_wire}: install the same trio-bridge release on both sides"
    )


__all__ = [
    "ADAPTER_OPTIONS_ENV", "ALLOWED_UIDS_ENV", "DEADLINE_SLACK", "DEFAULT_WATCH_BUFFER", "EXIT_ADAPTER_IMPORT", "EXIT_ADAPTER_SETUP", "EXIT_HOST_GONE", "WORKER_MESSAGE_PREFIX", "HOST_ADDRESS_ENV", "HOST_PID_ENV", "KEEPALIVE", "MAX_CHUNKS_PER_MESSAGE",
    "MAX_NAMES", "MAX_NAME_BYTES", "MAX_STATUS_DETAILS_BYTES", "MAX_STATUS_MESSAGE_BYTES", "METRICS_PATH", "REFUSAL_LOG_INTERVAL",
    "READY_PREFIX", "SECRET_ENV", "SECRET_ON_STDIN_ENV", "STREAM_BUFFER", "SECRET_METADATA", "STATUS_PATH", "WATCH_BUFFER_METADATA", "WIRE_VERSION", "WORKER_ID_ENV", "WORKER_METADATA",
    "__version__", "incompatibility", "timeout_from_wire", "timeout_to_wire",
]
