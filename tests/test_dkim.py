"""Outbound DKIM: keys made by `dkim keygen`, checked by `check`, and signatures on what
the gateway sends, verified by dkimpy and by Perl's Mail::DKIM against a local DNS zone."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

from gateway import keyfiles
from gateway.auth import keys
from gateway.auth.signing import Signer, author_domains
from gateway.passwords import hash_password
from tests.conftest import (
    ROOT,
    client_context,
    free_port,
    gateway_with_rules,
    metrics_port,
    need_perl_module,
    need_tool,
    samples,
    settled,
    simple_message,
    value,
    wait_for,
)
from tests.dns_server import ZoneServer, txt

pytestmark = pytest.mark.sqlite_only  # signing and key checks do not touch the database

WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copies
        match: {recipient: "support@acme.test"}
        actions: {cc: [manager@partner.test]}
"""


def keygen(directory: Path, domain: str, selector: str, algorithm: str = "rsa",
           extra: tuple[str, ...] = ()) -> tuple[Path, str]:
    """(key file, DNS record) from the real command."""
    out = directory / f"{domain}.{selector}.key"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "dkim", "keygen", "--domain", domain,
         "--selector", selector, "--algorithm", algorithm, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    zone_line = next(line for line in result.stdout.splitlines() if " IN TXT " in line)
    return out, "".join(re.findall(r'"([^"]*)"', zone_line))


def dkimpy_results(data: bytes, zone: ZoneServer) -> list[tuple[str, str, bool]]:
    """(d=, s=, verified) per DKIM-Signature, the keys fetched from the test zone."""

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        answer = dns.query.udp(dns.message.make_query(qname, "TXT"), "127.0.0.1",
                               port=zone.port, timeout=timeout)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None

    checker = dkim.DKIM(data)
    out = []
    for index, sig in enumerate(dkim_fields(data)):
        tags = dict(t.strip().split("=", 1) for t in sig.split(";") if "=" in t)
        try:
            ok = bool(checker.verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # e.g. "body hash mismatch": dkimpy raises some failures
            ok = False
        out.append((tags["d"], tags["s"], ok))
    return out


def dkim_fields(data: bytes) -> list[str]:
    header = data.split(b"\r\n\r\n", 1)[0].decode()
    return [re.sub(r"\s+", "", m) for m in
            re.findall(r"(?ims)^DKIM-Signature:(.*?)(?=^\S)", header + "\r\nX: end")]


def perl_results(data: bytes, zone: ZoneServer) -> list[str]:
    perl = need_perl_module("Mail::DKIM::Verifier", "libmail-dkim-perl")
    result = subprocess.run([perl, str(ROOT / "tests/peers/dkim_verify.pl"), str(zone.port)],
                            input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().splitlines()


@pytest.fixture
def signing_keys(tmp_path):
    directory = tmp_path / "dkim"
    directory.mkdir()
    rsa_file, rsa_record = keygen(directory, "acme.test", "s1")
    ed_file, ed_record = keygen(directory, "acme.test", "e1", "ed25519")
    zone = ZoneServer({("s1._domainkey.acme.test", "TXT"): txt(rsa_record),
                       ("e1._domainkey.acme.test", "TXT"): txt(ed_record)})
    yield {"dir": directory, "rsa": rsa_file, "ed": ed_file, "zone": zone}
    zone.stop()


def _gateway(make_gateway, tmp_path, relay, dkim_keys, dns=None):
    return gateway_with_rules(make_gateway, tmp_path, relay, WORKFLOWS, {
        "delivery": {"timeout": "10s", "dns_servers": [dns.address] if dns else []},
        "dkim": {"keys": dkim_keys},
    })


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    key_file, record = keygen(tmp_path, "acme.test", "s1")
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = keyfiles.load(key_file, "acme.test", "s1", keyfiles.RSA)
    assert key.bits == 2048 and record == f"v=DKIM1; k=rsa; p={key.public}"
    ed_file, ed_record = keygen(tmp_path, "acme.test", "e1", "ed25519")
    ed_key = keyfiles.load(ed_file, "acme.test", "e1", keyfiles.ED25519)
    assert ed_record == f"v=DKIM1; k=ed25519; p={ed_key.public}"
    again = subprocess.run([sys.executable, "-m", "gateway", "dkim", "keygen", "--domain",
                            "acme.test", "--selector", "s1", "--out", str(key_file)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "gateway", "dkim", "keygen", "--domain",
                          "not a domain", "--selector", "s1"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert bad.returncode == 1 and "not a domain" in bad.stderr and "Traceback" not in bad.stderr
    assert "PRIVATE" not in repr(key) and key.private.decode()[40:80] not in repr(key)


def _check(gw: Any, *args: str) -> subprocess.CompletedProcess[bytes]:
    return gw.cli("check", *args)


def test_check_refuses_unsafe_short_or_missing_keys(make_gateway, tmp_path, relay):
    weak = tmp_path / "weak.key"
    openssl = need_tool("openssl", "openssl")
    subprocess.run([openssl, "genrsa", "-out", str(weak), "768"], check=True,
                   capture_output=True)
    weak.chmod(0o600)
    readable, _ = keygen(tmp_path, "acme.test", "open")
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    readable.chmod(0o644)
    gw = _gateway(make_gateway, tmp_path, relay, [])  # a valid config to edit
    gw.close()
    cases = {
        str(weak): "768 bits: under 1024 bits it is not valid (RFC 8301)",
        str(readable): "readable by everyone",
        str(tmp_path / "absent.key"): "No such file or directory",
        str(fifo): "not a file",  # and no wait for a writer
    }
    for path, problem in cases.items():
        config = yaml.safe_load(gw.config_path.read_text())
        config["dkim"] = {"keys": [{"domain": "acme.test", "selector": "s1",
                                    "key_file": path}]}
        gw.config_path.write_text(yaml.safe_dump(config))
        result = _check(gw)
        assert result.returncode == 2, result.stdout
        err = result.stderr.decode()
        assert problem in err and "dkim" in err and "Traceback" not in err, err
        assert re.search(r"gateway\.yaml:\d+", err), err
    # An ed25519 seed named as RSA is refused too.
    ed, _ = keygen(tmp_path, "acme.test", "e9", "ed25519")
    config["dkim"] = {"keys": [{"domain": "acme.test", "selector": "e9", "key_file": str(ed)}]}
    gw.config_path.write_text(yaml.safe_dump(config))
    assert "not an unencrypted RSA private key" in _check(gw).stderr.decode()


def test_check_dns_compares_the_published_key(make_gateway, tmp_path, relay, signing_keys):
    _, other_record = keygen(tmp_path, "acme.test", "x1")
    zone = ZoneServer({("s1._domainkey.acme.test", "TXT"): txt(other_record),
                       ("e1._domainkey.acme.test", "TXT"): ['"v=DKIM1; k=ed25519; p="']})
    try:
        gw = _gateway(make_gateway, tmp_path, relay, [
            {"domain": "acme.test", "selector": "s1", "key_file": str(signing_keys["rsa"])},
            {"domain": "acme.test", "selector": "e1", "algorithm": "ed25519-sha256",
             "key_file": str(signing_keys["ed"])}])
        config = yaml.safe_load(gw.config_path.read_text())
        config["delivery"]["dns_servers"] = [signing_keys["zone"].address]
        gw.config_path.write_text(yaml.safe_dump(config))
        good = _check(gw, "--dns")
        out = good.stdout.decode()
        assert good.returncode == 0, out + good.stderr.decode()
        assert ("dkim s1._domainkey.acme.test (rsa-sha256, 2048 bits): signs; "
                "DNS publishes it") in out
        assert "dkim e1._domainkey.acme.test (ed25519-sha256): signs; DNS publishes it" in out
        config["delivery"]["dns_servers"] = [zone.address]
        gw.config_path.write_text(yaml.safe_dump(config))
        bad = _check(gw, "--dns")
        out = bad.stdout.decode()
        assert bad.returncode == 1
        assert "NOT IN DNS: s1._domainkey.acme.test publishes a different key" in out
        assert "empty p=: the key is revoked" in out
    finally:
        zone.stop()


def test_a_key_signs_only_its_own_tenants_mail():
    made = {}
    for domain, selector in (("acme.test", "a1"), ("acme-mail.test", "m1"),
                             ("acme-mail.test", "m2"), ("globex.test", "g1"),
                             ("mail.acme.test", "n1"), ("gateway.test", "o1")):
        private, public, bits = keyfiles.parse(keys.generate(keyfiles.RSA), keyfiles.RSA)
        made[selector] = keyfiles.SigningKey(domain, selector, keyfiles.RSA, private, public, bits)
    signer = Signer(made.values(), {"acme": ["acme.test", "acme-mail.test"],
                                    "globex": ["globex.test"], "initech": ["mail.acme.test"],
                                    "hooli": ["hooli.test"]})
    cases = [  # (From domains, tenant, from outside?) -> selectors that sign
        (["acme-mail.test"], "acme", False, ["m2"]),  # the author's domain: aligned
        (["sender.test"], "acme", False, ["a1"]),  # else the tenant's first domain
        ([], "acme", False, ["a1"]),
        (["globex.test"], "acme", False, ["a1"]),  # never another tenant's key
        (["acme.test"], "globex", False, ["g1"]),
        (["mail.acme.test"], "acme", False, ["a1"]),  # the most specific owner: initech
        (["mail.acme.test"], "initech", False, ["n1"]),
        (["gateway.test"], "acme", False, ["o1"]),  # the operator's own mail (DSNs)
        (["globex.test"], "initech", False, ["n1"]),
        (["sender.test"], "acme", True, ["a1"]),  # a forwarder's signature beside the author's
        (["globex.test"], "acme", True, ["a1"]),
        (["acme.test"], "acme", True, ["m2"]),  # never in the (unauthenticated) author's domain
        (["sub.acme.test"], "acme", True, ["m2"]),
        (["evil.test", "acme.test"], "acme", True, ["m2"]),  # whichever From field
        (["acme.test", "acme-mail.test"], "acme", True, []),
        (None, "acme", True, []),  # a From that cannot be read: no signature
        (["gateway.test"], "acme", True, ["a1"]),  # the operator's key: never for such mail
        (["globex.test"], "globex", True, []),
    ]
    for domains, tenant, inbound, selectors in cases:
        got = [k.selector for k in signer.keys_for(domains, tenant, inbound=inbound)]
        assert got == selectors, (domains, tenant, inbound)
    assert author_domains(b"From: \"Doe, J\" <j@Acme-Mail.Test>\r\nTo: x@y\r\n\r\nbody") == \
        ["acme-mail.test"]
    assert author_domains(b"From: a@b.test, c@D.test\r\nFrom: e@f.test\r\n\r\n") == \
        ["b.test", "d.test", "f.test"]
    assert author_domains(b"To: x@y\r\n\r\nFrom: a@b.test\r\n") == []
    for unreadable in (b"From: not an address", b"From: <", b"From: " + b"(" * 3000 + b"a@b.test"):
        assert author_domains(unreadable + b"\r\n\r\nbody") is None, unreadable
    unsigned = signer.sign(b"From: a@sender.test\r\n\r\nhi\r\n", "hooli")
    assert unsigned.keys == () and unsigned.data == b"From: a@sender.test\r\n\r\nhi\r\n"


def test_no_tenant_signs_in_another_tenants_domain(make_gateway, tmp_path, relay,
                                                    signing_keys, tls_files):
    """Two tenants with keys; a user of one and outside senders put the other's
    address in From: what arrives downstream never carries the other's signature."""
    globex_file, globex_record = keygen(signing_keys["dir"], "globex.test", "g1")
    zone = ZoneServer({**signing_keys["zone"].zone,
                       ("g1._domainkey.globex.test", "TXT"): txt(globex_record)})
    ca, chain, key = tls_files
    password = "correct horse battery"
    try:
        gw = _gateway(make_gateway, tmp_path, relay, [
            {"domain": "acme.test", "selector": "s1", "key_file": str(signing_keys["rsa"])},
            {"domain": "globex.test", "selector": "g1", "key_file": str(globex_file)}])
        gw.close()
        config = yaml.safe_load(gw.config_path.read_text())
        config["smtp"]["tls"] = {"cert_file": str(chain), "key_file": str(key)}
        config["submission"] = {"listen": f"127.0.0.1:{free_port()}"}
        config["tenants"]["acme"]["users"] = {"agent@acme.test": {
            "password_hash": hash_password(password), "send_as": ["support@acme.test"]}}
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.start()
        port = int(config["submission"]["listen"].rsplit(":", 1)[1])
        gw.wait_listening(port=port)

        def message(author: str, to: str, subject: str) -> bytes:
            return simple_message(subject=subject, to=to).replace(
                b"From: Alice <alice@sender.test>", f"From: {author}".encode())

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.starttls(context=client_context(ca))
            s.login("agent@acme.test", password)
            s.mail("support@acme.test")
            s.rcpt("customer@client.test")
            code, text = s.data(message("CEO <ceo@globex.test>", "customer@client.test",
                                        "impersonation"))
            assert (code, text[:5]) == (553, b"5.7.1")
            s.sendmail("support@acme.test", ["customer@client.test"],
                       message("Support <support@acme.test>", "customer@client.test", "reply"))
        with gw.smtp() as s:  # from outside, to acme, with a Cc rule for support@
            for author, subject in (("CEO <ceo@globex.test>", "outside as globex"),
                                    ("Boss <boss@acme.test>", "outside as acme")):
                s.sendmail("someone@outside.test", ["support@acme.test"],
                           message(author, "support@acme.test", subject))
        got = {re.search(rb"Subject: (.*)\r\n", m.data).group(1).decode(): m.data
               for m in relay.wait(3)}
        assert set(got) == {"reply", "outside as globex", "outside as acme"}
        for data in got.values():
            assert b"d=globex.test" not in b"".join(data.split())
        assert dkimpy_results(got["reply"], zone) == [("acme.test", "s1", True)]
        # A copy of inbound mail: acme signs as the forwarder, never as the author.
        assert dkimpy_results(got["outside as globex"], zone) == [("acme.test", "s1", True)]
        assert dkim_fields(got["outside as acme"]) == []
        assert b"ARC-Seal:" in got["outside as acme"]  # the forwarder's own mark stays
        settled(gw, "mailflowr_gateway_dkim_signatures_total", 1, tenant="acme",
                algorithm="none", result="author_domain")
        assert "impersonation" not in str([r["subject"] for r in gw.messages()])
    finally:
        zone.stop()


def test_copies_are_signed_and_verify_with_two_implementations(
        make_gateway, tmp_path, relay, signing_keys):
    zone = signing_keys["zone"]
    gw = _gateway(make_gateway, tmp_path, relay, [
        {"domain": "acme.test", "selector": "s1", "key_file": str(signing_keys["rsa"])},
        {"domain": "acme.test", "selector": "e1", "algorithm": "ed25519-sha256",
         "key_file": str(signing_keys["ed"])}])
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"],
                   simple_message(body="Line one.\r\n" * 50))
    data = relay.wait(1)[0].data
    fields = dkim_fields(data)
    assert len(fields) == 2
    for field in fields:
        tags = dict(t.split("=", 1) for t in field.split(";") if "=" in t)
        assert tags["d"] == "acme.test" and tags["c"] == "relaxed/relaxed"
        assert "l" not in tags  # never a length limit
        signed = tags["h"].lower().split(":")
        assert signed.count("from") == 2  # From oversigned
        assert {"to", "cc", "subject", "date", "message-id", "reply-to",
                "mime-version", "content-type"} <= set(signed)
    assert {(d, s) for d, s, ok in dkimpy_results(data, zone) if ok} == \
        {("acme.test", "s1"), ("acme.test", "e1")}
    assert "acme.test s1 rsa-sha256 pass" in perl_results(data, zone)

    tampered = data.replace(b"Line one.", b"Line 0ne.", 1)
    assert not any(ok for *_, ok in dkimpy_results(tampered, zone))
    assert "acme.test s1 rsa-sha256 fail (body has been altered)" in perl_results(tampered, zone)

    settled(gw, "mailflowr_gateway_dkim_signatures_total", 1, tenant="acme",
            algorithm="ed25519-sha256", result="signed")
    v = settled(gw, "mailflowr_gateway_dkim_signatures_total", 1, tenant="acme",
                algorithm="rsa-sha256", result="signed")
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        assert value(v, "mailflowr_gateway_dkim_signing_keys", domain="acme.test",
                     algorithm=algorithm, selector="s1" if algorithm == "rsa-sha256"
                     else "e1") == 1
    log = gw.log()
    private = signing_keys["rsa"].read_text().splitlines()[3]
    assert private not in log and signing_keys["ed"].read_text().strip() not in log


def test_rotation_on_sighup_and_unsigned_mail_is_counted(make_gateway, tmp_path, relay,
                                                          signing_keys):
    gw = _gateway(make_gateway, tmp_path, relay, [])
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], simple_message())
    assert dkim_fields(relay.wait(1)[0].data) == []
    settled(gw, "mailflowr_gateway_dkim_signatures_total", 1, tenant="acme",
            algorithm="none", result="no_key")

    new_file, new_record = keygen(signing_keys["dir"], "acme.test", "s2")
    config = yaml.safe_load(gw.config_path.read_text())
    config["dkim"] = {"keys": [
        {"domain": "acme.test", "selector": "s1", "key_file": str(signing_keys["rsa"])},
        {"domain": "acme.test", "selector": "s2", "key_file": str(new_file)}]}
    gw.config_path.write_text(yaml.safe_dump(config))
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "DKIM signing keys now: s2._domainkey.acme.test" in gw.log(),
             what="the key reload")
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], simple_message())
    data = relay.wait(2)[1].data
    [field] = dkim_fields(data)
    assert "s=s2;" in field
    zone = ZoneServer({("s2._domainkey.acme.test", "TXT"): txt(new_record)})
    try:
        assert dkimpy_results(data, zone) == [("acme.test", "s2", True)]
    finally:
        zone.stop()

    new_file.chmod(0o644)  # a broken key on the next reload: refused, s2 keeps signing
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "DKIM key reload refused" in gw.log(), what="the refusal")
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], simple_message())
    assert "s=s2;" in dkim_fields(relay.wait(3)[2].data)[0]
    v = settled(gw, "mailflowr_gateway_dkim_signatures_total", 2, tenant="acme",
                algorithm="rsa-sha256", result="signed")
    assert value(v, "mailflowr_gateway_dkim_key_reloads_total", result="failure") == 1


@pytest.mark.parametrize("signed_cc", [True, False])
def test_a_forwarded_copy_keeps_the_authors_signature(make_gateway, tmp_path, relay,
                                                      signing_keys, signed_cc):
    private, public, _ = keyfiles.parse(keys.generate(keyfiles.RSA), keyfiles.RSA)
    original = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                b"Cc: someone@sender.test\r\nSubject: signed by the author\r\n"
                b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a1@sender.test>\r\n"
                b"\r\nThe body, exactly.\r\n")
    covered = [b"from", b"to", b"subject", b"date", b"message-id"] + \
        ([b"cc"] if signed_cc else [])
    original = dkim.sign(original, b"ext", b"sender.test", private,
                         canonicalize=(b"simple", b"simple"), include_headers=covered) + original
    zone = ZoneServer({
        ("ext._domainkey.sender.test", "TXT"): txt(keyfiles.dns_record(keyfiles.RSA, public)),
        **signing_keys["zone"].zone})
    try:
        gw = _gateway(make_gateway, tmp_path, relay, [
            {"domain": "acme.test", "selector": "s1", "key_file": str(signing_keys["rsa"])}],
            dns=zone)
        with gw.smtp() as s:
            s.sendmail("alice@sender.test", ["support@acme.test"], original)
        data = relay.wait(1)[0].data
        assert dkimpy_results(data, zone) == [("acme.test", "s1", True),
                                              ("sender.test", "ext", True)]
        assert b"dkim=pass header.d=sender.test header.s=ext" in b" ".join(data.split())
        perl = perl_results(data, zone)
        assert "sender.test ext rsa-sha256 pass" in perl and "acme.test s1 rsa-sha256 pass" in perl
        header = data.split(b"\r\n\r\n")[0]
        cc = [ln for ln in header.split(b"\r\n") if ln.lower().startswith(b"cc:")]
        if signed_cc:  # the author's signature covers Cc: it stays as the author wrote it
            assert cc == [b"Cc: someone@sender.test"]
        else:
            assert b"manager@partner.test" in header
        assert data.endswith(b"\r\n\r\nThe body, exactly.\r\n")
    finally:
        zone.stop()


def test_a_returned_bounce_is_signed_as_a_forwarder_never_as_its_author(
        make_gateway, tmp_path, relay, signing_keys):
    """A bounce to one of our SRS addresses goes back to the original sender: whoever
    wrote it, it never leaves with a signature in the domain its From names."""
    secret = tmp_path / "srs.secret"
    secret.write_bytes(b"a-secret-for-the-test\n")
    secret.chmod(0o600)
    gw = gateway_with_rules(make_gateway, tmp_path, relay, WORKFLOWS, {
        "dkim": {"keys": [{"domain": "acme.test", "selector": "s1",
                           "key_file": str(signing_keys["rsa"])}]},
        "srs": {"secret_file": str(secret)}})
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], simple_message())
    srs_address = relay.wait(1)[0].mail_from
    assert srs_address.startswith("SRS0=")
    with gw.smtp() as s:
        for author, subject in (("MAILER-DAEMON@partner.test", "a real bounce"),
                                ("CEO <ceo@acme.test>", "a forged one")):
            s.sendmail("<>", [srs_address], simple_message(subject=subject, to=srs_address)
                       .replace(b"From: Alice <alice@sender.test>", f"From: {author}".encode()))
    returned = {re.search(rb"Subject: (.*)\r\n", m.data).group(1).decode(): m
                for m in relay.wait(3)[1:]}
    assert {m.rcpt_tos[0] for m in returned.values()} == {"alice@sender.test"}
    assert dkimpy_results(returned["a real bounce"].data, signing_keys["zone"]) == [
        ("acme.test", "s1", True)]
    assert dkim_fields(returned["a forged one"].data) == []
    settled(gw, "mailflowr_gateway_dkim_signatures_total", 1, tenant="acme",
            algorithm="none", result="author_domain")


INBOUND_RULES = """
tenants:
  acme:
    rules:
      - name: trusted
        match: {recipient: "support@acme.test", auth: {dkim: [pass]}}
        actions: {cc: [trusted@partner.test]}
      - name: suspect
        match: {recipient: "support@acme.test", auth: {dkim: [fail, permerror, temperror]}}
        actions: {cc: [suspect@partner.test]}
"""


def test_inbound_signatures_are_verified_recorded_and_reported(make_gateway, tmp_path, relay,
                                                                signing_keys):
    import json

    private, public, _ = keyfiles.parse(keys.generate(keyfiles.RSA), keyfiles.RSA)
    zone = ZoneServer({("ext._domainkey.sender.test", "TXT"):
                       txt(keyfiles.dns_record(keyfiles.RSA, public))})
    gw = gateway_with_rules(make_gateway, tmp_path, relay, INBOUND_RULES, {
        "delivery": {"timeout": "10s", "dns_servers": [zone.address], "dns_timeout": "3s"},
    })
    try:
        def message(subject: bytes, tamper: bool = False) -> bytes:
            body = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                    b"Subject: " + subject + b"\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
                    b"Message-ID: <" + subject + b"@sender.test>\r\n\r\nSigned text.\r\n")
            signed = dkim.sign(body, b"ext", b"sender.test", private,
                               include_headers=[b"from", b"to", b"subject"]) + body
            forged = (b"Authentication-Results: mx.gateway.test; dkim=pass header.d=bank.test\r\n"
                      b"Authentication-Results: other.example; spf=pass\r\n")
            out = forged + signed
            return out.replace(b"Signed text.", b"Altered text.") if tamper else out

        good, bad = message(b"good"), message(b"bad", tamper=True)
        with gw.smtp() as s:
            s.sendmail("alice@sender.test", ["support@acme.test"], good)
            s.sendmail("alice@sender.test", ["support@acme.test"], bad)
        copies = {m.rcpt_tos[0]: m.data for m in relay.wait(2)}
        assert set(copies) == {"trusted@partner.test", "suspect@partner.test"}
        trusted = copies["trusted@partner.test"].split(b"\r\n\r\n")[0].decode()
        results = re.findall(r"(?m)^Authentication-Results: ([^\r\n]*(?:\r\n\t[^\r\n]*)*)",
                             trusted)
        assert len(results) == 2  # ours, and the other server's; the forged one is gone
        ours = " ".join(results[0].split())
        assert ours.startswith("mx.gateway.test; dkim=pass header.d=sender.test header.s=ext "
                               "header.a=rsa-sha256 header.b=")
        assert "bank.test" not in trusted and "other.example; spf=pass" in results[1]
        suspect = copies["suspect@partner.test"].decode()
        assert "dkim=fail reason=\"body hash mismatch\" header.d=sender.test" in \
            " ".join(suspect.split())

        rows = {r["subject"]: r for r in gw.wait_processed(2)}
        assert gw.store.raw(rows["good"]["id"]) == good  # the original is stored untouched
        shown = json.loads(gw.cli("messages", "show", rows["bad"]["id"], "--json",
                                  check=True).stdout)
        assert shown["dkim"] == ["fail d=sender.test s=ext (body hash mismatch)"]
        _, v = samples(metrics_port(gw))
        for result in ("pass", "fail"):
            assert value(v, "mailflowr_gateway_auth_results_total", method="dkim",
                         result=result) == 1
    finally:
        zone.stop()
