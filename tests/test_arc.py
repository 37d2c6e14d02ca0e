"""ARC: the chain of inbound mail is validated, and forwarded copies leave sealed with
the results we found, validated by dkimpy and by Perl's Mail::DKIM."""

from __future__ import annotations

import re
import subprocess

import dkim
import pytest

from gateway import keyfiles
from gateway.auth import keys
from gateway.auth.dns import Resolver
from gateway.auth.inbound import Authenticator
from gateway.auth.signing import Signer
from tests.conftest import (
    ROOT,
    gateway_with_rules,
    need_perl_module,
    settled,
)
from tests.dns_server import ZoneServer, txt
from tests.test_dkim import keygen
from tests.test_srs import FORWARD_RULES

pytestmark = pytest.mark.sqlite_only  # ARC sealing is computed from the message alone

AR = b"Authentication-Results: mx.gateway.test; dkim=pass header.d=sender.test; arc=none\r\n"
MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
           b"Subject: hello\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nThe body.\r\n")


def signing_key(domain: str, selector: str = "s1") -> keyfiles.SigningKey:
    private, public, bits = keyfiles.parse(keys.generate(keyfiles.RSA), keyfiles.RSA)
    return keyfiles.SigningKey(domain, selector, keyfiles.RSA, private, public, bits)


def dns_lookup(records: dict[str, str]):
    """A dkimpy ``dnsfunc`` answering from ``records`` (TXT by name)."""
    table = {f"{name.rstrip('.')}.".encode(): text.encode() for name, text in records.items()}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name if name.endswith(b".") else name + b".")

    return lookup


def arc_result(data: bytes, *published: keyfiles.SigningKey) -> tuple[str, int]:
    lookup = dns_lookup({k.record_name: k.dns_record() for k in published})
    cv, sets, _ = dkim.arc_verify(data, dnsfunc=lookup)
    return cv.decode(), len(sets)


def test_a_seal_validates_and_a_second_forwarder_extends_it():
    first, second = signing_key("acme.test"), signing_key("relay.test")
    sealed = Signer([first], {"acme": ["acme.test"]}).seal(AR + MESSAGE, "acme",
                                                           "mx.gateway.test")
    assert sealed.keys == (first,)
    assert sealed.data.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=acme.test; s=s1;")
    assert arc_result(sealed.data, first) == ("pass", 1)
    aar = re.search(rb"ARC-Authentication-Results: i=1; mx.gateway.test;([^\r\n]*(\r\n [^\r\n]*)*)",
                    sealed.data)
    assert aar is not None and b"dkim=pass header.d=sender.test" in aar.group(0)
    # the next hop saw arc=pass and seals on top: i=2, cv=pass
    hop = b"Authentication-Results: relay.example; arc=pass\r\n" + sealed.data
    again = Signer([second], {"relay": ["relay.test"]}).seal(hop, "relay", "relay.example")
    assert b"ARC-Seal: i=2; cv=pass" in again.data
    assert arc_result(again.data, first, second) == ("pass", 2)
    # a change after the seal breaks the chain
    assert arc_result(sealed.data.replace(b"The body.", b"The b0dy."), first)[0] == "fail"


def test_nothing_to_seal_without_our_results_or_an_rsa_key():
    rsa = signing_key("acme.test")
    assert Signer([rsa], {"acme": ["acme.test"]}).seal(MESSAGE, "acme", "mx.gateway.test") \
        .keys == ()  # no Authentication-Results of ours: no results to record
    unknown = AR.replace(b"arc=none", b"arc=temperror")  # a chain we could not check
    assert Signer([rsa], {"acme": ["acme.test"]}).seal(unknown + MESSAGE, "acme",
                                                       "mx.gateway.test").keys == ()
    ed_private, ed_public, _ = keyfiles.parse(keys.generate(keyfiles.ED25519), keyfiles.ED25519)
    ed = keyfiles.SigningKey("acme.test", "e1", keyfiles.ED25519, ed_private, ed_public, 256)
    assert Signer([ed], {"acme": ["acme.test"]}).seal(AR + MESSAGE, "acme",
                                                      "mx.gateway.test").keys == ()


def test_inbound_chain_results():
    forwarder = signing_key("forwarder.test")
    sealed = Signer([forwarder], {"f": ["forwarder.test"]}).seal(
        b"Authentication-Results: forwarder.test; dkim=pass header.d=sender.test\r\n" + MESSAGE,
        "f", "forwarder.test").data
    zone = ZoneServer({(forwarder.record_name, "TXT"): txt(forwarder.dns_record())},
                      servfail={"s1._domainkey.flaky.test"})
    try:
        check = Authenticator(Resolver([("127.0.0.1", zone.port)], 2), dkim=False, spf=False,
                              dmarc=False)
        assert check.arc_chain(sealed).result == "pass"
        assert check.arc_chain(sealed.replace(b"The body.", b"Changed.")).result == "fail"
        assert check.arc_chain(MESSAGE).result == "none"
        flaky = sealed.replace(b"d=forwarder.test", b"d=flaky.test")
        assert check.arc_chain(flaky).result == "temperror"
    finally:
        zone.stop()


def test_forwarded_copy_is_sealed_and_a_removed_bcc_is_covered(make_gateway, tmp_path, relay):
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    key_file, record = keygen(key_dir, "acme.test", "s1")
    author = signing_key("sender.test", "ext")
    zone = ZoneServer({("s1._domainkey.acme.test", "TXT"): txt(record),
                       (author.record_name, "TXT"): txt(author.dns_record())})
    gw = gateway_with_rules(make_gateway, tmp_path, relay, FORWARD_RULES, {
        "delivery": {"dns_servers": [zone.address], "dns_timeout": "3s"},
        "dkim": {"keys": [{"domain": "acme.test", "selector": "s1", "key_file": str(key_file)}]},
    })
    try:
        body = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                b"Bcc: secret@sender.test\r\nSubject: signed with Bcc\r\n"
                b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n\r\nThe body.\r\n")
        # the author's signature covers the Bcc field, which a copy must not carry
        author_signer = dkim.DKIM(body)
        author_signer.should_not_sign.discard(b"bcc")  # dkimpy advises against it; some do
        original = author_signer.sign(b"ext", b"sender.test", author.private, include_headers=[
            b"from", b"to", b"bcc", b"subject"]) + body
        with gw.smtp() as s:
            s.sendmail("alice@sender.test", ["support@acme.test"], original)
        copy = relay.wait(1)[0].data
        assert b"\r\nBcc:" not in copy.split(b"\r\n\r\n")[0]
        lookup = dns_lookup({author.record_name: author.dns_record(),
                             "s1._domainkey.acme.test": record})
        cv, sets, reason = dkim.arc_verify(copy, dnsfunc=lookup)
        assert (cv, len(sets)) == (b"pass", 1), reason
        assert sets[0]["ams-domain"] == b"acme.test"
        assert b"dkim=pass header.d=sender.test header.s=ext" in b" ".join(
            sets[0]["aar-value"].split())
        # the author's own signature broke (Bcc removed); ours and the seal hold
        checker = dkim.DKIM(copy)
        results = []
        for index in range(2):
            try:
                results.append(bool(checker.verify(idx=index, dnsfunc=lookup)))
            except dkim.DKIMException:
                results.append(False)
        assert results == [True, False]  # ours on top, the author's below

        perl = need_perl_module("Mail::DKIM::ARC::Verifier", "libmail-dkim-perl")
        out = subprocess.run([perl, str(ROOT / "tests/peers/arc_verify.pl"), str(zone.port)],
                             input=copy, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().startswith("pass"), out.stdout.decode()

        settled(gw, "mailflowr_gateway_arc_seals_total", 1, tenant="acme", result="sealed")
    finally:
        zone.stop()
