"""DKIM private keys: generated, loaded and checked; their DNS records.

RSA keys are PEM files (PKCS#1 or PKCS#8, as ``openssl genrsa`` or ``dkim
keygen`` write them); ed25519 keys are the base64 32-byte seed (as dkimpy's
``dknewkey`` writes it).  A key is refused when it cannot be read, is too
short (RSA under 1024 bits, RFC 8301), or when its file is readable by
everyone or writable by others: a signing key lets anyone send as the domain.
Key material never appears in an error or a log line.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from gateway import files
from gateway.auth.verify import Lookup, TempLookupError

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
MIN_RSA_BITS = 1024  # RFC 8301: verifiers refuse shorter keys
GOOD_RSA_BITS = 2048


class KeyFileError(ValueError):
    """A key file that cannot be used; the text says why (never what it holds)."""


@dataclass(frozen=True, repr=False)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private: bytes  # what dkimpy signs with: the PEM, or the base64 ed25519 seed
    public: str  # the p= value of the DNS record
    bits: int  # RSA modulus size; 256 for ed25519

    def __repr__(self) -> str:  # the private key never ends up in a log or traceback
        return f"SigningKey({self.selector}._domainkey.{self.domain}, {self.algorithm})"

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        return dns_record(self.algorithm, self.public)


def dns_record(algorithm: str, public: str) -> str:
    return f"v=DKIM1; k={'ed25519' if algorithm == ED25519 else 'rsa'}; p={public}"


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


def parse(data: bytes, algorithm: str) -> tuple[bytes, str, int]:
    """(what dkimpy signs with, the DNS p= value, bits) of a key file's content."""
    if algorithm == ED25519:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError("not an ed25519 key (base64 of a 32-byte seed)") from None
        if len(seed) != 32:
            raise KeyFileError("not an ed25519 key (base64 of a 32-byte seed)")
        public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(seed), base64.b64encode(public).decode(), 256
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError("not an unencrypted RSA private key in PEM") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError("not an RSA private key (for ed25519 set algorithm: ed25519-sha256)")
    if key.key_size < MIN_RSA_BITS:
        raise KeyFileError(f"RSA key of {key.key_size} bits: under {MIN_RSA_BITS} bits it is not "
                        "valid (RFC 8301); generate one of 2048 bits")
    pkcs1 = key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pkcs1, base64.b64encode(public).decode(), key.key_size


def read_secret(path: Path) -> bytes:
    """A file of secret material (a key, SRS secrets); refused unless it is a plain file
    that others can neither read nor write.  Opened without blocking and checked on the
    open file: a FIFO put in its place never holds a reload up."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a file")
        if info.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise KeyFileError(f"{path}: readable by everyone or writable by others "
                               f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod 0600 or 0640")
        try:
            return f.read()
        except OSError as exc:
            raise KeyFileError(f"{path}: {exc.strerror}") from None


def load(path: Path, domain: str, selector: str, algorithm: str) -> SigningKey:
    data = read_secret(path)
    try:
        private, public, bits = parse(data, algorithm)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    return SigningKey(domain.lower(), selector, algorithm, private, public, bits)


def write_private(path: Path, data: bytes) -> None:
    """Create the key file with mode 0600 from the start (never briefly readable)."""
    with os.fdopen(files.create(path, os.O_WRONLY | os.O_EXCL), "wb") as f:
        f.write(data)


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
