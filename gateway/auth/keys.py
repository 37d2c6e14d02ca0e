"""DKIM keys: new ones generated, loaded ones checked against what DNS publishes, and
their DNS records.  Reading and parsing key files is ``gateway.keyfiles``.
"""

from __future__ import annotations

import base64
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway.auth.verify import Lookup, TempLookupError
from gateway.keyfiles import ED25519, MIN_RSA_BITS, KeyFileError, SigningKey

GOOD_RSA_BITS = 2048


def txt_zone_line(name: str, record: str) -> str:
    """A zone file line; the record cut into strings of at most 255 octets (RFC 1035)."""
    parts = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    return f"{name}. IN TXT ( {parts} )"


def generate(algorithm: str, bits: int = GOOD_RSA_BITS) -> bytes:
    """A new private key in the file format described above."""
    if algorithm == ED25519:
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        return base64.b64encode(seed) + b"\n"
    if bits < MIN_RSA_BITS:
        raise KeyFileError(f"RSA keys under {MIN_RSA_BITS} bits are not valid (RFC 8301)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def published_problem(key: SigningKey, lookup: Lookup) -> str | None:
    """None when DNS publishes this key's public half at its selector; else what is wrong.
    ``lookup`` is the one inbound verification uses (``verify.dns_lookup``)."""
    try:
        record = lookup(key.record_name)
    except TempLookupError as exc:
        return f"DNS lookup of {key.record_name} failed: {exc}"
    if record is None:
        return f"no TXT record at {key.record_name}"
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList:
        return f"{key.record_name} has a malformed DKIM record"
    published = re.sub(rb"\s", b"", tags.get(b"p", b"")).decode("ascii", "replace")
    if not published:
        return f"{key.record_name} publishes an empty p=: the key is revoked"
    if published != key.public:
        return f"{key.record_name} publishes a different key (p= does not match)"
    return None
