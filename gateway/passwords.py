"""Password hashes for submission users: scrypt (stdlib), never plain text.

Format: ``scrypt$N$r$p$SALT$HASH`` (salt and hash base64).  Verification runs
in constant time; callers run it off the event loop (it costs about 0.3 s of CPU
and 128 MiB at N=2**17).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

N, R, P = 2**17, 8, 1  # OWASP's minimum for scrypt; older hashes (N=2**14) still verify
MAXMEM = 256 * 1024 * 1024  # scrypt needs 128 * N * r bytes: 128 MiB at the cost above
_FORMAT = re.compile(r"^scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=N, r=R, p=P, dklen=32,
                            maxmem=MAXMEM)
    return "$".join(["scrypt", str(N), str(R), str(P), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


def is_hash(text: str) -> bool:
    return _FORMAT.match(text) is not None


def is_weak(encoded: str) -> bool:
    """A hash made with a lower cost than hash_password's (it verifies all the same;
    the operator replaces it in gateway.yaml, where it lives)."""
    m = _FORMAT.match(encoded)
    return m is not None and (int(m.group(1)), int(m.group(2)), int(m.group(3))) < (N, R, P)


def verify(password: bytes, encoded: str) -> bool:
    m = _FORMAT.match(encoded)
    if m is None:
        return False
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    salt, expected = base64.b64decode(m.group(4)), base64.b64decode(m.group(5))
    try:
        digest = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=len(expected),
                                maxmem=MAXMEM)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)
