"""DKIM signatures on what the gateway sends (dkimpy), with the tenant's keys.

A key signs only mail of the tenant that owns its domain (the most specific of
the tenants' domains that is the key's domain or a parent of it): whatever a
message's From says, no tenant's mail is ever signed in another tenant's
name.  A key of a domain that no tenant owns is the operator's: it signs only
what the gateway writes itself in that domain (DSNs, notices), which no user
can claim as their From (submission checks the header From).

Mail the tenant sends (its users' mail, DSNs, notices) is signed with the keys
of its From domain when they may sign it (the signature then aligns for
DMARC), else with those of the tenant's first domain that has keys.  Mail that
came in from outside and goes on (Cc, Bcc and route copies, returned bounces)
was written by somebody we did not authenticate, so it never gets a signature
aligned with any of its From domains: the tenant signs as a forwarder, with its
first domain with keys that aligns with none of them (beside the author's own
signature and our ARC set), or not at all, also when a From field cannot be
read.  Per domain, the last key listed of each algorithm signs, so a domain can
be signed with RSA and ed25519 at once (RFC 8463) and a new selector takes over
when it is listed after the old one.

Signatures use relaxed/relaxed canonicalization and never ``l=``.  They cover
From, To, Cc, Subject, Date, Message-ID, Reply-To, In-Reply-To, References and
the MIME headers, also where absent (so they cannot be added later), with
From signed once more than it occurs (so a second From cannot be added).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.auth import arc, fields
from gateway.auth.dmarc import aligned
from gateway.auth.fields import RELAXED, SIGNED_HEADERS
from gateway.headers import field_values, from_addresses
from gateway.keyfiles import ED25519, RSA, SigningKey, load

if TYPE_CHECKING:  # the authentication processes import this module: no pydantic there
    from gateway.config import GatewayConfig


def author_domains(data: bytes) -> list[str] | None:
    """The domain of each From address, top first (none when there is no From field);
    None when a From field cannot be read."""
    addresses = from_addresses(data)
    if addresses is None:
        return None
    return [a.rpartition("@")[2].rstrip(".") for a in addresses]


_NAME = b"DKIM-Signature"


def _private_key(key: SigningKey) -> fields.PrivateKey:
    if key.algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private))
    loaded = serialization.load_pem_private_key(key.private, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)  # keys.parse accepted only RSA
    return loaded


@dataclass(frozen=True)
class Signed:
    data: bytes
    keys: tuple[SigningKey, ...]  # the keys that signed; empty when none applied


@dataclass(frozen=True)
class Protected:
    """A copy with our ARC set and DKIM signatures, and what went into them."""

    data: bytes
    sealed: tuple[SigningKey, ...]  # the key of our ARC set; empty when none was added
    signed: tuple[SigningKey, ...]  # the keys of our DKIM signatures
    seal_error: str = ""  # why the copy could not be sealed (dkimpy refused a header)
    sign_error: str = ""  # why it could not be signed


Private = Callable[[SigningKey], fields.PrivateKey]


class PrivateKeys:
    """The private-key objects of the keys used so far, loaded once each (an RSA key
    takes 35 ms to load: its checks, not the signing, would be most of the cost)."""

    LIMIT = 256  # keys kept; more than that many are only there after many rotations

    def __init__(self) -> None:
        self._loaded: dict[SigningKey, fields.PrivateKey] = {}

    def __call__(self, key: SigningKey) -> fields.PrivateKey:
        private = self._loaded.get(key)
        if private is None:
            if len(self._loaded) >= self.LIMIT:
                self._loaded.clear()
            private = self._loaded[key] = _private_key(key)
        return private


class Signer:
    def __init__(self, keys: Iterable[SigningKey],
                 tenant_domains: Mapping[str, Iterable[str]]) -> None:
        by_domain: dict[str, dict[str, SigningKey]] = {}
        for key in keys:  # a later key of the same domain and algorithm replaces an earlier one
            by_domain.setdefault(key.domain, {})[key.algorithm] = key
        self.by_domain = {d: tuple(k.values()) for d, k in by_domain.items()}
        self.tenant_domains = {t: [d.lower() for d in ds] for t, ds in tenant_domains.items()}
        self._owners = {d: t for t, ds in self.tenant_domains.items() for d in ds}
        self._keyed = {t: [d for d in ds if d in self.by_domain]  # domains with keys
                       for t, ds in self.tenant_domains.items()}
        self.private = PrivateKeys()
        for ks in self.by_domain.values():  # loaded now: a key that cannot be used fails here
            for k in ks:
                self.private(k)

    def owner(self, domain: str) -> str | None:
        """The tenant of the most specific of the tenants' domains that is ``domain`` or
        a parent of it; None: no tenant's (the operator's)."""
        labels = domain.split(".")
        for n in range(len(labels) - 1):
            owner = self._owners.get(".".join(labels[n:]))
            if owner is not None:
                return owner
        return None

    def keys_for(self, domains: list[str] | None, tenant_id: str, *,
                 inbound: bool = False) -> tuple[SigningKey, ...]:
        """The keys that sign a message of ``tenant_id`` with these From domains
        (``author_domains``): mail that came in from outside when ``inbound``."""
        own = self._keyed.get(tenant_id, [])
        if inbound:
            if domains is None:
                return ()
            for d in own:
                if not any(aligned(d, author, False) for author in domains):
                    return self.by_domain[d]
            return ()
        author = domains[0] if domains else None
        if author in self.by_domain and self.owner(author) in (tenant_id, None):
            return self.by_domain[author]
        return self.by_domain[own[0]] if own else ()

    def sealing_key(self, tenant_id: str) -> SigningKey | None:
        """The RSA key of the tenant's first domain that has one (ARC is RSA only)."""
        for own in self.tenant_domains.get(tenant_id, ()):
            for key in self.by_domain.get(own, ()):
                if key.algorithm == RSA:
                    return key
        return None

    def seal(self, data: bytes, tenant_id: str, authserv_id: str) -> Signed:
        """``data`` with our ARC set only (see gateway.auth.arc); unchanged, with no key,
        when the tenant has no RSA key or there is nothing to seal."""
        done = protect(data, self.sealing_key(tenant_id), (), authserv_id, self.private)
        if done.seal_error:
            raise ValueError(f"not sealed: {done.seal_error}")
        return Signed(done.data, done.sealed)

    def sign(self, data: bytes, tenant_id: str) -> Signed:
        """``data``, a message the tenant sends, with a DKIM-Signature field per key on
        top, and no ARC set."""
        done = protect(data, None, self.plan(data, tenant_id, seal=False, inbound=False)[1],
                       "", self.private)
        if done.sign_error:
            raise ValueError(f"not signed: {done.sign_error}")
        return Signed(done.data, done.signed)

    def plan(self, data: bytes, tenant_id: str, *, seal: bool,
             inbound: bool) -> tuple[SigningKey | None, tuple[SigningKey, ...]]:
        """The keys ``protect`` takes for a copy: the ARC sealing key (when ``seal``, for
        a copy forwarded from inbound mail, and the tenant has one) and the DKIM keys
        (``inbound``: of mail that came in from outside)."""
        # The From fields are read only when a key could sign (most copies of a tenant
        # without keys are not signed at all).
        may_sign = self._keyed.get(tenant_id) if inbound else self.by_domain
        return (self.sealing_key(tenant_id) if seal else None,
                self.keys_for(author_domains(data), tenant_id, inbound=inbound)
                if may_sign else ())


def protect(data: bytes, seal_key: SigningKey | None, sign_keys: tuple[SigningKey, ...],
            authserv_id: str, private: Private) -> Protected:
    """``data`` with our ARC set (with ``seal_key``) and our DKIM signatures (one per
    key of ``sign_keys``) on top, the message parsed and its body hashed once for
    both.  A step that fails leaves the copy without it, and says why."""
    if seal_key is None and not sign_keys:
        return Protected(data, (), ())
    try:
        headers, body = dkim.rfc822_parse(data)
        canonical = RELAXED.canonicalize_headers(headers)
        body_hash = fields.body_hash(body)
    except Exception as exc:  # dkimpy refuses some malformed headers: send it as it is
        why = exc.__class__.__name__
        return Protected(data, (), (), why if seal_key else "", why if sign_keys else "")
    arc_fields, seal_error = b"", ""
    sealed: tuple[SigningKey, ...] = ()
    if seal_key is not None:
        try:
            key = private(seal_key)
            assert isinstance(key, rsa.RSAPrivateKey)
            arc_fields = arc.arc_set(headers, canonical, body_hash, seal_key, key,
                                     authserv_id) or b""
            sealed = (seal_key,) if arc_fields else ()
        except Exception as exc:  # as above: the copy goes unsealed
            seal_error = exc.__class__.__name__
    signed, sign_error, dkim_fields = sign_keys, "", b""
    if sign_keys:
        # Our DKIM signature covers none of the ARC fields: the same header list serves.
        try:
            dkim_fields = signatures(data, sign_keys, canonical, body_hash, private)
        except Exception as exc:  # as above: the copy goes unsigned
            signed, sign_error = (), exc.__class__.__name__
    return Protected(dkim_fields + arc_fields + data, sealed, signed, seal_error, sign_error)


def signatures(data: bytes, keys: tuple[SigningKey, ...], canonical: list[tuple[bytes, bytes]],
               body_hash: bytes, private: Private) -> bytes:
    """A DKIM-Signature field per key (RFC 6376 3.5, 3.7) for a message with these
    canonicalized header fields, as dkimpy's ``DKIM.sign`` builds them, with the
    private-key operation done by OpenSSL."""
    present = len(field_values(data, b"from"))
    include = (*SIGNED_HEADERS, *([b"from"] * max(present, 1)))
    now = str(int(time.time())).encode()
    out = []
    for key in keys:
        domain = key.domain.encode()
        tags = [(b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
                (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"),
                (b"s", key.selector.encode()), (b"t", now), (b"h", b" : ".join(include)),
                (b"bh", body_hash), (b"b", b"0" * 60)]  # b= folds onto its own line
        digest = hashlib.sha256()
        dkim.hash_headers(digest, RELAXED, canonical, include,
                          (_NAME, b" " + fields.unsigned(_NAME, tags)), dict(tags))
        out.append(fields.signed(_NAME, tags, digest.digest(), private(key)))
    return b"".join(out)


def from_config(config: GatewayConfig) -> Signer:
    """A Signer with the keys of ``dkim.keys``, read from their files now."""
    keys = [load(k.key_file, k.domain, k.selector, k.algorithm) for k in config.dkim.keys]
    return Signer(keys, {tid: t.domains for tid, t in config.tenants.items()})
