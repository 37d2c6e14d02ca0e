"""ARC sealing of forwarded copies (RFC 8617), so a receiver can trust what we saw.

A copy of inbound mail is changed on its way (our trace header, the Bcc field
removed, a Cc address added), which can break the author's DKIM signature.  The
ARC set we add records, under our signature, the results we found on arrival:
ARC-Authentication-Results (our Authentication-Results field with ``i=``),
ARC-Message-Signature over the message as we send it, and ARC-Seal over the
chain, with ``cv=`` from our ARC check of the sets earlier forwarders added.

dkimpy builds the set; only its RSA operation is replaced by OpenSSL's
(dkimpy's own RSA takes 6 ms per signature in Python, and a seal needs two).
ARC is defined for rsa-sha256 only, so a domain needs an RSA key to seal.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.auth.keys import SigningKey

# What the ARC-Message-Signature covers (absent fields too, so they cannot be added).
SEALED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to",
                  b"in-reply-to", b"references", b"mime-version", b"content-type",
                  b"content-transfer-encoding")


class _Sealer(dkim.ARC):
    def __init__(self, message: bytes, private: rsa.RSAPrivateKey) -> None:
        super().__init__(message, signature_algorithm=b"rsa-sha256")
        self._private = private

    def gen_header(self, fields: list[tuple[bytes, bytes]], include_headers: Any,
                   canon_policy: Any, header_name: bytes, pk: Any,
                   standardize: bool = False) -> bytes:
        """dkimpy's DomainSigner.gen_header (unstandardized), signing with OpenSSL."""
        value = dkim.fold(b"; ".join(b"=".join(x) for x in fields), namelen=len(header_name),
                          linesep=b"\r\n")
        value = dkim.RE_BTAG.sub(b"\\1", value)
        digest = hashlib.sha256()
        self.signed_headers = dkim.hash_headers(
            digest, canon_policy, canon_policy.canonicalize_headers(self.headers),
            include_headers, (header_name, b" " + value), dict(fields))
        signature = self._private.sign(digest.digest(), padding.PKCS1v15(),
                                       Prehashed(hashes.SHA256()))
        index = next(i for i, (name, _) in enumerate(fields) if name == b"b")
        fields[index] = (b"b", base64.b64encode(signature))
        value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        return bytes(dkim.fold(value, namelen=len(header_name), linesep=self.linesep))


def _chain_checked(data: bytes, authserv_id: str) -> bool:
    """Whether our Authentication-Results field gives the chain a state ``cv=`` can carry
    (pass, fail, none; or no arc= at all, for a message without a chain)."""
    ours = re.search(rb"(?im)^authentication-results:[ \t]*" + re.escape(authserv_id.encode())
                     + rb"[ \t]*;[^\r\n]*(?:\r\n[ \t][^\r\n]*)*", data)
    if ours is None:
        return False
    found = re.search(rb"\barc=([a-z]+)", ours.group(0), re.IGNORECASE)
    return found is None or found.group(1).lower() in (b"pass", b"fail", b"none")


def seal(data: bytes, key: SigningKey, private: rsa.RSAPrivateKey,
         authserv_id: str) -> bytes | None:
    """``data`` with our ARC set on top; None when there is nothing to seal: no
    Authentication-Results of ours in it, or a chain we cannot extend (RFC 8617 5.1)."""
    if not _chain_checked(data, authserv_id):
        return None
    fields = _Sealer(data, private).sign(key.selector.encode(), key.domain.encode(),
                                         key.private, authserv_id.encode(),
                                         include_headers=SEALED_HEADERS)
    if not fields:
        return None
    return b"".join(fields) + data
