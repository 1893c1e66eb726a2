"""Remote workers found through DNS: ``RemoteWorkers(addresses=["dns://NAME:PORT"])``.

An orchestrator announces the workers it runs by name: a Kubernetes headless Service answers
one A (or AAAA) record per ready pod, Consul one per healthy instance. :class:`Discovery`
resolves the name every ``resolve_interval`` seconds and makes the pool's remote slots follow
the answer: an address that appears becomes a slot (its worker is dialled, with the name as the
TLS name its certificate must carry); a slot whose address is gone drains and leaves.

Which answers change the slots: an answer (records, no records, or NXDOMAIN: the name does not
exist, so there are no workers) replaces the set; no answer (a timeout, SERVFAIL, no reachable
name server) keeps the last known set -- a resolver outage must not empty a pool whose workers
still serve.

Resolution is dnspython's, under Trio (``dns.asyncresolver``), against the name servers given
or those of ``/etc/resolv.conf`` with its search domains (what a pod's resolver uses).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from trio_bridge._host._options import DNS_SCHEME, split_nameserver

if TYPE_CHECKING:
    import dns.asyncresolver

_logger = logging.getLogger("trio_bridge")
_QUERY_TIMEOUT = 2.0  # seconds one name server has to answer one query
_LIFETIME = 2.0  # seconds a resolution may take at least, however short the interval


def parse_name(entry: str) -> tuple[str, int]:
    """``"dns://NAME:PORT"`` -> ``(NAME, PORT)`` (checked by ``RemoteWorkers``)."""
    name, _, port = entry.removeprefix(DNS_SCHEME).rpartition(":")
    return name, int(port)


def new_resolver(nameservers: Sequence[str], lifetime: float) -> dns.asyncresolver.Resolver:
    """A resolver of ``nameservers`` (``"HOST"`` or ``"HOST:PORT"``), or of ``/etc/resolv.conf``
    when there are none; each resolution takes at most ``lifetime`` seconds.

    Raises:
        dns.resolver.NoResolverConfiguration: no name servers given and none configured.
    """
    # imported here, not with the module: dnspython's resolver takes ~0.1 s to import (its
    # DNS-over-HTTPS client too), which every pool would pay, dns:// names or not
    import dns.asyncresolver
    import dns.nameserver

    resolver = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*split_nameserver(s)) for s in nameservers]
    resolver.timeout = min(_QUERY_TIMEOUT, lifetime)
    resolver.lifetime = lifetime
    return resolver


async def resolve(resolver: dns.asyncresolver.Resolver, name: str) -> frozenset[str] | None:
    """Every A and AAAA address of ``name``: empty if it has none or does not exist; ``None``
    if the resolver gave no answer (the caller keeps what it knew)."""
    import dns.exception
    import dns.resolver

    found: set[str] = set()
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind, search=True, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return frozenset()
        except (dns.exception.DNSException, OSError) as exc:  # a timeout, SERVFAIL, no name server answered
            _logger.debug("resolving %s (%s) failed: %r", name, kind, exc)
            return None
        if answer.rrset is not None:
            found.update(record.to_text() for record in answer.rrset)
    return frozenset(found)


def tcp_of(ip: str, port: int) -> str:
    return f"tcp:{ip}:{port}"


class Discovery:
    """Keeps one ``dns://NAME:PORT`` entry's slots in step with its records (see the module doc).

    Args:
        entry: ``"dns://NAME:PORT"``.
        add: ``add(address, server_name)`` makes a slot for a worker at ``address``
            (``tcp:IP:PORT``) and returns it; ``None`` if the pool has that address already
            (another entry, or a worker that joined).
        remove: ``remove(address, why)`` makes the slot of ``address`` leave.
        interval: seconds between resolutions.
        nameservers: as :func:`new_resolver`'s.
    """

    def __init__(
        self, entry: str, *, add: Callable[[str, str], int | None], remove: Callable[[str, str], None],
        interval: float, nameservers: Sequence[str] = (),
    ) -> None:
        self.name, self.port = parse_name(entry)
        self.addresses: set[str] = set()
        """The addresses it made slots for."""
        self._missed: set[str] = set()  # addresses of slots missing from the latest answer
        self._add = add
        self._remove = remove
        self._interval = interval
        self._nameservers = nameservers

    async def run(self) -> None:
        """Resolve every ``interval`` seconds, for ever (cancel it to stop)."""
        import dns.resolver

        try:
            resolver = new_resolver(self._nameservers, max(self._interval, _LIFETIME))
        except dns.resolver.NoResolverConfiguration as exc:
            _logger.error(
                "cannot resolve %s: no name servers (%s); give RemoteWorkers(nameservers=[...])", self.name, exc
            )
            return
        answered = True
        while True:
            found = await resolve(resolver, self.name)
            if found is None and answered:  # said once per outage
                _logger.warning("could not resolve %s: keeping its %d known workers until it answers", self.name, len(self.addresses))
            elif found is not None:
                if not answered:
                    _logger.info("%s resolves again", self.name)
                self.follow({tcp_of(ip, self.port) for ip in found})
            answered = found is not None
            await trio.sleep(self._interval)

    def follow(self, addresses: set[str]) -> None:
        """Make the slots those of ``addresses``: new ones join at once; a slot leaves once its
        address is missing from two answers in a row (one answer without it may be a blip:
        a DNS server reloading, a Service's endpoints being rewritten)."""
        missing = self.addresses - addresses
        for address in sorted(missing & self._missed):
            self.addresses.discard(address)
            self._remove(address, f"{address} is no longer an address of {self.name}")
        self._missed = missing - self._missed
        for address in sorted(addresses - self.addresses):
            slot = self._add(address, self.name)
            if slot is not None:
                self.addresses.add(address)
                _logger.info("worker at %s (of %s) joins the pool (slot %d)", address, self.name, slot)
