"""Incidents and breach notices: an incident is a record of the tenants it affects; each
tenant's notice is queued as mail to its privacy contact, delivered through the tenant's
authorised relay, audited with the time of discovery, and shown with its 48-hour
deadline (and counted while it is not delivered)."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import free_port, metrics_port, samples, value, wait_for

SUBPROCESSORS = """
subprocessors:
  relay-eu:
    purpose: outbound-relay
    entity: "Relay EU B.V."
    country: NL
    region: EU
    added: 2026-01-15
    smtp: {{host: 127.0.0.1, port: {port}, tls: none}}
tenants:
  acme: {{privacy_contact: dpo@customer.test, authorised: all}}
  globex: {{privacy_contact: dpo@globex.test, authorised: all}}
routing:
  - {{name: all, via: [relay-eu]}}
notice:
  from: privacy@gateway.test
"""


def _gateway(make_gateway: Any, tmp_path: Any, relay: Any) -> Any:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "subprocessors.yaml").write_text(SUBPROCESSORS.format(port=relay.port))
    return make_gateway({"policies": {"directory": str(policies)},
                         "delivery": {"poll_interval": "0.2s"}})


def test_a_notice_reaches_the_privacy_contact_and_is_audited(make_gateway, tmp_path, relay):
    gw = _gateway(make_gateway, tmp_path, relay)
    notice = tmp_path / "notice.txt"
    notice.write_text("On 24 November a misdirected export exposed message metadata.\n"
                      "Affected: 12 messages. Measures taken: the export was recalled.\n")
    discovered = (datetime.now(UTC) - timedelta(hours=5)).replace(microsecond=0)
    result = gw.cli("incident", "notify", "--tenant", "acme", "--file", str(notice),
                    "--discovered", discovered.isoformat(), "--title", "Incident 2026-11")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "queued for dpo@customer.test" in out and "5.0 hours after discovery" in out

    got = relay.wait(1)[0]
    assert got.rcpt_tos == ["dpo@customer.test"]
    assert got.headers["Subject"] == "Incident 2026-11"
    assert b"misdirected export" in got.data and b"Tenant: Acme (acme)" in got.data
    queue = json.loads(gw.cli("queue", "list", "--all", "--json", check=True).stdout)
    assert [(d["recipient"], d["status"]) for d in queue] == [("dpo@customer.test", "sent")]

    event = json.loads(gw.cli("audit", "list", "--action", "incident.notify", "--json",
                              check=True).stdout)[-1]
    assert event["tenant"] == "acme" and event["message"] == queue[0]["message"]
    detail = event["detail"]
    assert detail["discovered_at"] == discovered.isoformat()
    assert 4.9 < detail["hours_after_discovery"] < 5.1 and detail["within_promise"] is True
    assert detail["to"] == "dpo@customer.test" and detail["title"] == "Incident 2026-11"


@pytest.mark.sqlite_only  # input checks: any database
def test_notice_input_is_checked(make_gateway, tmp_path, relay):
    gw = _gateway(make_gateway, tmp_path, relay)
    notice = tmp_path / "notice.txt"
    notice.write_text("Something happened.\n")
    now = datetime.now(UTC)

    def run(*args: str) -> Any:
        return gw.cli("incident", "notify", "--file", str(notice), *args)

    # without subprocessors.yaml nobody is named: the operator must say whom to tell
    plain = make_gateway(start=False)
    plain.cli("db", "upgrade", check=True)
    no_contact = plain.cli("incident", "notify", "--file", str(notice), "--tenant", "acme",
                           "--discovered", now.isoformat())
    assert no_contact.returncode == 1 and b"no privacy_contact" in no_contact.stderr
    future = run("--tenant", "acme", "--discovered", (now + timedelta(hours=2)).isoformat())
    assert future.returncode == 1 and b"in the future" in future.stderr
    bad_time = run("--tenant", "acme", "--discovered", "yesterday")
    assert bad_time.returncode == 2 and b"not a time" in bad_time.stderr
    late = run("--tenant", "acme", "--to", "dpo2@customer.test",
               "--discovered", (now - timedelta(hours=50)).isoformat())
    assert late.returncode == 0 and b"later than the 48 hours" in late.stderr
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe broken")
    binary = gw.cli("incident", "notify", "--tenant", "acme", "--file",
                    str(tmp_path / "binary.txt"), "--discovered", now.isoformat())
    assert binary.returncode == 1 and b"not UTF-8 text" in binary.stderr
    missing = gw.cli("incident", "notify", "--tenant", "acme", "--file",
                     str(tmp_path / "nope.txt"), "--discovered", now.isoformat())
    assert missing.returncode == 1 and b"nope.txt: No such file" in missing.stderr
    for r in (no_contact, future, bad_time, late, binary, missing):
        assert b"Traceback" not in r.stderr
    wait_for(lambda: relay.messages, 15, "the late notice delivered")
    assert [m.rcpt_tos for m in relay.messages] == [["dpo2@customer.test"]]


def test_an_incident_is_a_record_of_each_tenants_notice_and_its_deadline(make_gateway,
                                                                         tmp_path, relay):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "subprocessors.yaml").write_text(SUBPROCESSORS.format(port=relay.port))
    api_port = free_port()
    gw = make_gateway({"policies": {"directory": str(policies)},
                       "delivery": {"poll_interval": "0.2s"},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
                       "admin_api": {"listen": f"127.0.0.1:{api_port}"}})
    discovered = (datetime.now(UTC) - timedelta(hours=40)).replace(microsecond=0)
    opened = gw.cli("incident", "open", "--tenant", "acme", "--tenant", "globex",
                    "--discovered", discovered.isoformat(),
                    "--description", "a misdirected export of message metadata", check=True)
    assert b"incident 1 opened for acme, globex; notices are due by " \
           + (discovered + timedelta(hours=48)).isoformat().encode() in opened.stdout

    def gauges() -> tuple[float, float]:
        _, values = samples(metrics_port(gw))
        return (value(values, "mailflowr_gateway_breach_notices_undelivered"),
                value(values, "mailflowr_gateway_breach_notice_deadline_seconds"))

    wait_for(lambda: gauges()[0] == 2, what="two notices due")
    assert 7.9 * 3600 < gauges()[1] < 8.0 * 3600

    notice = tmp_path / "notice.txt"
    notice.write_text("Message metadata of 12 messages was exported to the wrong party.\n")
    sent = gw.cli("incident", "notify", "--incident", "1", "--tenant", "acme",
                  "--file", str(notice), check=True)
    assert b"incident 1: notice " in sent.stdout and b"40.0 hours after discovery" in sent.stdout
    relay.wait(1)

    def shown() -> dict[str, Any]:
        doc = json.loads(gw.cli("incident", "show", "1", "--json", check=True).stdout)
        return {t["tenant"]: t for t in doc["tenants"]}

    acme = wait_for(lambda: shown()["acme"] if shown()["acme"]["state"] == "sent" else None,
                    what="the notice delivered")
    assert acme["in_time"] is True and acme["delivered_at"] >= acme["notified_at"]
    assert shown()["globex"] | {"deadline": None} == {
        "tenant": "globex", "message_id": None, "notified_at": None, "delivered_at": None,
        "state": "not notified", "why": "no notice queued yet (incident notify)",
        "deadline": None, "in_time": None}
    wait_for(lambda: gauges()[0] == 1, what="one notice due")
    listed = gw.cli("incident", "list", "--open", check=True).stdout.decode()
    assert "globex           not notified" in listed and "acme             sent" in listed

    # each tenant's tools see the incident with their own notice only
    globex = gw.cli("token", "create", "--tenant", "globex", check=True).stdout.split()[-1]
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{api_port}/api/v1/incidents",
            headers={"Authorization": f"Bearer {globex.decode()}"}), timeout=10) as r:
        body = r.read()
    [theirs] = json.loads(body)["incidents"]
    assert theirs["notice"]["state"] == "not notified" and b"acme" not in body
    assert theirs["deadline"] == (discovered + timedelta(hours=48)).isoformat()

    wrong = gw.cli("incident", "notify", "--incident", "1", "--tenant", "acme",
                   "--file", str(notice), "--to", "x@customer.test")
    assert wrong.returncode == 0  # a second notice to acme is allowed (a correction)
    assert gw.cli("incident", "close", "1", "--note", "").returncode == 1
    gw.cli("incident", "close", "1", "--note", "recalled; no further exposure", check=True)
    after = gw.cli("incident", "notify", "--incident", "1", "--tenant", "globex",
                   "--file", str(notice))
    assert after.returncode == 1 and b"incident 1 is closed" in after.stderr
    wait_for(lambda: gauges() == (0, 0), what="nothing due once closed")
    actions = [e["action"] for e in gw.store.audit_events() if e["action"].startswith("inc")]
    assert actions == ["incident.open", "incident.open", "incident.notify", "incident.notify",
                       "incident.close", "incident.close"]
