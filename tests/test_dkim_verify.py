"""Inbound DKIM results, exact per signature: each case dkimpy alone answers False for."""

from __future__ import annotations

import base64
import subprocess

import dkim
import pytest

from gateway import keyfiles
from gateway.auth import keys
from gateway.auth.signing import Signer
from gateway.auth.verify import DKIMResult, TempLookupError, dns_lookup, verify
from tests.conftest import free_port, need_tool
from tests.dns_server import ZoneServer, txt

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
           b"Subject: hello\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <m1@sender.test>\r\n\r\nThe body.\r\nSecond line.\r\n")


def make_key(algorithm: str = keyfiles.RSA, selector: str = "s1") -> keyfiles.SigningKey:
    private, public, bits = keyfiles.parse(keys.generate(algorithm), algorithm)
    return keyfiles.SigningKey("sender.test", selector, algorithm, private, public, bits)


def records(*made: keyfiles.SigningKey) -> dict[str, bytes]:
    return {f"{k.record_name}.": k.dns_record().encode() for k in made}


def results(data: bytes, published: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(r.result, r.selector) for r in verify(data, published.get)]


def signed(data: bytes, *made: keyfiles.SigningKey) -> bytes:
    return Signer(made, {"t": ["sender.test"]}).sign(data, "t").data


def test_rsa_and_ed25519_pass_and_tampering_fails():
    rsa, ed = make_key(), make_key(keyfiles.ED25519, "e1")
    data = signed(MESSAGE, rsa, ed)
    assert results(data, records(rsa, ed)) == [("pass", "s1"), ("pass", "e1")]
    first = verify(data, records(rsa, ed).get)[0]
    assert first == DKIMResult("pass", "sender.test", "s1", "rsa-sha256", "", first.header_b)
    assert len(first.header_b) == 8
    body = data.replace(b"Second line.", b"Second 1ine.")
    assert [(r.result, r.reason) for r in verify(body, records(rsa, ed).get)] == \
        [("fail", "body hash mismatch")] * 2
    header = data.replace(b"Subject: hello", b"Subject: hellO")
    assert [r.result for r in verify(header, records(rsa, ed).get)] == ["fail", "fail"]


def test_no_signature_is_none():
    assert [r.result for r in verify(MESSAGE, {}.get)] == ["none"]


def test_missing_revoked_and_unreachable_keys():
    rsa = make_key()
    data = signed(MESSAGE, rsa)
    missing = verify(data, {}.get)[0]
    assert (missing.result, missing.reason) == \
        ("permerror", "no key published at s1._domainkey.sender.test")
    revoked = {"s1._domainkey.sender.test.": b"v=DKIM1; k=rsa; p="}
    assert verify(data, revoked.get)[0].reason == "the key is revoked (empty p=)"

    def timeout(name: str) -> bytes | None:
        raise TempLookupError("Timeout")

    assert verify(data, timeout)[0].result == "temperror"


def test_body_length_limit_is_not_a_full_pass():
    rsa = make_key()
    whole = dkim.sign(MESSAGE, b"s1", b"sender.test", rsa.private, length=True) + MESSAGE
    assert results(whole, records(rsa)) == [("pass", "s1")]  # l= covers the whole body
    appended = whole + b"Added by someone else.\r\n"
    [result] = verify(appended, records(rsa).get)
    assert result.result == "neutral" and "only part of the body" in result.reason


def test_rsa_sha1_and_weak_keys_are_not_valid():
    rsa = make_key()
    sha1 = dkim.sign(MESSAGE, b"s1", b"sender.test", rsa.private,
                     signature_algorithm=b"rsa-sha1") + MESSAGE
    [result] = verify(sha1, records(rsa).get)
    assert (result.result, result.reason) == ("permerror", "rsa-sha1 is not valid (RFC 8301)")

    openssl = need_tool("openssl", "openssl")
    weak = subprocess.run([openssl, "genrsa", "768"], capture_output=True, check=True).stdout
    public = subprocess.run([openssl, "rsa", "-pubout", "-outform", "DER"], input=weak,
                            capture_output=True, check=True).stdout
    data = dkim.sign(MESSAGE, b"w1", b"sender.test", weak) + MESSAGE
    record = {"w1._domainkey.sender.test.":
              b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)}
    [result] = verify(data, record.get)
    assert result.result == "permerror" and "768 bits" in result.reason


def test_dns_lookup_tells_timeouts_from_missing_records():
    rsa = make_key()
    data = signed(MESSAGE, rsa)
    zone = ZoneServer({("s1._domainkey.sender.test", "TXT"): txt(rsa.dns_record())},
                      servfail={"s2._domainkey.sender.test"})
    try:
        lookup = dns_lookup([("127.0.0.1", zone.port)], timeout=2)
        assert verify(data, lookup)[0].result == "pass"
        other = signed(MESSAGE, make_key(selector="s2"))
        assert verify(other, lookup)[0].result == "temperror"  # SERVFAIL
        gone = signed(MESSAGE, make_key(selector="s3"))
        assert verify(gone, lookup)[0].result == "permerror"  # NXDOMAIN
        silent = dns_lookup([("127.0.0.1", free_port())], timeout=0.5)
        assert verify(data, silent)[0].result == "temperror"  # nobody answers
    finally:
        zone.stop()


@pytest.mark.parametrize("garbage", [b"v=1; a=rsa-sha256; d=sender.test",
                                     b"not a tag list at all ;;; ="])
def test_malformed_signatures_are_permerror(garbage):
    data = b"DKIM-Signature: " + garbage + b"\r\n" + MESSAGE
    assert verify(data, {}.get)[0].result == "permerror"
