"""Retention: the decision table, the policy file's errors, and the sweeper on real databases."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from gateway.policy.retention import Duration, Hold, RetentionPolicy, Tag, TenantRetention
from gateway.policyset import PolicyError, load
from gateway.records import NewMessage
from gateway.store.holds import HoldStore
from gateway.store.ids import new_id
from gateway.store.intake import _insert_messages
from gateway.store.messages import tag_key
from gateway.store.models import (
    audit_events,
    deliveries,
    message_addresses,
    message_blobs,
    messages,
)
from gateway.sweeper import Sweeper

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

POLICY = RetentionPolicy(
    default=Duration.parse("1y"),
    tags={
        "support": Tag("support", Duration.parse("2y")),
        "invoice": Tag("invoice", Duration.parse("7y")),
        "spam": Tag("spam", Duration.parse("30d"), cap=True),
        "sensitive": Tag("sensitive", Duration.parse("90d"), cap=True),
        "key-client": Tag("key-client"),
    },
    tenants={"acme": TenantRetention(default=Duration.parse("18mo"),
                                     keep={"support": Duration.parse("3y")})},
)


@pytest.mark.parametrize(
    ("tenant", "tags", "keep", "rule"),
    [
        ("globex", [], "1y", "default (1y)"),
        ("acme", [], "18mo", "default of tenant acme (18mo)"),
        ("globex", ["key-client"], "1y", "default (1y)"),  # a tag without a period
        ("globex", ["support"], "2y", "tag support (2y)"),
        ("acme", ["support"], "3y", "tag support (3y)"),  # the tenant's override
        ("globex", ["support", "invoice"], "7y", "tag invoice (7y, longest of invoice, support)"),
        ("globex", ["invoice", "sensitive"], "90d", "tag sensitive (90d, max)"),
        ("globex", ["spam", "sensitive", "invoice"], "30d", "tag spam (30d, max)"),
        ("globex", ["nope"], "1y", "default (1y)"),  # unknown tags decide nothing
    ],
)
def test_decision_table(tenant, tags, keep, rule):
    decision = POLICY.decide(tenant, tags)
    assert str(decision.keep) == keep
    assert decision.rule == rule


@pytest.mark.parametrize(
    ("text", "received", "expires"),
    [
        ("30d", datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)),
        ("6w", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 12, tzinfo=UTC)),
        ("1mo", datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC)),
        ("1y", datetime(2028, 2, 29, tzinfo=UTC), datetime(2029, 2, 28, tzinfo=UTC)),
        ("7y", datetime(2019, 11, 25, 8, tzinfo=UTC), datetime(2026, 11, 25, 8, tzinfo=UTC)),
    ],
)
def test_durations_are_calendar_periods(text, received, expires):
    d = Duration.parse(text)
    assert d.after(received) == expires
    assert d.before(expires) <= received + timedelta(days=1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("6m", "ambiguous"),
        ("0d", "delete mail as it arrives"),
        ("two years", "expected a duration"),
        (True, "expected a duration"),
    ],
)
def test_bad_durations(text, message):
    with pytest.raises(ValueError, match=message):
        Duration.parse(text)


def test_holds_apply_by_tenant_tag_and_date():
    hold = Hold("h", "case 1", tenant="acme", tag="invoice", until=date(2026, 12, 31))
    assert hold.covers("acme", ["invoice", "support"])
    assert not hold.covers("acme", ["support"])
    assert not hold.covers("globex", ["invoice"])
    assert hold.active(NOW)
    assert not hold.active(datetime(2027, 1, 1, tzinfo=UTC))


# ------------------------------------------------------------------ the file
TENANTS = {"acme", "globex"}
WORKFLOWS = "tenants:\n  acme:\n    rules:\n      - name: t\n        actions: {tag: [support]}\n"


def _problems(tmp_path, retention, workflows=WORKFLOWS):
    (tmp_path / "retention.yaml").write_text(retention)
    (tmp_path / "workflows.yaml").write_text(workflows)
    with pytest.raises(PolicyError) as info:
        load(tmp_path, TENANTS, set())
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default: 1y\ntags:\n  support: {keep: 2 years}\n",
         "retention.yaml:3:13: expected a duration such as 30d"),
        ("default: 1y\ntags:\n  support: {keep: 6m}\n", "retention.yaml:3:13: '6m' is ambiguous"),
        ("tags:\n  support: 2y\n", "retention.yaml:1:1: default is required"),
        ("default: 1y\ntags:\n  support: {kep: 2y}\n",
         "retention.yaml:3:13: unknown key 'kep' in tag support"),
        ("default: 1y\ntags:\n  Support: 2y\n  support: 2y\n",
         "retention.yaml:3:3: not a tag name"),
        ("default: 1y\ntags:\n  support: {max: true}\n",
         "retention.yaml:3:13: max needs a keep duration"),
        ("default: 1y\ntags:\n  support: 2y\ntenants:\n  nobody: {default: 1y}\n",
         "retention.yaml:5:3: unknown tenant 'nobody'"),
        ("default: 1y\ntags:\n  support: 2y\ntenants:\n  acme: {keep: {invoice: 7y}}\n",
         "retention.yaml:5:17: unknown tag 'invoice'"),
        ("default: 1y\ntags:\n  support: 2y\ntenants:\n  acme: {tags: [vip]}\n",
         "retention.yaml:5:17: unknown tag 'vip'"),
        ("default: 1y\ntags:\n  support: 2y\nholds:\n  - {name: h, tenant: acme}\n",
         "retention.yaml:5:5: hold 'h' needs a reason"),
        ("default: 1y\ntags:\n  support: 2y\nholds:\n  - {name: h, reason: r}\n",
         "retention.yaml:5:5: hold 'h' must name a tenant, an address or a tag"),
        ("default: 1y\ntags:\n  support: 2y\nholds:\n  - {name: h, reason: r, tag: x}\n",
         "retention.yaml:5:26: unknown tag 'x'"),
        ("default: 1y\ntags:\n  support: 2y\nholds:\n"
         "  - {name: h, reason: r, tenant: acme, until: soon}\n",
         "retention.yaml:5:40: until takes a date"),
        ("default: 1y\ntags:\n  support: 2y\nclassifier:\n  detect: {dna: support}\n",
         "retention.yaml:5:12: unknown category 'dna'"),
        ("default: 1y\ntags:\n  support: 2y\nclassifier:\n  detect: {health: support}\n",
         "retention.yaml:5:12: health needs health_keywords"),
        ("default: 1y\ntags:\n  support: 2y\n  support: 3y\n",
         "retention.yaml:4:3: duplicate key 'support'"),
        ("default: 1y\ntags: &a\n  support: *a\n",
         "retention.yaml:2:7: an alias refers to a node that contains it"),
        ("default: 1y\ntags:\n  support: [2y\n", "retention.yaml:4:1: "),  # half-written
        ("default: !!python/object:os.system 1y\n", "retention.yaml:1:10: "),  # unsafe tag
    ],
)
def test_policy_file_errors_name_file_line_and_column(tmp_path, text, expected):
    problems = _problems(tmp_path, text)
    assert any(expected in p for p in problems), problems
    assert all(re.match(rf"{re.escape(str(tmp_path))}/\w+\.yaml:\d+(:\d+)?: ", p)
               for p in problems), problems


def test_a_workflow_tag_must_be_defined_in_retention(tmp_path):
    problems = _problems(tmp_path, "default: 1y\ntags:\n  invoice: 7y\n")
    assert problems == [f"{tmp_path}/workflows.yaml:5:19: unknown tag 'support' "
                        "(tags are defined in retention.yaml)"]


def test_broken_retention_file_does_not_bury_its_error_under_workflow_errors(tmp_path):
    problems = _problems(tmp_path, "default: 1y\ntags: [\n")
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path}/retention.yaml:")


# ------------------------------------------------------------------ the sweeper
def _seed(store, *, tenant="acme", age_days, tags=(), addresses=(), status="processed",
          pending_delivery=False):
    message_id = new_id()
    data = f"Subject: {message_id}\r\n\r\nbody\r\n".encode()
    with store.engine.begin() as conn:
        _insert_messages(conn, [NewMessage(
            id=message_id, tenant_id=tenant, mail_from="someone@sender.test",
            recipients=("support@acme.test",), data=data,
            received_at=NOW - timedelta(days=age_days),
            client_address="127.0.0.1", helo="t", protocol="ESMTP", trace_header="",
            smtputf8=False)])
        conn.execute(update(messages).where(messages.c.id == message_id).values(
            status=status, tags=list(tags), tag_key=tag_key(tags)))
        if addresses:
            conn.execute(message_addresses.insert(), [
                {"message_id": message_id, "role": "to", "address": a} for a in addresses])
        if pending_delivery:
            conn.execute(deliveries.insert().values(
                message_id=message_id, tenant_id=tenant, kind="bcc", recipient="x@vault.test",
                rule="r", status="pending", attempts=0, created_at=NOW, next_attempt_at=NOW))
    return message_id


def _count(store, table):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def _ids(store):
    with store.engine.connect() as conn:
        return set(conn.execute(select(messages.c.id)).scalars())


def test_sweep_deletes_exactly_the_expired_and_nothing_held(store):
    policy = RetentionPolicy(
        default=Duration.parse("1y"),
        tags={"support": Tag("support", Duration.parse("2y")),
              "invoice": Tag("invoice", Duration.parse("7y")),
              "sensitive": Tag("sensitive", Duration.parse("90d"), cap=True)},
        holds=(
            Hold("case-1", "dispute", tenant="globex", tag="support"),
            Hold("case-2", "court order", address="claims@big.example"),
            Hold("ended", "old case", tenant="acme", until=date(2026, 1, 1)),
        ),
    )
    expired = {
        _seed(store, age_days=400),  # untagged: 1y
        _seed(store, age_days=800, tags=["support"], pending_delivery=True),  # 2y
        _seed(store, age_days=100, tags=["sensitive", "invoice"]),  # capped at 90d
        _seed(store, age_days=400, status="quarantined"),
    }
    kept = {
        _seed(store, age_days=300),
        _seed(store, age_days=700, tags=["support"]),
        _seed(store, age_days=2000, tags=["invoice", "support"]),  # 7y wins
        _seed(store, age_days=80, tags=["sensitive"]),
        _seed(store, age_days=900, status="received"),  # not yet processed: not judged
    }
    case_1 = _seed(store, tenant="globex", age_days=800, tags=["support"])
    case_2 = _seed(store, age_days=400, addresses=["claims@big.example"])
    held = {case_1, case_2}
    unknown = _seed(store, age_days=4000, tags=["legacy"])  # a tag no longer in the policy
    sweeper = Sweeper(store, batch_size=2, clock=lambda: NOW, sleep=lambda _: None)

    preview = sweeper.sweep(policy, dry_run=True)
    assert (preview.expired, preview.held) == (4, 2)
    assert _ids(store) == expired | kept | held | {unknown}  # a dry run deletes nothing

    report = sweeper.sweep(policy, actor="test")
    assert (report.expired, report.held) == (4, 2)
    assert _ids(store) == kept | held | {unknown}
    assert any("legacy is not in the policy" in g.note for g in report.groups)
    # completely: no original, address or delivery of a deleted message is left
    with store.engine.connect() as conn:
        for table in (message_blobs, message_addresses, deliveries):
            left = set(conn.execute(select(table.c.message_id)).scalars())
            assert not left & expired, table.name
        events = conn.execute(select(audit_events)).all()
    assert [(e.action, e.tenant_id, e.actor) for e in events] == [
        ("retention.sweep", "acme", "test")]
    assert events[0].detail == {"deleted": 4, "per_tags": {
        "(untagged)": 2, "support": 1, "invoice,sensitive": 1}}

    # the next sweep finds nothing; after the hold on case-1 ends, its message goes
    assert sweeper.sweep(policy).expired == 0
    released = RetentionPolicy(default=policy.default, tags=policy.tags, holds=policy.holds[1:])
    assert sweeper.sweep(released).expired == 1
    assert _ids(store) == kept | {case_2, unknown}


def test_sweep_stops_between_batches(store):
    for _ in range(5):
        _seed(store, age_days=400)
    sweeper = Sweeper(store, batch_size=2, clock=lambda: NOW)
    sweeper.sleep = lambda _: setattr(sweeper, "stopping", True)
    report = sweeper.sweep(RetentionPolicy(default=Duration.parse("1y")))
    assert report.expired == 2 and _count(store, messages) == 3


# ------------------------------------------------------------------ the daemon
RETENTION_YAML = """
default: 1y
tags:
  support: 2y
  invoice: 7y
  sensitive: {keep: 90d, max: true}
tenants:
  acme: {tags: [support]}
classifier:
  detect: {bsn: sensitive, health: sensitive}
  health_keywords: [diagnose]
holds:
  - {name: dispute, reason: "case 2026-117", address: claims@big.example}
"""


def _policies(tmp_path, name="policies", text=RETENTION_YAML):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "retention.yaml").write_text(text)
    return directory


def _send(gw, sender, body):
    with gw.smtp() as s:
        s.sendmail(sender, ["support@acme.test"],
                   f"From: {sender}\r\nTo: support@acme.test\r\nSubject: hi\r\n\r\n{body}\r\n")


def _age(gw, days):
    """Move every stored message `days` into the past (what waiting would do)."""
    with gw.store.engine.begin() as conn:
        for message_id, received in conn.execute(select(messages.c.id, messages.c.received_at)):
            conn.execute(update(messages).where(messages.c.id == message_id)
                         .values(received_at=received - timedelta(days=days)))


def _json(result):
    import json

    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_tags_expiry_preview_and_sweep_from_the_command_line(make_gateway, tmp_path):
    policies = _policies(tmp_path)
    gw = make_gateway({"policies": {"directory": str(policies)}})
    _send(gw, "someone@client.example", "Just a question.")
    _send(gw, "someone@client.example", "Mijn BSN is 111222333.")
    _send(gw, "claims@big.example", "About the claim.")
    rows = {r["mail_from"] + ("/bsn" if "sensitive" in r["tags"] else ""): r
            for r in gw.wait_processed(3)}
    plain, bsn, claims = (rows["someone@client.example"], rows["someone@client.example/bsn"],
                          rows["claims@big.example"])
    assert plain["tags"] == ["support"] and claims["tags"] == ["support"]
    assert bsn["tags"] == ["support", "sensitive"]

    shown = _json(gw.cli("messages", "show", bsn["id"], "--json"))
    assert shown["retention"] == "tag sensitive (90d, max)"
    received = datetime.fromisoformat(shown["received_at"])
    assert datetime.fromisoformat(shown["expires_at"]) == received + timedelta(days=90)
    assert _json(gw.cli("messages", "show", claims["id"], "--json"))["held_by"] == ["dispute"]

    # before aging: nothing is due now; 100 days on, the sensitive one (90d) is
    now = _json(gw.cli("retention", "preview", "--json"))
    assert (now["expired"], now["held"]) == (0, 0)
    later = (datetime.now(UTC) + timedelta(days=100)).date().isoformat()
    ahead = _json(gw.cli("retention", "preview", "--as-of", later, "--json"))
    assert (ahead["expired"], ahead["held"]) == (1, 0)
    assert len(gw.messages()) == 3  # a preview deletes nothing
    _age(gw, 100)
    dry = _json(gw.cli("retention", "sweep", "--dry-run", "--json"))
    assert (dry["expired"], dry["held"]) == (1, 0)
    assert len(gw.messages()) == 3
    # An edited copy that keeps sensitive mail for 1y would delete nothing yet.
    edited = _policies(tmp_path, "edited", RETENTION_YAML.replace("keep: 90d", "keep: 1y"))
    preview = _json(gw.cli("retention", "preview", "--policies", str(edited), "--json"))
    assert (preview["expired"], preview["held"]) == (0, 0)
    text = gw.cli("retention", "preview", "--policies", str(policies)).stdout.decode()
    assert "acme" in text and "sensitive,support" in text and "would delete 1 messages" in text

    _age(gw, 700)  # now 800 days old: support (2y) has passed too, except for the hold
    done = _json(gw.cli("retention", "sweep", "--json"))
    assert (done["expired"], done["held"]) == (2, 1)
    assert [r["id"] for r in gw.messages()] == [claims["id"]]
    events = [e for e in gw.store.audit_events("acme") if e["action"] == "retention.sweep"]
    assert events[-1]["detail"] == {"deleted": 2, "per_tags": {"sensitive,support": 1,
                                                                "support": 1}}

    broken = _policies(tmp_path, "broken", "default: forever\n")
    result = gw.cli("retention", "preview", "--policies", str(broken))
    assert result.returncode == 1
    assert f"{broken}/retention.yaml:1:1: expected a duration".encode() in result.stderr


def test_the_daemon_sweeps_on_its_interval(make_gateway, tmp_path):
    policies = _policies(tmp_path)
    gw = make_gateway({"policies": {"directory": str(policies)},
                       "retention": {"sweep_interval": "0.5s"}})
    _send(gw, "someone@client.example", "Old news.")
    _send(gw, "claims@big.example", "Held.")
    gw.wait_processed(2)
    _age(gw, 800)
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    while len(gw.messages()) > 1 and datetime.now(UTC) < deadline:
        import time

        time.sleep(0.2)
    assert [r["mail_from"] for r in gw.messages()] == ["claims@big.example"]
    assert "retention sweep (policy " in gw.log()
    assert gw.terminate() == 0


def test_a_hold_a_tenant_placed_keeps_its_mail_from_the_sweep_until_released(store):
    policy = RetentionPolicy(default=Duration.parse("1y"))
    held = _seed(store, age_days=400, addresses=["claims@big.example"])
    other_tenant = _seed(store, tenant="globex", age_days=400,
                         addresses=["claims@big.example"])
    free = _seed(store, age_days=400)
    holds = HoldStore(store)
    hold_id = holds.place("acme", name="claims", reason="a dispute",
                          address="claims@big.example", tag=None, until=None, actor="api:t")
    assert hold_id is not None
    sweeper = Sweeper(store, batch_size=2, clock=lambda: NOW, sleep=lambda _: None)
    report = sweeper.sweep(policy)
    assert (report.expired, report.held) == (2, 1)
    assert _ids(store) == {held}  # globex's mail with the address is not acme's to hold
    assert other_tenant not in _ids(store) and free not in _ids(store)
    assert holds.release("acme", hold_id, "api:t") is True
    assert holds.release("acme", hold_id, "api:t") is False  # released once
    assert sweeper.sweep(policy).expired == 1 and _ids(store) == set()
