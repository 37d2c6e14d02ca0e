"""Every authentication check of one inbound message, and how they are reported.

``Authenticator`` runs DKIM (each signature), SPF (the envelope sender, or
HELO for <>), ARC (the chain of earlier forwarders) and DMARC (From aligned
with a DKIM or SPF pass), all on one cached resolver.  It blocks (DNS, RSA):
call it in a thread.  ``AuthResults`` is what is stored with the message, what
workflow rules match on, and our Authentication-Results field (RFC 8601).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import dkim

from gateway.auth import dmarc as dmarc_check
from gateway.auth import spf as spf_check
from gateway.auth.dmarc import DMARCResult
from gateway.auth.dns import Resolver, TempLookupError
from gateway.auth.spf import SPFResult
from gateway.auth.verify import MIN_RSA_BITS, DKIMResult, aggregate, key_lookup, verify
from gateway.headers import field_values
from gateway.workers import by_value


@by_value
@dataclass(frozen=True, slots=True)
class ARCResult:
    result: str  # none | pass | fail | temperror
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "reason": self.reason}


@by_value
@dataclass(frozen=True, slots=True)
class AuthResults:
    dkim: tuple[DKIMResult, ...] = ()
    spf: SPFResult | None = None
    dmarc: DMARCResult | None = None
    arc: ARCResult | None = None

    def for_rules(self) -> tuple[tuple[str, str], ...]:
        """(method, result) pairs, as workflow rules match them (``auth:``)."""
        out = []
        if self.dkim:
            out.append(("dkim", aggregate(list(self.dkim))))
        for method, r in (("spf", self.spf), ("dmarc", self.dmarc), ("arc", self.arc)):
            if r is not None:
                out.append((method, r.result))
        return tuple(out)

    def as_dict(self) -> dict[str, Any]:
        """What is stored with the message (messages.auth_results)."""
        out: dict[str, Any] = {"dkim": [r.as_dict() for r in self.dkim]}
        for method, r in (("spf", self.spf), ("dmarc", self.dmarc), ("arc", self.arc)):
            if r is not None:
                out[method] = r.as_dict()
        return out

    def header(self, authserv_id: str) -> str:
        """Our Authentication-Results field (RFC 8601), folded, with its CRLF."""
        parts = [_dkim_part(r) for r in self.dkim]
        if self.spf is not None:
            identity = "smtp.mailfrom" if self.spf.identity == "mailfrom" else "smtp.helo"
            parts.append(f"spf={self.spf.result}{_reason(self.spf.result, self.spf.reason)}"
                         + (f" {identity}={_value(self.spf.domain)}" if self.spf.domain else ""))
        if self.arc is not None:
            parts.append(f"arc={self.arc.result}{_reason(self.arc.result, self.arc.reason)}")
        if self.dmarc is not None:
            d = self.dmarc
            comment = f" (p={d.policy} dis={d.disposition})" if d.policy else ""
            parts.append(f"dmarc={d.result}{comment}{_reason(d.result, d.reason)}"
                         + (f" header.from={_value(d.domain)}" if d.domain else ""))
        return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"


def _dkim_part(r: DKIMResult) -> str:
    if r.result == "none":
        return "dkim=none"
    part = f"dkim={r.result}{_reason(r.result, r.reason)}"
    for name, value in (("d", r.domain), ("s", r.selector), ("a", r.algorithm),
                        ("b", r.header_b)):
        if value:
            part += f" header.{name}={_value(value)}"
    return part


def _reason(result: str, reason: str) -> str:
    return f" reason={_value(reason)}" if reason and result != "pass" else ""


_TSPECIALS = re.compile(r'[()<>@,;:\\"/\[\]?=\s]')


def _value(text: str) -> str:
    """An RFC 8601 value: the token as it is, or a quoted string (printable ASCII only)."""
    clean = "".join(c for c in text if 32 <= ord(c) < 127)[:200]
    if clean and not _TSPECIALS.search(clean):
        return clean
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Authenticator:
    """The checks an inbound message gets, as configured (``auth:`` settings)."""

    def __init__(self, resolver: Resolver, *, dkim: bool = True, spf: bool = True,
                 dmarc: bool = True, arc: bool = True) -> None:
        self.resolver = resolver
        self.lookup = key_lookup(resolver)
        self.dkim, self.spf, self.dmarc, self.arc = dkim, spf, dmarc, arc

    def __reduce__(self) -> tuple[Any, tuple[Resolver]]:
        """Pickled as its settings (for a worker process; see gateway.auth.work)."""
        return functools.partial(Authenticator, dkim=self.dkim, spf=self.spf,
                                 dmarc=self.dmarc, arc=self.arc), (self.resolver,)

    def for_dmarc(self) -> Authenticator:
        """The checks a DMARC verdict needs and nothing more (before a reply is sent)."""
        return Authenticator(self.resolver, dkim=True, spf=True, dmarc=True, arc=False)

    def __call__(self, raw: bytes, *, mail_from: str, helo: str, client_ip: str) -> AuthResults:
        dkim_results = tuple(verify(raw, self.lookup)) if self.dkim or self.dmarc else ()
        spf_result = (spf_check.check(self.resolver, client_ip, mail_from, helo)
                      if self.spf or self.dmarc else None)
        dmarc_result = (dmarc_check.evaluate(self.resolver, raw, list(dkim_results), spf_result)
                        if self.dmarc else None)
        return AuthResults(dkim=dkim_results, spf=spf_result, dmarc=dmarc_result,
                           arc=self.arc_chain(raw) if self.arc else None)

    def arc_chain(self, raw: bytes) -> ARCResult:
        """The state of the ARC chain earlier forwarders left (RFC 8617 5.2)."""
        if not field_values(raw, b"arc-seal"):
            return ARCResult("none")

        def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
            return self.lookup(name.decode() if isinstance(name, bytes) else name)

        try:
            cv, _, reason = dkim.arc_verify(raw, dnsfunc=dnsfunc, minkey=MIN_RSA_BITS)
        except TempLookupError as exc:
            return ARCResult("temperror", f"DNS: {exc}")
        except dkim.DKIMException as exc:
            return ARCResult("fail", str(exc)[:200])
        result = cv.decode() if isinstance(cv, bytes) else str(cv)
        return ARCResult(result if result in ("pass", "fail", "none") else "fail",
                         str(reason or "")[:200])
