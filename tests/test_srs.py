"""SRS: forwarded copies leave with a rewritten sender in the tenant's domain; bounces to
it come back, are checked (hash, age) and go on to the original sender; forged or
expired ones are refused at RCPT. Interoperable with Perl's Mail::SRS."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

import pytest

from gateway.srs import SRS, SRSError, decode
from tests.conftest import (
    ROOT,
    gateway_with_rules,
    metrics_port,
    need_perl_module,
    samples,
    value,
)

pytestmark = pytest.mark.sqlite_only  # SRS rewriting is computed from addresses and secrets

SECRET = b"0123456789abcdef-test-secret"
DAY = 86400.0


def at(day: float, *secrets: bytes) -> SRS:
    return SRS(secrets or (SECRET,), max_age_days=21, clock=lambda: day * DAY)


def test_round_trip_and_forwarder_chain():
    srs = at(20000)
    first = srs.forward("alice@orig.example", "acme.test")
    assert first.startswith("SRS0=") and first.endswith("=orig.example=alice@acme.test")
    assert srs.reverse(first) == "alice@orig.example" == decode(first)
    # an MTA may change case: the hash still matches
    assert srs.reverse(first.upper().replace("@ACME.TEST", "@acme.test")).lower() == \
        "alice@orig.example"
    # forwarded again by another of our domains: SRS1, back to the first forwarder
    second = srs.forward(first, "acme-mail.test")
    assert second.startswith("SRS1=") and "=acme.test==" in second
    assert srs.reverse(second) == first
    third = srs.forward(second, "third.test")  # keeps the first forwarder's host
    assert third.startswith("SRS1=") and "=acme.test==" in third and third.endswith("@third.test")
    assert srs.reverse(third) == first
    # not rewritten: the null sender, and a sender that is our SRS address already
    assert srs.forward("", "acme.test") == ""
    assert srs.forward(first, "acme.test") == first


def test_forged_expired_and_malformed_are_refused():
    srs = at(20000)
    good = srs.forward("alice@orig.example", "acme.test")
    forged = good.replace("=alice@", "=mallory@")
    with pytest.raises(SRSError) as exc:
        srs.reverse(forged)
    assert exc.value.reason == "forged"
    with pytest.raises(SRSError) as exc:
        at(20000, b"another-secret-entirely").reverse(good)
    assert exc.value.reason == "forged"
    assert at(20021).reverse(good) == "alice@orig.example"  # 21 days: still accepted
    with pytest.raises(SRSError) as exc:
        at(20022).reverse(good)
    assert exc.value.reason == "expired" and "22 days" in str(exc.value)
    for bad in ("SRS0=abcd@acme.test", "SRS0==JO=orig.example=alice@acme.test",
                "SRS1=abcd=host@acme.test", "plain@acme.test"):
        with pytest.raises(SRSError) as exc:
            srs.reverse(bad)
        assert exc.value.reason in ("malformed", "forged")


def test_secret_rotation_accepts_the_old_secret():
    old = at(20000, SECRET).forward("alice@orig.example", "acme.test")
    rotated = at(20001, b"the-new-secret-of-the-week", SECRET)
    assert rotated.reverse(old) == "alice@orig.example"
    new = rotated.forward("alice@orig.example", "acme.test")
    assert new != old
    with pytest.raises(SRSError):
        at(20001, SECRET).reverse(new)  # signed with the new secret only


def test_interoperates_with_perl_mail_srs():
    perl = need_perl_module("Mail::SRS", "libmail-srs-perl")
    script = """
        use Mail::SRS;
        my $srs = Mail::SRS->new(Secret => [$ARGV[0]], MaxAge => 21, AlwaysRewrite => 1);
        my ($op, $address, $domain) = @ARGV[1..3];
        print $op eq "forward" ? $srs->forward($address, $domain) : $srs->reverse($address);
    """

    def mail_srs(*args: str) -> str:
        out = subprocess.run([perl, "-e", script, SECRET.decode(), *args], capture_output=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode()

    srs = SRS([SECRET])
    ours = srs.forward("alice@orig.example", "acme.test")
    assert mail_srs("reverse", ours) == "alice@orig.example"
    assert mail_srs("forward", "alice@orig.example", "acme.test") == ours
    theirs = mail_srs("forward", ours, "other.test")
    assert theirs == srs.forward(ours, "other.test") and srs.reverse(theirs) == ours


FORWARD_RULES = """
tenants:
  acme:
    rules:
      - name: forward
        match: {recipient: support@acme.test}
        actions: {bcc: [helpdesk@partner.test]}
"""


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "srs.secret"
    path.write_bytes(b"the-newest-secret-of-all\n" + SECRET + b"\n")
    path.chmod(0o600)
    return path


def test_copies_are_rewritten_and_bounces_return(make_gateway, tmp_path, relay, secret_file):
    gw = gateway_with_rules(make_gateway, tmp_path, relay, FORWARD_RULES, {
        "srs": {"secret_file": str(secret_file)},
        "tenants": {"acme": {"srs_domain": "acme-mail.test"}},
    })
    original = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                b"Subject: question\r\nMessage-ID: <q1@sender.test>\r\n\r\nHello.\r\n")
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], original)
    copy = relay.wait(1)[0]
    assert copy.rcpt_tos == ["helpdesk@partner.test"]
    rewritten = copy.mail_from
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=sender.test=alice@acme-mail.test")
    # the old secret (second line) still verifies, the first line signs
    assert SRS([b"the-newest-secret-of-all"]).reverse(rewritten) == "alice@sender.test"

    bounce = (b"From: MAILER-DAEMON@partner.test\r\nTo: " + rewritten.encode() + b"\r\n"
              b"Subject: Undelivered Mail Returned to Sender\r\n\r\nNo such user.\r\n")
    with gw.smtp() as s:
        assert s.sendmail("<>", [rewritten], bounce) == {}
        # forged: a made-up hash; expired: our own secret, 30 days ago; both refused at RCPT
        forged = rewritten.replace("=alice@", "=mallory@")
        expired = SRS([b"the-newest-secret-of-all"], clock=lambda: time.time() - 30 * DAY
                      ).forward("alice@sender.test", "acme-mail.test")
        s.mail("<>")
        code, text = s.rcpt(forged)
        assert (code, text.decode().split(":")[0]) == (550, f"5.7.1 <{forged}>")
        assert "SRS hash is not ours" in text.decode()
        code, text = s.rcpt(expired)
        assert code == 550 and text.decode().startswith("5.7.1")
        assert "30 days old" in text.decode()
        s.rset()
    returned = relay.wait(2)[1]
    assert returned.mail_from == "<>"  # the null sender, as the sink records it
    assert returned.rcpt_tos == ["alice@sender.test"]
    assert b"No such user." in returned.data
    rows = gw.wait_processed(2)
    assert sorted(r["subject"] for r in rows) == ["Undelivered Mail Returned to Sender",
                                                  "question"]
    _, v = samples(metrics_port(gw))
    for reason in ("srs_forged", "srs_expired"):
        assert value(v, "mailflowr_gateway_smtp_recipients_refused_total", listener="smtp",
                     reason=reason) == 1
    # without SRS configured, such an address is an unknown user like any other
    plain = make_gateway({})
    with plain.smtp() as s, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        s.sendmail("<>", [rewritten], bounce)
    assert refused.value.recipients[rewritten][0] == 550
    assert b"5.1.1" in refused.value.recipients[rewritten][1]


def test_a_secret_file_others_can_read_is_refused(tmp_path, secret_file):
    secret_file.chmod(0o644)
    config = tmp_path / "gateway.yaml"
    config.write_text(f"srs:\n  secret_file: {secret_file}\ntenants:\n  a:\n"
                      f"    domains: [a.test]\n    catch_all: true\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(config)],
                         capture_output=True, cwd=ROOT, timeout=60)
    err = out.stderr.decode()
    assert out.returncode == 2 and "srs" in err
    assert "readable by everyone or writable by others" in err
    assert "Traceback" not in err
