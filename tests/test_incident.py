"""Breach notices: queued as mail to the tenant's privacy contact, delivered through
the tenant's authorised relay, and audited with the time of discovery."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import wait_for

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
