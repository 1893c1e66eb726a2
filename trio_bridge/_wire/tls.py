"""TLS for TCP connections between a host and its remote workers (both directions)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from trio_bridge._errors import InvalidArgumentError
from trio_bridge._util import public_module

__all__ = ["TLSConfig"]


@public_module
@dataclass(frozen=True)
class TLSConfig:
    """Certificates for the TCP connections of a host and its remote workers (PEM files).

    Attributes:
        cert: this side's certificate (chain).
        key: its private key.
        ca: the CA bundle that must have signed the other side's certificate. Given, TLS is
            mutual: a server refuses clients without such a certificate. Without it, clients
            check servers against the system's CAs, and servers ask clients for nothing.

    Raises:
        InvalidArgumentError: a file is missing or unreadable (on construction).
    """

    cert: str
    key: str
    ca: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path is None and name == "ca":
                continue
            if not isinstance(path, (str, os.PathLike)) or not os.access(path, os.R_OK):
                raise InvalidArgumentError(f"TLSConfig.{name}: cannot read {path!r}")

    def server_context(self) -> ssl.SSLContext:
        """For the side that listens (HTTP/2 by ALPN)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load(context)
        if self.ca is not None:
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For the side that connects: checks the server's certificate and name, and presents
        its own certificate (for mutual TLS)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        self._load(context)
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgumentError(f"TLSConfig: cannot load {self.cert!r} with {self.key!r}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
