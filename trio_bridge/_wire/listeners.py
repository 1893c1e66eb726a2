"""Which listeners other machines can reach, and what those need before they open.

Every server entry point (the worker module, ``trio-bridge worker``, a pool's ``listen=``)
applies one rule: a *local* listener -- a Unix socket, abstract or on disk (the peer's uid is
checked there), or TCP on a loopback address -- needs nothing more than the pool secret it
already has. Any other TCP address (a wildcard such as ``0.0.0.0`` or ``::`` included, and every
host name but ``localhost``, which may resolve anywhere) needs a token of at least
:data:`MIN_TOKEN` characters, with no way round it, and TLS unless the caller says ``insecure``
(plain TCP beyond loopback: the token then crosses the network in clear).
"""

from __future__ import annotations

import ipaddress

from trio_bridge._wire.transport import parse_address

MIN_TOKEN = 16  # characters of a token that guards a listener beyond loopback


def loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, ``[v6]`` too, or ``localhost``) is this machine's loopback."""
    host = host.removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def beyond_loopback(address: str) -> bool:
    """Whether other machines may reach a listener at ``address`` (``unix:...`` or ``tcp:HOST:PORT``).

    Raises:
        ValueError: ``address`` is neither form.
    """
    scheme, host, _ = parse_address(address)
    return scheme == "tcp" and not loopback(host)
