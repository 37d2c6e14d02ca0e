"""DMARC (RFC 7489): does the owner of the From domain vouch for this message?

The From domain passes when a DKIM signature that passes, or an SPF pass, is
aligned with it: the same domain (strict, ``adkim=s``/``aspf=s``) or the same
organizational domain (relaxed, the default), the organizational domain taken
from the Public Suffix List.  The policy is the record at ``_dmarc.<From
domain>``, else at ``_dmarc.<organizational domain>`` (where ``sp=`` applies).

Results: ``none`` (no policy published), ``pass``, ``fail``, ``temperror``
(no aligned pass, and a DNS lookup of DKIM, SPF or DMARC failed for now:
nothing is rejected on a DNS fault) and ``permerror`` (no single From domain
to check).  On a fail, ``disposition`` is what the domain asks for this
message, after ``pct=`` sampling: none, quarantine or reject.
"""

from __future__ import annotations

import email.utils
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from gateway.auth.dns import Resolver, TempLookupError
from gateway.auth.spf import SPFResult, valid_domain
from gateway.auth.verify import DKIMResult
from gateway.headers import field_values
from gateway.workers import by_value, once

POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@by_value
@dataclass(frozen=True, slots=True)
class DMARCResult:
    result: str  # none | pass | fail | temperror | permerror
    domain: str = ""  # the From domain
    policy: str = ""  # the published policy that applies: p=, or sp= for a subdomain
    disposition: str = "none"  # none | quarantine | reject: asked for this message
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "domain": self.domain, "policy": self.policy,
                "disposition": self.disposition, "reason": self.reason}


# Read once per process: each of the worker threads' first checks read the whole
# list (75 ms of CPU) beside the others, 0.6 s of a worker's first second after start.
_suffixes = once(PublicSuffixList)


def organizational_domain(domain: str) -> str:
    """The registrable domain: example.co.uk for mail.example.co.uk (RFC 7489 3.2)."""
    return _suffixes().privatesuffix(domain.lower()) or domain.lower()


def aligned(a: str, b: str, strict: bool) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else organizational_domain(a) == organizational_domain(b)


def from_domain(data: bytes) -> str | DMARCResult:
    """The one RFC5322.From domain, or the permerror that there is none or several."""
    fields = field_values(data, b"from")
    if len(fields) != 1:
        return DMARCResult("permerror", reason=f"{len(fields)} From fields")
    value = re.sub(rb"\r?\n", b"", fields[0]).decode("utf-8", "replace")
    domains = {addr.rpartition("@")[2].lower().rstrip(".")
               for _, addr in email.utils.getaddresses([value]) if "@" in addr}
    if len(domains) != 1:
        return DMARCResult("permerror", reason="no single From domain")
    domain = domains.pop()
    if not valid_domain(domain):
        return DMARCResult("permerror", domain, reason="the From domain is not a domain name")
    return domain


def _record(resolver: Resolver, domain: str) -> dict[str, str] | None:
    """The tags of the one DMARC record at _dmarc.<domain>; None for none or several."""
    records = [t for t in resolver.txt(f"_dmarc.{domain}")
               if re.match(rb"^v\s*=\s*DMARC1\s*(;|$)", t)]
    if len(records) != 1:
        return None
    tags: dict[str, str] = {}
    for part in records[0].decode("ascii", "replace").split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def evaluate(resolver: Resolver, data: bytes, dkim: list[DKIMResult], spf: SPFResult | None,
             sample: Callable[[], int] = lambda: random.randrange(100)) -> DMARCResult:
    """The DMARC result of a message with these DKIM and SPF results.

    ``sample`` draws 0..99 for ``pct=`` (tests pass a fixed one).
    """
    domain = from_domain(data)
    if isinstance(domain, DMARCResult):
        return domain
    organizational = organizational_domain(domain)
    try:
        tags = _record(resolver, domain)
        subdomain = False
        if tags is None and organizational != domain:
            tags = _record(resolver, organizational)
            subdomain = True
    except TempLookupError as exc:
        return DMARCResult("temperror", domain, reason=f"DNS: {exc}")
    if tags is None:
        return DMARCResult("none", domain, reason="no DMARC record")
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if "rua" not in tags:  # RFC 7489 6.6.3: no valid p= and nowhere to report
            return DMARCResult("none", domain, reason="the DMARC record has no valid p=")
        policy = "none"
    if subdomain and tags.get("sp", "").lower() in POLICIES:
        policy = tags["sp"].lower()

    strict_dkim = tags.get("adkim", "r").lower() == "s"
    strict_spf = tags.get("aspf", "r").lower() == "s"
    if any(r.result == "pass" and aligned(r.domain, domain, strict_dkim) for r in dkim):
        return DMARCResult("pass", domain, policy, reason="DKIM aligned")
    if spf is not None and spf.result == "pass" and aligned(spf.domain, domain, strict_spf):
        return DMARCResult("pass", domain, policy, reason="SPF aligned")
    if (any(r.result == "temperror" for r in dkim)
            or (spf is not None and spf.result == "temperror")):
        return DMARCResult("temperror", domain, policy, reason="DKIM or SPF lookup failed")
    try:
        pct = min(max(int(tags.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    disposition = policy if sample() < pct else _WEAKER[policy]
    return DMARCResult("fail", domain, policy, disposition, "no aligned DKIM or SPF pass")
