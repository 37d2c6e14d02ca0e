"""Subprocessor routing: decisions, the policy file's errors, and deliveries through real relays."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from gateway.policy.subprocessors import (
    Consent,
    Relay,
    RoutingRule,
    Subprocessor,
    SubprocessorPolicy,
    TenantTerms,
)
from gateway.policyset import PolicyError, load
from tests.conftest import simple_message, wait_for
from tests.sink import Sink

CONSENT_REFRESH = 0.5  # delivery.consent_refresh of the daemons below (default 5s)

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def _sp(name, region):
    return Subprocessor(name, "outbound-relay", "E", "NL" if region == "EU" else "US", region,
                        ("email-content",), date(2026, 1, 1), Relay("127.0.0.1", 25))


POLICY = SubprocessorPolicy(
    registry={n: _sp(n, r) for n, r in
              [("eu-1", "EU"), ("eu-2", "EU"), ("us-1", "US"), ("eu-new", "EU")]},
    tenants={
        "acme": TenantTerms("p@acme.test", frozenset({"eu-1", "eu-2", "us-1", "eu-new"})),
        "globex": TenantTerms("p@globex.test", None, regions=frozenset({"EU"})),
        "initech": TenantTerms("p@initech.test", frozenset({"us-1"})),
    },
    routing=(
        RoutingRule("sensitive-eu", ("eu-1", "eu-2"), tagged=frozenset({"sensitive"}),
                    regions=frozenset({"EU"})),
        RoutingRule("new-first", ("eu-new", "eu-1"), tenants=frozenset({"globex"})),
        RoutingRule("default", ("us-1", "eu-1", "eu-2")),
    ),
)
BASELINE = frozenset({"eu-1", "eu-2", "us-1"})


@pytest.mark.parametrize(
    ("tenant", "tags", "consent", "relays", "held"),
    [
        ("acme", [], Consent(BASELINE), ["us-1", "eu-1", "eu-2"], None),
        ("acme", ["sensitive"], Consent(BASELINE), ["eu-1", "eu-2"], None),
        # the tenant's region restriction removes us-1
        ("globex", [], Consent(BASELINE | {"eu-new"}), ["eu-new", "eu-1"], None),
        # a new subprocessor: not before the tenant's objection window has passed
        ("globex", [], Consent(BASELINE), ["eu-1"], None),
        ("globex", [], Consent(BASELINE, {("globex", "eu-new"): NOW + timedelta(days=2)}),
         ["eu-1"], None),
        ("globex", [], Consent(BASELINE, {("globex", "eu-new"): NOW - timedelta(days=1)}),
         ["eu-new", "eu-1"], None),
        # objections recorded by the command line
        ("acme", [], Consent(BASELINE, objections=frozenset({("acme", "us-1")})),
         ["eu-1", "eu-2"], None),
        # initech authorised only us-1: sensitive mail has nowhere to go
        ("initech", ["sensitive"], Consent(BASELINE), [],
         "no authorised subprocessor (rule sensitive-eu): eu-1 is not authorised by tenant "
         "initech; eu-2 is not authorised by tenant initech"),
        ("initech", [], Consent(BASELINE, objections=frozenset({("initech", "us-1")})), [],
         "tenant initech objected to us-1"),
    ],
)
def test_routing_table(tenant, tags, consent, relays, held):
    route = POLICY.route(tenant, tags, "bcc", "x@else.example", consent, NOW)
    assert [r.name for r in route.relays] == relays
    if held is None:
        assert route.held == ""
    else:
        assert held in route.held


# ------------------------------------------------------------------ the file
TENANTS = {"acme", "globex"}
REGISTRY = """
subprocessors:
  eu-1:
    purpose: outbound-relay
    entity: "EU One B.V."
    country: NL
    region: EU
    data_categories: [email-content]
    added: 2026-01-15
    smtp: {host: 127.0.0.1, port: 2600}
  scan:
    purpose: scanning
    entity: "Scan Ltd"
    country: IE
    region: EU
    added: 2026-01-15
"""
TERMS = """
tenants:
  acme: {privacy_contact: p@acme.test, authorised: [eu-1]}
  globex: {privacy_contact: p@globex.test, authorised: all}
notice: {from: privacy@gw.test}
"""
ROUTING = "routing:\n  - {name: all, via: [eu-1]}\n"


def _problems(tmp_path, text):
    (tmp_path / "subprocessors.yaml").write_text(text)
    (tmp_path / "retention.yaml").write_text("default: 1y\ntags: {sensitive: 90d}\n")
    with pytest.raises(PolicyError) as info:
        load(tmp_path, TENANTS, set())
    return [p.replace(f"{tmp_path}/", "") for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (REGISTRY + TERMS + "routing:\n  - {name: all, via: [eu-9]}\n",
         "subprocessors.yaml:23:23: unknown subprocessor 'eu-9' (known: eu-1, scan)"),
        (REGISTRY + TERMS + "routing:\n  - {name: all, via: [scan]}\n",
         "subprocessors.yaml:23:17: scan is not an outbound relay"),
        (REGISTRY + TERMS + ROUTING + "  - {name: late, match: {kind: cc}, via: [eu-1]}\n",
         "subprocessors.yaml:24:5: routing rule 'late' can never match: rule 'all' (line 23)"),
        (REGISTRY + TERMS + "routing:\n  - {name: t, match: {tenant: nobody}, via: [eu-1]}\n",
         "subprocessors.yaml:23:23: unknown tenant 'nobody': this rule can never match it"),
        (REGISTRY + TERMS + "routing:\n  - {name: t, match: {tagged: [vip]}, via: [eu-1]}\n",
         "subprocessors.yaml:23:23: unknown tag 'vip'"),
        (REGISTRY + TERMS.replace("authorised: [eu-1]", "authorised: [scan]") + ROUTING,
         "subprocessors.yaml:19:3: tenant 'acme' has no authorised outbound relay"),
        (REGISTRY + TERMS.replace("authorised: [eu-1]", "authorised: [eu-2]") + ROUTING,
         "subprocessors.yaml:19:53: unknown subprocessor 'eu-2'"),
        (REGISTRY.replace("added: 2026-01-15\n    smtp", "added: soon\n    smtp") + TERMS
         + ROUTING, "subprocessors.yaml:9:5: added takes the date it was added"),
        (REGISTRY.replace("    smtp: {host: 127.0.0.1, port: 2600}\n", "") + TERMS + ROUTING,
         "subprocessors.yaml:3:3: outbound relay eu-1 needs smtp"),
        (REGISTRY + TERMS.replace("{from: privacy@gw.test}", "{from: x@y.test, window_days: 2}")
         + ROUTING, "subprocessors.yaml:21:26: window_days is a whole number of days, at least 5"),
        (REGISTRY + TERMS + ROUTING + "colour: blue\n",
         "subprocessors.yaml:24:1: unknown key 'colour'"),
        (REGISTRY + TERMS.replace("notice: {from: privacy@gw.test}",
                                  "notice: {from: privacy@gw.test, template: 'Hi {nme}'}")
         + ROUTING, "subprocessors.yaml:21:33: template: 'nme'"),
    ],
)
def test_policy_file_errors(tmp_path, text, expected):
    problems = _problems(tmp_path, text)
    assert any(p.startswith(expected) for p in problems), problems
    assert all(re.match(r"\w+\.yaml:\d+:\d+: ", p) for p in problems), problems


# ------------------------------------------------------------------ end to end
def _policy_text(eu, eu2, us, extra=""):
    return f"""
subprocessors:
  relay-eu:
    purpose: outbound-relay
    entity: "Relay EU B.V."
    country: NL
    region: EU
    added: 2026-01-15
    smtp: {{host: 127.0.0.1, port: {eu.port}, tls: none}}
  relay-eu-2:
    purpose: outbound-relay
    entity: "Relay EU 2 GmbH"
    country: DE
    region: EU
    added: 2026-01-15
    smtp: {{host: 127.0.0.1, port: {eu2.port}, tls: none}}
  relay-us:
    purpose: outbound-relay
    entity: "Relay US Inc."
    country: US
    region: US
    added: 2026-01-15
    smtp: {{host: 127.0.0.1, port: {us.port}, tls: none}}
{extra}
tenants:
  acme:
    privacy_contact: privacy@acme.test
    authorised: all
    regions: [EU]
  globex:
    privacy_contact: privacy@globex.test
    authorised: [relay-us, relay-eu]
routing:
  - name: us-first
    via: [relay-us, relay-eu, relay-eu-2]
notice:
  from: privacy@gateway.test
  subject: "Subprocessor change"
  template: >-
    {{change}} {{subprocessor}} ({{entity}}, {{region}}); object until
    {{objection_deadline}}
"""


WORKFLOWS = """
tenants:
  acme:
    rules:
      - {name: archive, match: {direction: inbound}, actions: {bcc: [archive@vault.test]}}
  globex:
    rules:
      - {name: archive, match: {direction: inbound}, actions: {bcc: [archive@vault.test]}}
"""


@pytest.fixture
def relays():
    made = [Sink(), Sink(), Sink()]
    yield made
    for s in made:
        s.stop()


def _gateway(make_gateway, tmp_path, relays, **extra):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "subprocessors.yaml").write_text(_policy_text(*relays))
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    return policies, make_gateway({
        "policies": {"directory": str(policies), "watch_interval": 0},
        "delivery": {"poll_interval": "0.2s", "retry_base": "1s", "timeout": "10s",
                     "consent_refresh": f"{CONSENT_REFRESH}s"},
        **extra,
    })


def _queue(gw):
    return json.loads(gw.cli("queue", "list", "--all", "--json", check=True).stdout)


def test_copies_leave_only_through_authorised_relays(make_gateway, tmp_path, relays):
    eu, eu2, us = relays
    _, gw = _gateway(make_gateway, tmp_path, relays)
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message("for acme"))
        s.sendmail("a@sender.test", ["x@globex.test"], simple_message("for globex"))
    wait_for(lambda: len(eu.messages) + len(us.messages) >= 2, what="both copies")
    time.sleep(0.5)
    # acme allows the EU only: relay-us is skipped although the rule names it first
    assert [m.rcpt_tos for m in eu.messages] == [["archive@vault.test"]]
    assert b"for acme" in eu.messages[0].data
    # globex authorised relay-us: the rule's first choice
    assert [m.rcpt_tos for m in us.messages] == [["archive@vault.test"]]
    assert b"for globex" in us.messages[0].data
    assert eu2.messages == []

    # acme objects to relay-eu: its next copy takes relay-eu-2
    assert gw.cli("subprocessors", "object", "--tenant", "acme", "relay-eu",
                  "--note", "letter of 2026-11-20").returncode == 0
    time.sleep(CONSENT_REFRESH + 0.5)  # the delivery worker re-reads objections this often
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message("after objection"))
    wait_for(lambda: eu2.messages, what="relay-eu-2")
    assert b"after objection" in eu2.messages[0].data
    assert len(eu.messages) == 1
    events = [e for e in gw.store.audit_events("acme") if e["action"] == "subprocessor.objection"]
    assert events and events[0]["detail"]["subprocessor"] == "relay-eu"

    # and to relay-eu-2: nothing may carry acme's copies; they are held, visibly
    gw.cli("subprocessors", "object", "--tenant", "acme", "relay-eu-2", check=True)
    time.sleep(CONSENT_REFRESH + 0.5)
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message("nowhere to go"))
    held = wait_for(lambda: [d for d in _queue(gw) if d["status"] == "held"], what="a hold")
    assert "no authorised subprocessor (rule us-first)" in held[0]["reason"]
    assert "tenant acme objected to relay-eu" in held[0]["reason"]
    assert "relay-us is in US, tenant acme allows EU" in held[0]["reason"]
    assert len(eu.messages) == 1 and len(eu2.messages) == 1 and len(us.messages) == 1

    listing = json.loads(gw.cli("subprocessors", "list", "--json", check=True).stdout)
    assert listing["tenants"]["acme"]["relay-eu"] == "tenant acme objected to relay-eu"
    assert listing["tenants"]["globex"]["relay-us"] == "usable"


NEW_RELAY = """
  relay-new:
    purpose: outbound-relay
    entity: "New Relay B.V."
    country: NL
    region: EU
    added: 2026-11-25
    smtp: {{host: 127.0.0.1, port: {port}, tls: none}}
"""


def with_new_relay(relays: list[Sink], new: Sink) -> str:
    """The policy with relay-new added to the registry, first in the routing rule."""
    return _policy_text(*relays, extra=NEW_RELAY.format(port=new.port)).replace(
        "via: [relay-us, relay-eu, relay-eu-2]", "via: [relay-new, relay-us, relay-eu]")


def test_an_added_subprocessor_waits_for_the_objection_window(make_gateway, tmp_path, relays):
    eu, _eu2, _us = relays
    policies, gw = _gateway(make_gateway, tmp_path, relays)
    new = Sink()
    try:
        text = with_new_relay(relays, new)
        (policies / "subprocessors.yaml").write_text(text)
        gw.proc.send_signal(__import__("signal").SIGHUP)
        wait_for(lambda: "subprocessor relay-new added" in gw.log(), what="the reload")
        assert "subprocessor relay-new added: 1 notice queued; usable per tenant" in gw.log()
        # acme (authorised: all) is notified; globex did not authorise relay-new
        notices = json.loads(gw.cli("subprocessors", "notices", "--json", check=True).stdout)
        assert [(n["tenant"], n["subprocessor"], n["change"]) for n in notices] == [
            ("acme", "relay-new", "added")]
        # the notice email goes to the privacy contact through acme's relay (relay-eu)
        mail = wait_for(lambda: [m for m in eu.messages if m.rcpt_tos == ["privacy@acme.test"]],
                     what="the notice email")
        assert b"added relay-new (New Relay B.V., EU); object until" in mail[0].data
        assert b"Subject: Subprocessor change" in mail[0].data
        # within the window, acme's copies do not use relay-new
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message("in the window"))
        wait_for(lambda: [m for m in eu.messages if b"in the window" in m.data], what="copy")
        assert new.messages == []
        listing = json.loads(gw.cli("subprocessors", "list", "--json", check=True).stdout)
        assert "objection window" in listing["tenants"]["acme"]["relay-new"]
    finally:
        new.stop()


def test_instances_that_start_together_notice_a_registry_change_once(store):
    """Two instances read the registry and write its change in one transaction each:
    they take turns, so the second finds the change recorded and sends no notices
    (without turns, PostgreSQL would give both the old registry)."""
    now = datetime.now(UTC)
    assert store.sync_subprocessors(["mailrelay"], now, lambda a, r, p: []) == ([], [])  # baseline
    noticed: list[tuple[list[str], list[str]]] = []

    def notices(added, removed, pairs):
        noticed.append((added, removed))
        time.sleep(0.5)  # the other instance reads meanwhile
        return []

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda _: store.sync_subprocessors(["mailrelay", "archiver"], now, notices),
            range(2)))
    assert sorted(results) == [([], []), (["archiver"], [])]
    assert noticed == [(["archiver"], [])]


def test_instances_that_start_together_record_their_tenants_once(store):
    configured = {f"t{n}": f"Tenant {n}" for n in range(20)}
    for _ in range(5):  # a few rounds: each time, new tenants that all add at once
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(store.sync_tenants, [configured] * 4))
        configured = {f"{tid}x": name for tid, name in configured.items()}
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM tenants")).scalar_one()
    assert rows == 2 + 5 * 20  # acme and globex, then each round's twenty
