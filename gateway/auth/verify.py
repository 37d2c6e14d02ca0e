"""Inbound DKIM verification with exact results per signature (RFC 8601 names).

dkimpy's ``verify`` answers False alike for a bad signature, a missing key and
a DNS timeout.  Here the key is fetched first, through the gateway's own
lookup, so each case gets its own result:

* ``none``: the message has no DKIM-Signature;
* ``pass``: the signature verifies and covers the whole body;
* ``neutral``: it verifies, but ``l=`` leaves part of the body unsigned;
* ``fail``: the body or the signed headers were changed, or the signature is wrong;
* ``temperror``: the key could not be fetched now (timeout, SERVFAIL);
* ``permerror``: no key is published, the key is revoked or unusable, the
  signature is malformed, or it is not acceptable under RFC 8301 (rsa-sha1, an
  RSA key under 1024 bits).

ed25519-sha256 (RFC 8463) verifies like RSA.  Verification is CPU work and
blocking DNS: run it in a thread.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.auth.dns import Resolver, TempLookupError
from gateway.headers import field_values
from gateway.workers import by_value

MIN_RSA_BITS = 1024

# name -> the TXT record's text, None when there is none (NXDOMAIN, no TXT)
Lookup = Callable[[str], bytes | None]


@by_value
@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: str  # none | pass | fail | neutral | temperror | permerror
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""
    header_b: str = ""  # the first 8 characters of b=, to tell signatures apart (RFC 6008)

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "domain": self.domain, "selector": self.selector,
                "algorithm": self.algorithm, "reason": self.reason, "header_b": self.header_b}


def verify(data: bytes, lookup: Lookup) -> list[DKIMResult]:
    """One result per DKIM-Signature, top first; ``[none]`` when there is none."""
    fields = field_values(data, b"dkim-signature")
    if not fields:
        return [DKIMResult("none", reason="no DKIM-Signature")]
    checker = dkim.DKIM(data, minkey=MIN_RSA_BITS)
    return [_one(checker, index, raw, lookup) for index, raw in enumerate(fields)]


def _one(checker: dkim.DKIM, index: int, raw: bytes, lookup: Lookup) -> DKIMResult:
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", raw))
    except InvalidTagValueList:
        return DKIMResult("permerror", reason="malformed DKIM-Signature")
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace")
    algorithm = tags.get(b"a", b"").decode("ascii", "replace").lower()
    header_b = re.sub(rb"\s", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace")

    def result(name: str, reason: str = "") -> DKIMResult:
        return DKIMResult(name, domain, selector, algorithm, reason, header_b)

    if not domain or not selector or not algorithm:
        return result("permerror", "d=, s= or a= missing")
    if algorithm == "rsa-sha1":
        return result("permerror", "rsa-sha1 is not valid (RFC 8301)")
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        return result("permerror", f"unknown algorithm {algorithm}")
    name = f"{selector}._domainkey.{domain}."
    try:
        record = lookup(name)
    except TempLookupError as exc:
        return result("temperror", f"key lookup failed: {exc}")
    if not record:
        return result("permerror", f"no key published at {name.rstrip('.')}")
    problem = _key_problem(record)
    if problem:
        return result("permerror", problem)
    try:
        ok = checker.verify(idx=index, dnsfunc=lambda _name, timeout=5: record)
    except dkim.ValidationError as exc:
        text = str(exc)
        if "body hash mismatch" in text:
            return result("fail", "body hash mismatch")
        return result("permerror", text[:200])
    except dkim.DKIMException as exc:
        return result("permerror", str(exc)[:200])
    if not ok:
        return result("fail", "signature did not verify")
    length = tags.get(b"l")
    if length is not None:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        body = len(policy.canonicalize_body(checker.body))
        if not length.isdigit() or int(length) < body:
            return result("neutral", f"l={length.decode('ascii', 'replace')} signs "
                                     f"only part of the body ({body} octets)")
    return result("pass")


def _key_problem(record: bytes) -> str | None:
    """Why a published key cannot verify anything, or None."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return "the key record is malformed"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return "the key record is not DKIM1"
    public = re.sub(rb"\s", b"", tags.get(b"p", b""))
    if not public:
        return "the key is revoked (empty p=)"
    key_type = tags.get(b"k", b"rsa")
    if key_type == b"rsa":
        try:
            key = parse_public_key(base64.b64decode(public))
        except (ValueError, UnparsableKeyError, binascii.Error):
            return "the public key cannot be parsed"
        bits = int(key["modulus"]).bit_length()
        if bits < MIN_RSA_BITS:
            return f"RSA key of {bits} bits: under {MIN_RSA_BITS} is not valid (RFC 8301)"
    elif key_type != b"ed25519":
        return f"unknown key type k={key_type.decode('ascii', 'replace')}"
    return None


def dns_lookup(servers: list[tuple[str, int]], timeout: float) -> Lookup:
    """A Lookup on the given DNS servers (the system's when empty)."""
    return key_lookup(Resolver(servers, timeout))


def key_lookup(resolver: Resolver) -> Lookup:
    """DKIM key records through a resolver: the first TXT record with a p= tag."""
    def lookup(name: str) -> bytes | None:
        return next((text for text in resolver.txt(name) if b"p=" in text), None)

    return lookup


def aggregate(results: list[DKIMResult]) -> str:
    """One DKIM result for the message, as rules see it: pass when any signature
    passes, else the first signature's result (none without a signature)."""
    if any(r.result == "pass" for r in results):
        return "pass"
    return results[0].result if results else "none"
