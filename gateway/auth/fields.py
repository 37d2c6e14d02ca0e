"""What DKIM signatures and ARC sets share: relaxed canonicalization, tag lists folded
the way dkimpy folds them, and the private-key operation done by OpenSSL (dkimpy's
own RSA in Python takes 6 ms per signature, OpenSSL's well under 1)."""

from __future__ import annotations

import base64
import hashlib

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# What our DKIM signatures and ARC-Message-Signatures cover, also where absent (so
# these fields cannot be added later).
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")
Tags = list[tuple[bytes, bytes]]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def body_hash(body: bytes) -> bytes:
    """bh= of a body under relaxed canonicalization (RFC 6376 3.7)."""
    return base64.b64encode(hashlib.sha256(RELAXED.canonicalize_body(body)).digest())


def unsigned(name: bytes, tags: Tags) -> bytes:
    """The field's folded value with an empty b=, as it is hashed (b= on its own line)."""
    value = dkim.fold(b"; ".join(b"=".join(t) for t in tags), namelen=len(name))
    return bytes(dkim.RE_BTAG.sub(b"\\1", value))


def signed(name: bytes, tags: Tags, digest: bytes, private: PrivateKey) -> bytes:
    """The whole field, ``tags`` ending with b=, signed over the SHA-256 ``digest``."""
    if isinstance(private, rsa.RSAPrivateKey):
        signature = private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:  # RFC 8463: ed25519 signs the SHA-256 digest of the header data
        signature = private.sign(digest)
    tags = [*tags[:-1], (b"b", base64.b64encode(signature))]
    return name + b": " + bytes(dkim.fold(b"; ".join(b"=".join(t) for t in tags) + b"\r\n",
                                          namelen=len(name)))
