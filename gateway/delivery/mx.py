"""Where mail for a domain goes: its MX hosts, in preference order (RFC 5321 5.1).

A missing domain (NXDOMAIN) or a null MX (RFC 7505) is permanent; a timeout or
SERVFAIL is temporary; a domain without MX records is its own mail host
(implicit MX).  Host addresses come from the same resolver, so a test zone on a
local DNS server decides everything and nothing reaches the public DNS.
"""

from __future__ import annotations

from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.auth.dns import configured
from gateway.config import parse_hostport

MAX_HOSTS = 10


class LookupFailed(Exception):
    def __init__(self, permanent: bool, reason: str) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.reason = reason


class MXResolver:
    def __init__(self, servers: list[str], timeout: float) -> None:
        self.resolver = configured(dns.asyncresolver.Resolver,
                                   [parse_hostport(s) for s in servers], timeout)

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        try:
            answer = await self.resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise LookupFailed(True, f"550 5.1.2 Host or domain name not found: {name}") from None
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers,
                dns.resolver.LifetimeTimeout) as exc:
            raise LookupFailed(False, f"451 4.4.3 DNS lookup for {name} failed: "
                               f"{type(exc).__name__}") from None
        return list(answer)

    async def hosts(self, domain: str) -> list[str]:
        """MX host names in the order to try them."""
        records = await self._query(domain, "MX")
        if not records:
            return [domain]
        ordered = sorted(records, key=lambda r: r.preference)
        names = [str(r.exchange).rstrip(".") for r in ordered]
        if names == [""]:
            raise LookupFailed(True, f"556 5.1.10 {domain} accepts no mail (null MX)")
        return names[:MAX_HOSTS]

    async def addresses(self, host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                found += [r.to_text() for r in await self._query(host, rdtype)]
            except LookupFailed as exc:
                if exc.permanent or rdtype == "AAAA":
                    continue
                raise
        return found
