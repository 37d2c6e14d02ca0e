"""SPF (RFC 7208): may this client IP send mail for the envelope sender's domain?

``check()`` evaluates check_host() for the MAIL FROM identity, or for the HELO
identity when the sender is null (<>), on the gateway's own resolver, so that
a test zone decides everything.  Results are the RFC's seven: none, neutral,
pass, fail, softfail, temperror, permerror.  The RFC's limits are kept: at
most 10 DNS-querying terms (include, a, mx, ptr, exists, redirect) per check,
at most 2 lookups that find nothing, at most 10 names from one MX or PTR
lookup; beyond them the result is permerror.  Macros are expanded (section 7),
except %{p}, which reads "unknown" as the RFC allows; the exp= explanation is
never fetched (a receiver that only records results has no use for it).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from gateway.auth.dns import Resolver, TempLookupError
from gateway.workers import by_value

MAX_LOOKUPS = 10
MAX_VOID = 2
MAX_NAMES = 10

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@by_value
@dataclass(frozen=True, slots=True)
class SPFResult:
    result: str  # none | neutral | pass | fail | softfail | temperror | permerror
    identity: str  # mailfrom | helo
    domain: str
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "identity": self.identity, "domain": self.domain,
                "reason": self.reason}


class _PermError(Exception):
    pass


_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_DIRECTIVE = re.compile(r"^([+\-~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])(.*)$",
                        re.IGNORECASE)
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.\-]*)=(.*)$", re.IGNORECASE)
_CIDRS = re.compile(r"^(?::(?P<domain>[^/]+))?(?:/(?P<v4>\d{1,2}))?(?://(?P<v6>\d{1,3}))?$")
_MACRO = re.compile(r"%(?:\{([a-zA-Z])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.IGNORECASE)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$", re.IGNORECASE)


def valid_domain(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return (len(labels) > 1 and len(domain) <= 253 and all(_LABEL.match(x) for x in labels)
            and not labels[-1].isdigit())


def check(resolver: Resolver, client_ip: str, mail_from: str, helo: str) -> SPFResult:
    """The SPF result for a message from ``client_ip`` with this envelope."""
    identity = "mailfrom" if mail_from else "helo"
    sender = mail_from or f"postmaster@{helo}"
    local, _, domain = sender.rpartition("@")
    domain = domain.lower().rstrip(".")
    if not valid_domain(domain):
        return SPFResult("none", identity, domain, "no domain to check")
    try:
        ip: IP = ipaddress.ip_address(client_ip.split("%")[0])
    except ValueError:
        return SPFResult("none", identity, domain, "no client address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    check = _Check(resolver, ip, local or "postmaster", domain, helo)
    try:
        result, reason = check.check_host(domain)
    except TempLookupError as exc:
        return SPFResult("temperror", identity, domain, f"DNS: {exc}")
    except _PermError as exc:
        return SPFResult("permerror", identity, domain, str(exc))
    return SPFResult(result, identity, domain, reason)


class _Check:
    """One evaluation: the sender, the client, and the lookups spent so far."""

    def __init__(self, resolver: Resolver, ip: IP, local: str, domain: str, helo: str) -> None:
        self.resolver = resolver
        self.ip = ip
        self.local = local
        self.sender_domain = domain
        self.helo = helo
        self.lookups = 0
        self.voids = 0

    def check_host(self, domain: str) -> tuple[str, str]:
        records = [t for t in self.resolver.txt(domain)
                   if t.lower() == b"v=spf1" or t.lower().startswith(b"v=spf1 ")]
        if not records:
            return "none", f"no SPF record at {domain}"
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records")
        try:
            text = records[0].decode("ascii")
        except UnicodeDecodeError:
            raise _PermError(f"the SPF record of {domain} is not ASCII") from None
        directives, redirect = self._parse(text.split()[1:], domain)
        for qualifier, mechanism, argument in directives:
            if self._matches(mechanism, argument, domain):
                return _QUALIFIERS[qualifier or "+"], f"{domain}: matched {mechanism}"
        if redirect is not None:
            self._spend()
            target = self._expand(redirect, domain)
            result, reason = self.check_host(target)
            if result == "none":
                raise _PermError(f"redirect={target}: no SPF record")
            return result, reason
        return "neutral", f"{domain}: nothing matched"

    def _parse(self, terms: list[str], domain: str
               ) -> tuple[list[tuple[str, str, str]], str | None]:
        directives: list[tuple[str, str, str]] = []
        modifiers: dict[str, str] = {}
        for term in terms:
            match = _DIRECTIVE.match(term)
            if match is not None:
                directives.append((match[1], match[2].lower(), match[3]))
                continue
            match = _MODIFIER.match(term)
            if match is None:
                raise _PermError(f"{domain}: unknown term {term[:40]!r}")
            name = match[1].lower()
            if name in modifiers and name in ("redirect", "exp"):
                raise _PermError(f"{domain}: {name}= appears twice")
            modifiers[name] = match[2]
        # After "all", redirect= is ignored (RFC 7208 6.1).
        if any(m == "all" for _, m, _ in directives):
            return directives, None
        return directives, modifiers.get("redirect")

    def _spend(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _PermError(f"more than {MAX_LOOKUPS} DNS-querying terms")

    def _void(self, answers: list[str] | list[bytes]) -> None:
        if not answers:
            self.voids += 1
            if self.voids > MAX_VOID:
                raise _PermError(f"more than {MAX_VOID} lookups found nothing")

    def _matches(self, mechanism: str, argument: str, domain: str) -> bool:
        if mechanism == "all":
            if argument:
                raise _PermError(f"{domain}: all takes no argument")
            return True
        if mechanism in ("ip4", "ip6"):
            return self._in_network(mechanism, argument, domain)
        self._spend()
        if mechanism in ("include", "exists"):
            if not argument.startswith(":") or len(argument) < 2:
                raise _PermError(f"{domain}: {mechanism} needs a domain")
            target = self._expand(argument[1:], domain)
            if mechanism == "exists":
                found = self.resolver.addresses(target, 4)
                self._void(found)
                return bool(found)
            result, _ = self.check_host(target)
            if result == "none":
                raise _PermError(f"include:{target}: no SPF record")
            return result == "pass"
        parts = _CIDRS.match(argument)
        if parts is None:
            raise _PermError(f"{domain}: bad {mechanism} argument {argument[:40]!r}")
        target = self._expand(parts["domain"], domain) if parts["domain"] else domain
        if mechanism == "ptr":
            if parts["v4"] or parts["v6"]:
                raise _PermError(f"{domain}: ptr takes no prefix length")
            return self._ptr(target)
        prefix = self._prefix(parts["v4"] if self.ip.version == 4 else parts["v6"], domain)
        if mechanism == "a":
            found = self.resolver.addresses(target, self.ip.version)
            self._void(found)
            return self._any_in(found, prefix)
        hosts = self.resolver.mx(target)  # mx
        self._void(hosts)
        if len(hosts) > MAX_NAMES:
            raise _PermError(f"{target} has more than {MAX_NAMES} MX hosts")
        return any(self._any_in(self.resolver.addresses(h, self.ip.version), prefix)
                   for h in hosts)

    def _prefix(self, given: str | None, domain: str) -> int:
        longest = 32 if self.ip.version == 4 else 128
        if given is None:
            return longest
        if int(given) > longest:
            raise _PermError(f"{domain}: prefix length /{given} is too long")
        return int(given)

    def _any_in(self, addresses: list[str], prefix: int) -> bool:
        for text in addresses:
            network = ipaddress.ip_network(f"{text}/{prefix}", strict=False)
            if self.ip in network:
                return True
        return False

    def _in_network(self, mechanism: str, argument: str, domain: str) -> bool:
        if not argument.startswith(":"):
            raise _PermError(f"{domain}: {mechanism} needs a network")
        try:
            network = ipaddress.ip_network(argument[1:], strict=False)
        except ValueError:
            raise _PermError(f"{domain}: bad network {argument[1:40]!r}") from None
        if network.version != int(mechanism[-1]):
            raise _PermError(f"{domain}: {mechanism} with an IPv{network.version} network")
        return network.version == self.ip.version and self.ip in network

    def _ptr(self, target: str) -> bool:
        target = target.lower()
        names = self.resolver.ptr(str(self.ip))
        self._void(names)
        for name in names[:MAX_NAMES]:
            name = name.lower()
            if name != target and not name.endswith("." + target):
                continue
            try:
                if str(self.ip) in self.resolver.addresses(name, self.ip.version):
                    return True
            except TempLookupError:
                continue  # an unvalidated name is skipped (RFC 7208 5.5)
        return False

    def _expand(self, spec: str, domain: str) -> str:
        """A domain-spec with its macros expanded (RFC 7208 7), at most 253 octets."""
        def one(match: re.Match[str]) -> str:
            if match[5] is not None:
                literal = {"%": "%", "_": " ", "-": "%20"}.get(match[5])
                if literal is None:
                    raise _PermError(f"{domain}: bad macro %{match[5]}")
                return literal
            letter, digits, reverse, delimiters = match[1], match[2], match[3], match[4]
            value = self._macro(letter.lower(), domain)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                if int(digits) == 0:
                    raise _PermError(f"{domain}: macro with 0 parts")
                parts = parts[-int(digits):]
            out = ".".join(parts)
            return urllib.parse.quote(out, safe="") if letter.isupper() else out

        if "%" in _MACRO.sub("", spec):
            raise _PermError(f"{domain}: bad macro in {spec[:60]!r}")
        expanded = _MACRO.sub(one, spec).rstrip(".")
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.split(".", 1)[1]
        return expanded

    def _macro(self, letter: str, domain: str) -> str:
        if letter == "s":
            return f"{self.local}@{self.sender_domain}"
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(self.ip.exploded.replace(":", ""))
        if letter == "p":
            return "unknown"
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        raise _PermError(f"{domain}: macro %{{{letter}}} is not allowed here")
