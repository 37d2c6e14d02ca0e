"""The DNS answers authentication needs (TXT, A, AAAA, MX, PTR), blocking, cached.

One resolver on the servers from config (``delivery.dns_servers``; the
system's when empty), so tests point everything at a local test zone.  A name
that does not exist and a name without records of the type both answer an
empty list (SPF counts both as void lookups); a timeout, SERVFAIL or no
reachable server raises ``TempLookupError``.  Answers are cached for their TTL:
the ingress and the pipeline may ask about the same message.
"""

from __future__ import annotations

from typing import TypeVar

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename


class TempLookupError(Exception):
    """The lookup failed for now (timeout, SERVFAIL): a temperror result."""


R = TypeVar("R", bound=dns.resolver.BaseResolver)


def configured(kind: type[R], servers: list[tuple[str, int]], timeout: float) -> R:
    """A dnspython resolver (sync or async) on these servers, the system's when none."""
    resolver = kind(configure=not servers)
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    resolver.lifetime = timeout
    return resolver


class Resolver:
    def __init__(self, servers: list[tuple[str, int]], timeout: float,
                 cache: bool = True) -> None:
        self.servers, self.timeout, self.cache = servers, timeout, cache
        self._resolver = configured(dns.resolver.Resolver, servers, timeout)
        if cache:
            self._resolver.cache = dns.resolver.LRUCache(4096)

    def __reduce__(self) -> tuple[type[Resolver], tuple[list[tuple[str, int]], float, bool]]:
        """Pickled as its settings: a worker process starts with an empty cache."""
        return Resolver, (self.servers, self.timeout, self.cache)

    def _answer(self, name: str, rdtype: str) -> list[object]:
        try:
            return list(self._resolver.resolve(name, rdtype, search=False))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.EmptyLabel):
            return []  # not a name that can exist
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL, no servers
            raise TempLookupError(f"{name}/{rdtype}: {exc.__class__.__name__}") from None

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in self._answer(name, "TXT")]  # type: ignore[attr-defined]

    def addresses(self, name: str, version: int) -> list[str]:
        """The A (version 4) or AAAA (version 6) records of a name."""
        return [r.to_text() for r in self._answer(name, "A" if version == 4 else "AAAA")]  # type: ignore[attr-defined]

    def mx(self, name: str) -> list[str]:
        """MX host names, in preference order."""
        records = sorted(self._answer(name, "MX"), key=lambda r: r.preference)  # type: ignore[attr-defined]
        return [r.exchange.to_text().rstrip(".") for r in records]  # type: ignore[attr-defined]

    def ptr(self, ip: str) -> list[str]:
        name = dns.reversename.from_address(ip).to_text()
        return [r.target.to_text().rstrip(".") for r in self._answer(name, "PTR")]  # type: ignore[attr-defined]
