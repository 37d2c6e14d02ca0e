"""SPF and DMARC results from a test zone served on loopback, and what the gateway does
with them: stored, reported in Authentication-Results, matched by rules, and refused at
the end of DATA for a tenant that rejects DMARC p=reject failures."""

from __future__ import annotations

import json
import smtplib

import pytest

from gateway.auth.dmarc import evaluate, organizational_domain
from gateway.auth.dns import Resolver
from gateway.auth.spf import SPFResult, check
from gateway.auth.verify import DKIMResult
from tests.conftest import gateway_with_rules, metrics_port, samples, value
from tests.dns_server import ZoneServer, txt

pytestmark = pytest.mark.sqlite_only  # SPF and DMARC verdicts come from DNS and the message

SPF_ZONE = {
    ("sender.test", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all"),
    ("soft.test", "TXT"): txt("v=spf1 ~all"),
    ("neutral.test", "TXT"): txt("v=spf1 ?all"),
    ("inc.test", "TXT"): ['"v=spf1 include:sender.test a:mail.inc.test mx -all"',
                          '"some-other-verification=abc"'],
    ("mail.inc.test", "A"): ["198.51.100.7"],
    ("inc.test", "MX"): ["10 mx.inc.test."],
    ("mx.inc.test", "A"): ["198.51.100.9"],
    ("redir.test", "TXT"): txt("v=spf1 redirect=sender.test"),
    ("two.test", "TXT"): ['"v=spf1 -all"', '"v=spf1 +all"'],
    ("loop.test", "TXT"): txt("v=spf1 include:loop.test -all"),
    ("macro.test", "TXT"): txt("v=spf1 exists:%{i}._spf.%{d} -all"),
    ("192.0.2.99._spf.macro.test", "A"): ["127.0.0.2"],
    ("v6.test", "TXT"): txt("v=spf1 ip6:2001:db8::/32 -all"),
    ("bad.test", "TXT"): txt("v=spf1 ip4:192.0.2.1 frobnicate:x -all"),
    ("void.test", "TXT"): txt("v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test -all"),
    ("ptr.test", "TXT"): txt("v=spf1 ptr -all"),
    ("5.2.0.192.in-addr.arpa", "PTR"): ["host.ptr.test."],
    ("host.ptr.test", "A"): ["192.0.2.5"],
    ("helo.sender.test", "TXT"): txt("v=spf1 ip4:192.0.2.1 -all"),
    ("flaky.test", "TXT"): txt("v=spf1 include:down.test -all"),
    ("down.test", "TXT"): txt("v=spf1 -all"),
}


@pytest.fixture(scope="module")
def spf_zone():
    zone = ZoneServer(SPF_ZONE, servfail={"down.test", "_dmarc.flaky.test"})
    yield Resolver([("127.0.0.1", zone.port)], timeout=2)
    zone.stop()


@pytest.mark.parametrize("ip,sender,expected", [
    ("192.0.2.10", "alice@sender.test", "pass"),
    ("203.0.113.1", "alice@sender.test", "fail"),
    ("::ffff:192.0.2.10", "alice@sender.test", "pass"),  # IPv4-mapped: checked as IPv4
    ("203.0.113.1", "a@soft.test", "softfail"),
    ("203.0.113.1", "a@neutral.test", "neutral"),
    ("203.0.113.1", "a@nospf.test", "none"),
    ("192.0.2.10", "a@inc.test", "pass"),  # through include:
    ("198.51.100.7", "a@inc.test", "pass"),  # a:
    ("198.51.100.9", "a@inc.test", "pass"),  # mx
    ("198.51.100.8", "a@inc.test", "fail"),
    ("192.0.2.10", "a@redir.test", "pass"),
    ("203.0.113.1", "a@redir.test", "fail"),
    ("192.0.2.10", "a@two.test", "permerror"),  # two SPF records
    ("192.0.2.10", "a@loop.test", "permerror"),  # over 10 lookups
    ("192.0.2.99", "a@macro.test", "pass"),  # %{i} and %{d} expanded
    ("192.0.2.98", "a@macro.test", "fail"),
    ("2001:db8::25", "a@v6.test", "pass"),
    ("2001:db9::25", "a@v6.test", "fail"),
    ("192.0.2.1", "a@bad.test", "permerror"),  # an unknown mechanism, even after a match
    ("192.0.2.1", "a@void.test", "permerror"),  # three lookups that find nothing
    ("192.0.2.5", "a@ptr.test", "pass"),
    ("192.0.2.6", "a@ptr.test", "fail"),
    ("192.0.2.1", "a@flaky.test", "temperror"),  # SERVFAIL in an include
])
def test_spf_results(spf_zone, ip, sender, expected):
    result = check(spf_zone, ip, sender, "client.example")
    assert result.result == expected, result
    assert result.identity == "mailfrom" and result.domain == sender.split("@")[1]


def test_spf_of_the_null_sender_checks_helo(spf_zone):
    assert check(spf_zone, "192.0.2.1", "", "helo.sender.test") == SPFResult(
        "pass", "helo", "helo.sender.test", "helo.sender.test: matched ip4")
    assert check(spf_zone, "192.0.2.2", "", "helo.sender.test").result == "fail"
    assert check(spf_zone, "192.0.2.2", "", "[192.0.2.2]").result == "none"


DMARC_ZONE = {
    ("_dmarc.sender.test", "TXT"): txt("v=DMARC1; p=reject; sp=quarantine"),
    ("_dmarc.strict.test", "TXT"): txt("v=DMARC1; p=quarantine; adkim=s; aspf=s"),
    ("_dmarc.pct.test", "TXT"): txt("v=DMARC1; p=reject; pct=10"),
    ("_dmarc.nop.test", "TXT"): txt("v=DMARC1; rua=mailto:d@nop.test"),
    ("_dmarc.example.co.uk", "TXT"): txt("v=DMARC1; p=reject"),
}


def message(author: str) -> bytes:
    return f"From: {author}\r\nTo: b@acme.test\r\nSubject: s\r\n\r\nbody\r\n".encode()


def dkim(domain: str, result: str = "pass") -> DKIMResult:
    return DKIMResult(result, domain, "s1", "rsa-sha256")


def spf(domain: str, result: str = "pass") -> SPFResult:
    return SPFResult(result, "mailfrom", domain)


@pytest.fixture(scope="module")
def dmarc_zone():
    zone = ZoneServer(DMARC_ZONE, servfail={"_dmarc.flaky.test"})
    yield Resolver([("127.0.0.1", zone.port)], timeout=2)
    zone.stop()


@pytest.mark.parametrize("author,dkim_results,spf_result,expected", [
    # aligned DKIM pass (relaxed: a subdomain of the same organization aligns)
    ("a@sender.test", [dkim("sender.test")], spf("else.test", "fail"), ("pass", "reject", "none")),
    ("a@sender.test", [dkim("mail.sender.test")], None, ("pass", "reject", "none")),
    # aligned SPF pass
    ("a@sender.test", [dkim("else.test")], spf("bounce.sender.test"), ("pass", "reject", "none")),
    # passes that do not align, and an aligned DKIM that fails
    ("a@sender.test", [dkim("else.test"), dkim("sender.test", "fail")], spf("else.test"),
     ("fail", "reject", "reject")),
    # a subdomain without its own record: the organization's sp= applies
    ("a@news.sender.test", [], spf("else.test"), ("fail", "quarantine", "quarantine")),
    # strict alignment: the same domain only
    ("a@strict.test", [dkim("mail.strict.test")], spf("mail.strict.test"),
     ("fail", "quarantine", "quarantine")),
    ("a@strict.test", [dkim("strict.test")], None, ("pass", "quarantine", "none")),
    # pct=10 and a draw of 50: this message is outside the sample, one step weaker
    ("a@pct.test", [], None, ("fail", "reject", "quarantine")),
    # no valid p= but a report address: as p=none
    ("a@nop.test", [], None, ("fail", "none", "none")),
    # the organizational domain from the Public Suffix List
    ("a@mail.example.co.uk", [dkim("example.co.uk")], None, ("pass", "reject", "none")),
    ("a@mail.example.co.uk", [dkim("other.co.uk")], None, ("fail", "reject", "reject")),
    ("a@nodmarc.test", [], None, ("none", "", "none")),
    # nothing aligned passed, and a check could not be done for now: never a fail
    ("a@sender.test", [dkim("sender.test", "temperror")], None, ("temperror", "reject", "none")),
    ("a@flaky.test", [dkim("flaky.test")], None, ("temperror", "", "none")),
])
def test_dmarc_results(dmarc_zone, author, dkim_results, spf_result, expected):
    result = evaluate(dmarc_zone, message(author), dkim_results, spf_result, sample=lambda: 50)
    assert (result.result, result.policy, result.disposition) == expected, result
    assert result.domain == author.split("@")[1]


def test_dmarc_needs_one_from_domain(dmarc_zone):
    two = b"From: a@sender.test\r\nFrom: b@other.test\r\n\r\nx\r\n"
    assert evaluate(dmarc_zone, two, [], None).result == "permerror"
    assert evaluate(dmarc_zone, b"Subject: none\r\n\r\nx\r\n", [], None).result == "permerror"
    mixed = message("a@sender.test, b@other.test")
    assert evaluate(dmarc_zone, mixed, [], None).result == "permerror"


def test_organizational_domain():
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.sender.test") == "sender.test"


def test_the_public_suffix_list_is_read_once_by_many_threads_at_once(monkeypatch):
    """Worker processes check messages in many threads: their first checks, side by
    side, read the list once between them."""
    from concurrent.futures import ThreadPoolExecutor

    import gateway.auth.dmarc as dmarc
    from gateway.workers import once

    reads = []

    class Counted(dmarc.PublicSuffixList):
        def __init__(self) -> None:
            reads.append(1)
            super().__init__()

    monkeypatch.setattr(dmarc, "_suffixes", once(Counted))  # as the module makes it
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(organizational_domain, ["a.b.example.co.uk"] * 16))
    assert found == ["example.co.uk"] * 16
    assert len(reads) == 1


AUTH_RULES = """
tenants:
  globex:
    rules:
      - name: dmarc-failures
        match: {auth: {dmarc: [fail], spf: [fail, softfail]}}
        actions: {cc: [audit@partner.test]}
"""


def test_dmarc_reject_at_end_of_data_and_tagging(make_gateway, tmp_path, relay):
    zone = ZoneServer({
        ("sender.test", "TXT"): txt("v=spf1 ip4:10.9.9.9 -all"),
        ("_dmarc.sender.test", "TXT"): txt("v=DMARC1; p=reject"),
        ("friendly.test", "TXT"): txt("v=spf1 ip4:127.0.0.0/8 -all"),
        ("_dmarc.friendly.test", "TXT"): txt("v=DMARC1; p=reject"),
    })
    gw = gateway_with_rules(make_gateway, tmp_path, relay, AUTH_RULES, {
        "delivery": {"dns_servers": [zone.address], "dns_timeout": "3s"},
        "tenants": {"acme": {"dmarc": "reject"}},
    })
    try:
        forged = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                  b"Subject: forged\r\nMessage-ID: <f@sender.test>\r\n\r\nPay now.\r\n")
        with gw.smtp() as s:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("alice@sender.test", ["support@acme.test"], forged)
            assert refused.value.smtp_code == 550
            assert refused.value.smtp_error.decode().startswith(
                "5.7.1 Message rejected: DMARC policy of sender.test is reject")
            # one tenant refuses, the other tags: stored once, for the tagging tenant
            assert s.sendmail("alice@sender.test", ["support@acme.test", "x@globex.test"],
                              forged.replace(b"forged", b"tagged")) == {}
            genuine = (b"From: Bob <bob@friendly.test>\r\nTo: support@acme.test\r\n"
                       b"Subject: genuine\r\n\r\nHello.\r\n")
            assert s.sendmail("bob@friendly.test", ["support@acme.test"], genuine) == {}

        rows = {r["subject"]: r for r in gw.wait_processed(2)}
        assert set(rows) == {"tagged", "genuine"}
        assert rows["tagged"]["tenant_id"] == "globex"
        stored = rows["tagged"]["auth_results"]
        assert stored["spf"]["result"] == "fail" and stored["spf"]["domain"] == "sender.test"
        assert (stored["dmarc"]["result"], stored["dmarc"]["disposition"]) == ("fail", "reject")
        genuine_results = rows["genuine"]["auth_results"]
        assert (genuine_results["spf"]["result"], genuine_results["dmarc"]["result"]) == (
            "pass", "pass")

        copy = relay.wait(1)[0]  # the rule matched dmarc: fail and spf: fail
        assert copy.rcpt_tos == ["audit@partner.test"]
        header = " ".join(copy.data.split(b"\r\n\r\n")[0].decode().split())
        assert "Authentication-Results: mx.gateway.test; dkim=none; spf=fail" in header
        assert "smtp.mailfrom=sender.test" in header
        assert "dmarc=fail (p=reject dis=reject)" in header and "header.from=sender.test" in header

        shown = json.loads(gw.cli("messages", "show", rows["genuine"]["id"], "--json",
                                  check=True).stdout)
        assert shown["spf"].startswith("pass mailfrom=friendly.test")
        assert shown["dmarc"].startswith("pass from=friendly.test p=reject")

        _, v = samples(metrics_port(gw))
        assert value(v, "mailflowr_gateway_smtp_messages_total", listener="smtp",
                     **{"class": "5xx"}, reason="dmarc") == 1
        assert value(v, "mailflowr_gateway_auth_results_total", method="spf", result="fail") == 1
        assert value(v, "mailflowr_gateway_auth_results_total", method="dmarc",
                     result="pass") == 1
    finally:
        zone.stop()
