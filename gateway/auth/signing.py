"""DKIM signatures on what the gateway sends (dkimpy), with the tenant's keys.

The signing domain is the domain of the From address when a key for it is
configured (the signature then aligns for DMARC); otherwise the first domain
of the tenant that has a key (a forwarded copy carries the forwarder's
signature beside the author's own).  Per domain, the last key listed of each
algorithm signs, so a domain can be signed with RSA and ed25519 at once
(RFC 8463) and a new selector takes over when it is listed after the old one.

Signatures use relaxed/relaxed canonicalization and never ``l=``.  They cover
From, To, Cc, Subject, Date, Message-ID, Reply-To, In-Reply-To, References and
the MIME headers, also where absent (so they cannot be added later), with
From signed once more than it occurs (so a second From cannot be added).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.auth import arc, fields
from gateway.auth.fields import RELAXED, SIGNED_HEADERS
from gateway.auth.keys import ED25519, RSA, SigningKey, load
from gateway.config import GatewayConfig
from gateway.headers import field_values


def author_domain(data: bytes) -> str | None:
    """The domain of the (first) From address, from the header block; None if none."""
    fields = field_values(data, b"from")
    if not fields:
        return None
    value = fields[0].decode("utf-8", "replace").replace("\r\n", "")
    address = email.utils.parseaddr(value)[1]
    domain = address.rpartition("@")[2].strip().lower().rstrip(".")
    return domain or None


_NAME = b"DKIM-Signature"


def _private_key(key: SigningKey) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if key.algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(key.private))
    loaded = serialization.load_pem_private_key(key.private, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)  # keys.parse accepted only RSA
    return loaded


@dataclass(frozen=True)
class Signed:
    data: bytes
    keys: tuple[SigningKey, ...]  # the keys that signed; empty when none applied


class Signer:
    def __init__(self, keys: Iterable[SigningKey],
                 tenant_domains: Mapping[str, Iterable[str]]) -> None:
        by_domain: dict[str, dict[str, SigningKey]] = {}
        for key in keys:  # a later key of the same domain and algorithm replaces an earlier one
            by_domain.setdefault(key.domain, {})[key.algorithm] = key
        self.by_domain = {d: tuple(k.values()) for d, k in by_domain.items()}
        self.tenant_domains = {t: [d.lower() for d in ds] for t, ds in tenant_domains.items()}
        self._private: dict[SigningKey, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey] = {
            k: _private_key(k) for ks in self.by_domain.values() for k in ks}

    def keys_for(self, domain: str | None, tenant_id: str) -> tuple[SigningKey, ...]:
        if domain is not None and domain in self.by_domain:
            return self.by_domain[domain]
        for own in self.tenant_domains.get(tenant_id, ()):
            if own in self.by_domain:
                return self.by_domain[own]
        return ()

    def sealing_key(self, tenant_id: str) -> SigningKey | None:
        """The RSA key of the tenant's first domain that has one (ARC is RSA only)."""
        for own in self.tenant_domains.get(tenant_id, ()):
            for key in self.by_domain.get(own, ()):
                if key.algorithm == RSA:
                    return key
        return None

    def seal(self, data: bytes, tenant_id: str, authserv_id: str) -> Signed:
        """``data`` with our ARC set (see gateway.auth.arc); unchanged, with no key,
        when the tenant has no RSA key or there is nothing to seal."""
        key = self.sealing_key(tenant_id)
        if key is None:
            return Signed(data, ())
        private = self._private[key]
        assert isinstance(private, rsa.RSAPrivateKey)
        sealed = arc.seal(data, key, private, authserv_id)
        return Signed(data, ()) if sealed is None else Signed(sealed, (key,))

    def sign(self, data: bytes, tenant_id: str) -> Signed:
        """``data`` with a DKIM-Signature field per key on top (CPU-bound: run in a thread)."""
        keys = self.keys_for(author_domain(data), tenant_id)
        if not keys:
            return Signed(data, ())
        present = len(field_values(data, b"from"))
        include = (*SIGNED_HEADERS, *([b"from"] * max(present, 1)))
        headers, body = dkim.rfc822_parse(data)
        canonical_headers = RELAXED.canonicalize_headers(headers)
        body_hash = fields.body_hash(body)
        now = str(int(time.time())).encode()
        signatures = b"".join(self._signature(key, canonical_headers, body_hash, include, now)
                              for key in keys)
        return Signed(signatures + data, keys)

    def _signature(self, key: SigningKey, headers: list[tuple[bytes, bytes]],
                   body_hash: bytes, include: tuple[bytes, ...], now: bytes) -> bytes:
        """One DKIM-Signature field (RFC 6376 3.5, 3.7), as dkimpy's ``DKIM.sign``
        builds it, with the private-key operation done by OpenSSL."""
        domain = key.domain.encode()
        tags = [(b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
                (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"),
                (b"s", key.selector.encode()), (b"t", now), (b"h", b" : ".join(include)),
                (b"bh", body_hash), (b"b", b"0" * 60)]  # b= folds onto its own line
        digest = hashlib.sha256()
        dkim.hash_headers(digest, RELAXED, headers, include,
                          (_NAME, b" " + fields.unsigned(_NAME, tags)), dict(tags))
        return fields.signed(_NAME, tags, digest.digest(), self._private[key])


def from_config(config: GatewayConfig) -> Signer:
    """A Signer with the keys of ``dkim.keys``, read from their files now."""
    keys = [load(k.key_file, k.domain, k.selector, k.algorithm) for k in config.dkim.keys]
    return Signer(keys, {tid: t.domains for tid, t in config.tenants.items()})
