"""The precheck stage as a table: which tenants refuse a message before the 250, and the
reply when none is left.  DNS is a hand-written fake of the inbound checks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.auth.dmarc import DMARCResult
from gateway.auth.inbound import AuthResults
from gateway.pipeline.precheck import DMARC_REJECTED, Arrival, Precheck, Refusal
from gateway.workflow import loader

WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: no-lottery
        match: {header: {Subject: "*lottery*"}}
        actions: {reject: "550 5.7.1 We do not play"}
  globex:
    rules:
      - name: no-exe
        match: {attachment_name: "*.exe"}
        actions: {reject: "550 5.7.1 No executables"}
      - name: no-prize
        match: {header: {Subject: "*prize*"}}
        actions: {reject: "550 5.7.1 No prizes"}
  initech:
    rules:
      - name: tag-it
        match: {header: {Subject: "*lottery*"}}
        actions: {tag: [vip]}
      - name: no-vip-lottery
        match: {tagged: [vip]}
        actions: {reject: "550 5.7.1 Not even for VIPs"}
"""

FAIL = DMARCResult("fail", domain="sender.test", policy="reject", disposition="reject")


class FakeAuth:
    """The inbound checks, answering from a fixed result or failing."""

    def __init__(self, dmarc: DMARCResult | None = FAIL, error: Exception | None = None):
        self.dmarc, self.error, self.calls = dmarc, error, 0

    async def check(self, raw, *, mail_from, helo, client_ip, dmarc_only=False):
        assert dmarc_only
        self.calls += 1
        if self.error is not None:
            raise self.error
        return AuthResults(dmarc=self.dmarc)


@pytest.fixture
def workflows(tmp_path):
    path = tmp_path / "workflows.yaml"
    path.write_text(WORKFLOWS)
    loaded = loader.load(path, {"acme", "globex", "initech", "hooli"}, set(), {"vip"})
    return lambda: loaded


def arrival(subject: str, *tenants: str) -> Arrival:
    data = f"Subject: {subject}\r\nFrom: a@sender.test\r\n\r\nhello\r\n".encode()
    return Arrival(sender="a@sender.test", data=data, client="192.0.2.1", helo="client.test",
                   groups=tuple((t, (f"x@{t}.test",)) for t in tenants))


@pytest.mark.parametrize(("subject", "tenants", "expected"), [
    ("hello", ("acme", "globex"), None),
    ("lottery", ("acme",), Refusal(frozenset({"acme"}), "550 5.7.1 We do not play", "rule")),
    ("lottery", ("acme", "hooli"),
     Refusal(frozenset({"acme"}), "550 5.7.1 We do not play", "rule")),
    # a rule that needs the body waits for the pipeline; a later header rule does too
    ("prize", ("globex",), None),
    # tags set by earlier rules count, as in the pipeline
    ("lottery", ("initech",),
     Refusal(frozenset({"initech"}), "550 5.7.1 Not even for VIPs", "rule")),
    # every tenant refuses: the last refusing rule's reply
    ("lottery", ("initech", "acme"),
     Refusal(frozenset({"acme", "initech"}), "550 5.7.1 We do not play", "rule")),
])
def test_rules_before_the_body(workflows, subject, tenants, expected):
    precheck = Precheck(workflows)
    assert asyncio.run(precheck.check(arrival(subject, *tenants))) == expected


def test_dmarc_reject_for_the_tenants_that_ask(workflows, caplog):
    caplog.set_level(logging.INFO, "gateway.ingress.smtp")
    auth = FakeAuth()
    precheck = Precheck(workflows, auth=auth, dmarc_rejecting={"hooli", "globex"})  # type: ignore[arg-type]
    reply = DMARC_REJECTED.format(domain="sender.test")
    # nobody asks: no DNS before the reply
    assert asyncio.run(precheck.check(arrival("hello", "acme"))) is None
    assert auth.calls == 0
    assert asyncio.run(precheck.check(arrival("hello", "acme", "hooli"))) == Refusal(
        frozenset({"hooli"}), reply, "dmarc")
    # the rules first; DMARC for what they leave, and its reply when that is nothing
    assert asyncio.run(precheck.check(arrival("lottery", "acme", "hooli"))) == Refusal(
        frozenset({"acme", "hooli"}), reply, "dmarc")
    # a tenant refused by its rules is not checked again
    assert asyncio.run(precheck.check(arrival("lottery", "acme"))).reason == "rule"
    assert auth.calls == 2
    assert [r.getMessage() for r in caplog.records] == [
        "message from 192.0.2.1 fails DMARC of sender.test (p=reject): refused for hooli",
        "message for tenant acme rejected by rule no-lottery",
        "message from 192.0.2.1 fails DMARC of sender.test (p=reject): refused for hooli",
        "message for tenant acme rejected by rule no-lottery",
    ]


@pytest.mark.parametrize("auth", [
    FakeAuth(dmarc=DMARCResult("pass", domain="sender.test", policy="reject")),
    FakeAuth(dmarc=DMARCResult("fail", domain="sender.test", policy="quarantine",
                               disposition="quarantine")),
    FakeAuth(dmarc=None),
    FakeAuth(error=TimeoutError()),
    FakeAuth(error=RuntimeError("a bug in a check")),
])
def test_dmarc_that_does_not_fail_or_errs_never_refuses(workflows, auth):
    precheck = Precheck(workflows, auth=auth, dmarc_rejecting={"hooli"})  # type: ignore[arg-type]
    assert asyncio.run(precheck.check(arrival("hello", "hooli"))) is None
    assert auth.calls == 1


@pytest.mark.parametrize(("tenants", "auth", "dmarc", "expected"), [
    (("hooli",), True, (), False),  # no rules, no dmarc: reject: nothing to decide
    (("globex",), True, (), False),  # its reject rule needs the body: the pipeline's
    (("hooli", "acme"), True, (), True),  # acme's header rule can reject at DATA
    (("initech",), True, (), True),
    (("hooli",), True, ("hooli",), True),  # dmarc: reject with the checks on
    (("hooli",), False, ("hooli",), False),  # ... and without them: nothing to check
])
def test_the_listener_asks_only_when_a_tenant_has_something_to_decide(
        workflows, tenants, auth, dmarc, expected):
    precheck = Precheck(workflows, auth=FakeAuth() if auth else None, dmarc_rejecting=dmarc)
    assert precheck.wanted(tenants) is expected
