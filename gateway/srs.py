"""The Sender Rewriting Scheme, so that forwarded copies pass SPF at the receiver.

A copy of inbound mail leaves with an envelope sender in the tenant's own
domain that still leads back to the original sender, in the format of
Mail::SRS, libsrs2 and postsrsd, so any of them can read ours:

    SRS0=HHHH=TT=orig.example=alice@tenant.example
    SRS1=HHHH=first.example==HHHH=TT=orig.example=alice@tenant.example

HHHH is the first 4 characters of a base64 HMAC-SHA1 (over the lower-cased
parts) with our secret; TT the day of writing, base32, modulo 1024.  A bounce
to such an address is accepted only when the hash is ours and the address is
at most ``max_age`` days old; anything else is forged or stale and refused,
so nobody can use the gateway to send backscatter.  Secrets rotate: the
first one signs, every listed one is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.keyfiles import KeyFileError, read_secret

HASH_LENGTH = 4
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_PERIOD = len(_BASE32) ** 2  # 1024 days
_SRS = re.compile(r"^srs([01])[=+-]", re.IGNORECASE)


class SRSError(Exception):
    """An SRS address we cannot take: ``reason`` is forged, expired or malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_srs(address: str) -> bool:
    return bool(_SRS.match(address))


@dataclass(frozen=True, slots=True)
class SRS:
    secrets: Sequence[bytes]
    max_age_days: int = 21
    clock: Callable[[], float] = time.time

    def _hash(self, secret: bytes, *parts: str) -> str:
        mac = hmac.new(secret, b"".join(p.lower().encode("utf-8") for p in parts), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def _today(self) -> int:
        return int(self.clock() // 86400) % _PERIOD

    def _stamp(self) -> str:
        day = self._today()
        return _BASE32[day >> 5] + _BASE32[day & 31]

    def forward(self, sender: str, domain: str) -> str:
        """The envelope sender for a copy that ``domain`` forwards."""
        local, _, host = sender.rpartition("@")
        if not local or not host:
            return sender  # the null sender, or nothing to rewrite
        if host.lower() == domain.lower() and is_srs(local):
            return sender  # ours already
        secret = self.secrets[0]
        match = _SRS.match(local)
        if match is not None and match[1] == "0":  # a forwarder before us: SRS1
            opaque = "=" + local[5:]
            return f"SRS1={self._hash(secret, host, opaque)}={host}={opaque}@{domain}"
        if match is not None:  # SRS1 of an earlier forwarder: keep its first host
            first, sep, opaque = local[5:].partition("==")
            if not sep or "=" not in first:
                return self._srs0(secret, local, host, domain)
            first_host = first.split("=", 1)[1]
            opaque = "=" + opaque
            return f"SRS1={self._hash(secret, first_host, opaque)}={first_host}={opaque}@{domain}"
        return self._srs0(secret, local, host, domain)

    def _srs0(self, secret: bytes, local: str, host: str, domain: str) -> str:
        stamp = self._stamp()
        return f"SRS0={self._hash(secret, stamp, host, local)}={stamp}={host}={local}@{domain}"

    def reverse(self, address: str) -> str:
        """The address an SRS address stands for; SRSError when it is not ours or too old."""
        parsed = _parse(address)
        self._check_hash(parsed.hash, *parsed.signed)
        if parsed.stamp is not None:
            self._check_age(parsed.stamp)
        return parsed.original

    def _check_hash(self, given: str, *parts: str) -> None:
        for secret in self.secrets:
            # MTAs may change the case of a local part: compare without case
            if hmac.compare_digest(self._hash(secret, *parts).lower(), given.lower()):
                return
        raise SRSError("forged", "the SRS hash is not ours")

    def _check_age(self, stamp: str) -> None:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in _BASE32 for c in stamp):
            raise SRSError("malformed", "bad SRS timestamp")
        then = _BASE32.index(stamp[0]) << 5 | _BASE32.index(stamp[1])
        age = (self._today() - then) % _PERIOD
        if age > self.max_age_days:
            raise SRSError("expired", f"the SRS address is {age} days old")


@dataclass(frozen=True, slots=True)
class _Parsed:
    hash: str
    signed: tuple[str, ...]  # the parts the hash covers
    stamp: str | None  # SRS0 only
    original: str


def _parse(address: str) -> _Parsed:
    local = address.rpartition("@")[0]
    match = _SRS.match(local)
    if match is None:
        raise SRSError("malformed", "not an SRS address")
    if match[1] == "1":
        given, sep, rest = local[5:].partition("=")
        first_host, sep2, opaque = rest.partition("==")
        if not sep or not sep2 or not first_host:
            raise SRSError("malformed", "malformed SRS1 address")
        return _Parsed(given, (first_host, "=" + opaque), None, f"SRS0={opaque}@{first_host}")
    parts = local[5:].split("=", 3)
    if len(parts) != 4 or not all(parts):
        raise SRSError("malformed", "malformed SRS0 address")
    given, stamp, host, original = parts
    return _Parsed(given, (stamp, host, original), stamp, f"{original}@{host}")


def decode(address: str) -> str:
    """Where a bounce to an SRS address goes, without checking it (the listener did)."""
    return _parse(address).original


def load_secrets(path: str | Path) -> list[bytes]:
    """Secrets from a file, one per line (the first signs); KeyFileError when others may
    read or write it, or it holds no usable secret."""
    data = read_secret(Path(path))
    secrets = [line.strip() for line in data.splitlines() if line.strip()]
    if not secrets:
        raise KeyFileError(f"{path}: no secret in the file")
    if len(secrets[0]) < 16:
        raise KeyFileError(f"{path}: the first secret is shorter than 16 characters")
    return secrets
