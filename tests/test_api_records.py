"""The admin API beyond messages, exports and erasures, against the real daemon: token
scopes, refused tokens logged and counted, deliveries (read, retried, dropped), a
message in full, deleting one message, users, contacts, sub-processors and objections,
legal holds, and audit events paged in both directions; each for its own tenant only."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.store.models import delivery_attempts
from tests import test_api
from tests.conftest import free_port, metrics_port, samples, value, wait_for
from tests.test_api import SUBJECT, _token
from tests.test_subprocessors import CONSENT_REFRESH

api_gateway = test_api.api_gateway  # a daemon with acme's and globex's mail, copied


def _audit(gw: Any, action: str) -> list[dict[str, Any]]:
    return json.loads(gw.cli("audit", "list", "--action", action, "--json",
                             check=True).stdout)


def test_a_token_does_only_what_its_scopes_allow_and_a_refusal_is_audited(api_gateway):
    gw, api = api_gateway
    read = _token(gw, "acme", "read")
    export = _token(gw, "acme", "export")
    listed = {t["id"]: t["scopes"] for t in json.loads(
        gw.cli("token", "list", "--json", check=True).stdout)}
    assert sorted(listed.values()) == [["export"], ["read"]]

    assert api.call("GET", "/api/v1/messages", read)[0] == 200
    status, doc, _ = api.call("POST", "/api/v1/erasures", read, {"subject": SUBJECT})
    assert status == 403 and "lacks the scope 'erase'" in doc["error"]
    assert api.call("POST", "/api/v1/exports", read, {})[0] == 403
    assert api.call("GET", "/api/v1/messages", export)[0] == 403
    assert api.call("POST", "/api/v1/exports", export, {})[0] == 202
    one = gw.messages(tenant="acme")[0]["id"]
    assert api.call("DELETE", f"/api/v1/messages/{one}", read)[0] == 403
    assert gw.store.get_message(one) is not None  # nothing was done

    refused = [e for e in _audit(gw, "api") if e["detail"]["status"] == 403]
    assert [(e["actor"], e["action"], e["detail"]["path"]) for e in refused] == [
        (f"api:{read.split('_')[1]}", "api.post", "/api/v1/erasures"),
        (f"api:{read.split('_')[1]}", "api.post", "/api/v1/exports"),
        (f"api:{export.split('_')[1]}", "api.get", "/api/v1/messages"),
        (f"api:{read.split('_')[1]}", "api.delete", "/api/v1/messages/{id}")]

    bad = gw.cli("token", "create", "--tenant", "acme", "--scope", "read,everything")
    assert bad.returncode != 0
    assert b"unknown scope 'everything' (known: read, export, erase, admin)" in bad.stderr


@pytest.mark.sqlite_only  # the daemon's answer to a token: any database
def test_a_refused_token_is_logged_without_the_token_and_counted(api_gateway):
    gw, api = api_gateway
    globex = _token(gw, "globex", "read")
    revoked = _token(gw, "acme", "read")
    gw.cli("token", "revoke", revoked.split("_")[1], check=True)
    wrong = revoked[:-4] + ("AAAA" if not revoked.endswith("AAAA") else "BBBB")
    for token in (None, "garbage", "mfr_000000000000_" + "A" * 43, revoked, wrong):
        assert api.call("GET", "/api/v1/messages", token)[0] == 401
    assert api.call("GET", "/api/v1/messages", globex)[0] == 200
    # a deactivated tenant's token stops working at once
    gw.cli("tenant", "deactivate", "globex", "--yes", check=True)
    status, doc, _ = api.call("GET", "/api/v1/messages", globex)
    assert status == 401
    assert doc == {"error": "a valid API token is needed: Authorization: Bearer TOKEN"}

    log = gw.log()
    failures = [line for line in log.splitlines() if "authentication failed from" in line]
    assert len(failures) == 6, failures
    assert all("from 127.0.0.1: " in line for line in failures)
    # the fail2ban filter of docs/operations.md finds each
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    failregex = re.search(r"^failregex = (.*)$", docs, re.M).group(1)
    pattern = re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))
    assert [m.group("host") for ln in failures if (m := pattern.search(ln))] == \
        ["127.0.0.1"] * 6
    assert revoked.split("_", 2)[2] not in log and wrong.split("_", 2)[2] not in log
    assert "garbage" not in log
    _, values = samples(metrics_port(gw))
    name = "mailflowr_gateway_api_authentication_failures_total"
    counted = {reason: value(values, name, reason=reason) for reason in (
        "missing", "malformed", "unknown", "revoked", "wrong_secret", "deactivated")}
    # the deactivation deleted globex's tokens: its token is unknown from then on
    assert counted == {"missing": 1, "malformed": 1, "unknown": 2, "revoked": 1,
                       "wrong_secret": 1, "deactivated": 0}


def test_deliveries_are_listed_read_retried_and_dropped_for_their_tenant_only(api_gateway):
    gw, api = api_gateway
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    status, doc, _ = api.call("GET", "/api/v1/deliveries?limit=2", acme)
    assert status == 200 and len(doc["deliveries"]) == 2 and doc["next"]
    rest = api.call("GET", f"/api/v1/deliveries?after={doc['next']}", acme)[1]
    copies = doc["deliveries"] + rest["deliveries"]
    assert rest["next"] is None
    assert {(c["recipient"], c["rule"], c["kind"], c["status"], c["destination"])
            for c in copies} == {("archive@vault.test", "archive", "bcc", "sent", "relay")}
    assert len(copies) == 3 and all(c["attempts"] == 1 and c["last_attempt_at"]
                                    for c in copies)
    theirs = api.call("GET", "/api/v1/deliveries", globex)[1]["deliveries"]
    assert [(c["recipient"], c["message"]) for c in theirs] == [
        ("archive@vault.test", m["id"]) for m in gw.messages(tenant="globex")]
    # filters
    one = copies[0]
    by_message = api.call("GET", f"/api/v1/deliveries?message={one['message'].lower()}",
                          acme)[1]["deliveries"]
    assert [c["id"] for c in by_message] == [one["id"]]
    assert api.call("GET", "/api/v1/deliveries?status=held", acme)[1]["deliveries"] == []
    by_recipient = api.call("GET", "/api/v1/deliveries?recipient=ARCHIVE@vault.test",
                            acme)[1]["deliveries"]
    assert len(by_recipient) == 3
    assert api.call("GET", "/api/v1/deliveries?status=lost", acme)[0] == 400

    assert api.call("GET", f"/api/v1/deliveries/{one['id']}", acme)[1] == {
        **one, "history": [{"at": one["last_attempt_at"], "status": "sent", "reason": None}]}
    assert api.call("GET", f"/api/v1/deliveries/{one['id']}", globex)[0] == 404
    assert api.call("POST", f"/api/v1/deliveries/{one['id']}/retry", globex)[0] == 404
    status, doc, _ = api.call("POST", f"/api/v1/deliveries/{one['id']}/retry", acme)
    assert status == 409 and "the delivery is sent" in doc["error"]

    # a copy held back (its relay objected to): dropped, then retried
    held = _held_copy(gw, api, acme)
    status, doc, _ = api.call("POST", f"/api/v1/deliveries/{held}/drop", acme,
                              {"reason": "not wanted"})
    assert status == 200 and (doc["status"], doc["reason"]) == ("failed", "dropped: not wanted")
    assert api.call("POST", f"/api/v1/deliveries/{held}/drop", acme, {})[0] == 409
    status, doc, _ = api.call("POST", f"/api/v1/deliveries/{held}/retry", acme)
    assert status == 200 and doc["status"] == "pending"
    events = [(e["action"], e["detail"].get("delivery")) for e in _audit(gw, "delivery")]
    assert events == [("delivery.drop", held), ("delivery.retry", held)]


def test_a_delivery_shows_each_attempt_and_how_it_ended(api_gateway, relay):
    """The relay defers a copy twice, then takes it: three attempts, each with its time,
    the state it left the copy in, and the relay's reply."""
    gw, api = api_gateway
    acme = _token(gw, "acme")
    relay.handler.mode = "tempfail"
    with gw.smtp() as s:
        s.sendmail("dave@client.test", ["support@acme.test"],
                   b"Subject: deferred\r\n\r\nlater\r\n")
    [message] = wait_for(lambda: [m for m in gw.messages(tenant="acme")
                                  if m["subject"] == "deferred"], what="the message")

    def copy() -> dict[str, Any]:
        [row] = api.call("GET", f"/api/v1/deliveries?message={message['id']}",
                         acme)[1]["deliveries"]
        return row

    for attempt in (1, 2):
        wait_for(lambda n=attempt: copy()["attempts"] == n, what=f"attempt {attempt}")
        if attempt == 1:  # due again in retry_base; made due now, as an operator would
            assert api.call("POST", f"/api/v1/deliveries/{copy()['id']}/retry", acme)[0] \
                == 200
    relay.handler.mode = "accept"
    assert api.call("POST", f"/api/v1/deliveries/{copy()['id']}/retry", acme)[0] == 200
    wait_for(lambda: copy()["status"] == "sent", what="the third attempt")
    doc = api.call("GET", f"/api/v1/deliveries/{copy()['id']}", acme)[1]
    assert doc["attempts"] == 3
    assert [(h["status"], h["reason"]) for h in doc["history"]] == [
        ("pending", "451 4.3.0 Try again later"), ("pending", "451 4.3.0 Try again later"),
        ("sent", None)]
    times = [h["at"] for h in doc["history"]]
    assert times == sorted(times) and times[-1] == doc["last_attempt_at"]
    # the attempts go with the delivery: deleting the message deletes them
    assert api.call("DELETE", f"/api/v1/messages/{message['id']}", acme)[0] == 200
    with gw.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(delivery_attempts)).scalar() == 0


def _held_copy(gw: Any, api: Any, token: str) -> int:
    """Object to acme's only relay, send acme a message: its copy is held; its id."""
    status, doc, _ = api.call("POST", "/api/v1/subprocessors/relay-eu/objections", token,
                              {"note": "by letter of 3 December"})
    assert status == 201, doc
    time.sleep(CONSENT_REFRESH + 0.5)  # the delivery process sees an objection within this
    with gw.smtp() as s:
        s.sendmail("carol@client.test", ["support@acme.test"],
                   b"From: carol@client.test\r\nSubject: later\r\n\r\nlater\r\n")
    held: list[dict[str, Any]] = []

    def copy_held() -> bool:
        held[:] = api.call("GET", "/api/v1/deliveries?status=held", token)[1]["deliveries"]
        return bool(held)

    wait_for(copy_held, timeout=30)
    assert "tenant acme objected to relay-eu" in held[0]["reason"]
    return int(held[0]["id"])


def test_a_message_in_full_says_what_was_done_with_it_and_why(api_gateway):
    gw, api = api_gateway
    acme = _token(gw, "acme")
    mine = {m["subject"]: m["id"] for m in gw.messages(tenant="acme")}
    status, doc, _ = api.call("GET", f"/api/v1/messages/{mine['acme held']}", acme)
    assert status == 200
    assert doc["rules"] == ["archive"]
    assert [(d["recipient"], d["status"]) for d in doc["deliveries"]] == [
        ("archive@vault.test", "sent")]
    assert doc["retention"]["rule"] == "default (1y)"
    assert doc["retention"]["expires_at"][:4] == str(int(doc["received_at"][:4]) + 1)
    assert doc["retention"]["held_by"] == ["case-9"]
    assert set(doc["authentication"]) >= {"dkim"}
    other = api.call("GET", f"/api/v1/messages/{mine['acme from bob']}", acme)[1]
    assert other["retention"]["held_by"] == []
    # reading the content is an audit event naming the message and the token
    assert api.call("GET", f"/api/v1/messages/{mine['acme held']}/eml", acme)[0] == 200
    assert [(e["actor"], e["message"]) for e in _audit(gw, "message.export")] == [
        (f"api:{acme.split('_')[1]}", mine["acme held"])]


def test_deleting_a_message_respects_legal_holds(api_gateway):
    gw, api = api_gateway
    erase, admin = _token(gw, "acme", "erase"), _token(gw, "acme", "admin")
    globex = _token(gw, "globex", "erase")
    mine = {m["subject"]: m["id"] for m in gw.messages(tenant="acme")}
    bob, held = mine["acme from bob"], mine["acme held"]

    assert api.call("DELETE", f"/api/v1/messages/{bob}", globex)[0] == 404
    status, doc, _ = api.call("DELETE", f"/api/v1/messages/{bob}", erase)
    assert status == 200 and (doc["id"], doc["messages"], doc["deliveries"]) == (bob, 1, 1)
    assert gw.store.get_message(bob) is None
    assert api.call("GET", f"/api/v1/messages/{bob}", admin)[0] == 404

    status, doc, _ = api.call("DELETE", f"/api/v1/messages/{held}", erase)
    assert status == 409 and "legal hold case-9" in doc["error"]
    reason = urllib.parse.quote("court order 12 of 1 December")
    path = f"/api/v1/messages/{held}?override_hold={reason}"
    assert api.call("DELETE", path, erase)[0] == 403  # overriding needs admin
    assert gw.store.get_message(held) is not None
    status, doc, _ = api.call("DELETE", path, admin)
    assert status == 200 and gw.store.get_message(held) is None

    events = _audit(gw, "message.delete")
    assert [(e["message"], e["detail"].get("holds_overridden"), e["detail"].get("reason"))
            for e in events] == [(bob, None, None),
                                 (held, ["case-9"], "court order 12 of 1 December")]


def test_users_contacts_and_holds_of_the_tenant(api_gateway):
    gw, api = api_gateway
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    status, doc, _ = api.call("GET", "/api/v1/users", acme)
    assert (status, doc) == (200, {"users": [{"login": "agent",
                                              "send_as": ["agent@acme.test"]}]})
    assert "password" not in json.dumps(doc)
    assert api.call("GET", "/api/v1/users", globex)[1] == {"users": []}

    page = api.call("GET", "/api/v1/contacts?limit=2", acme)[1]
    contacts = page["contacts"]
    while page["next"]:
        page = api.call("GET", "/api/v1/contacts?limit=2&after="
                        + urllib.parse.quote(page["next"]), acme)[1]
        contacts += page["contacts"]
    by_address = {c["address"]: c for c in contacts}
    assert set(by_address) == {SUBJECT, "bob@client.test", "held@client.test",
                               "support@acme.test"}
    assert by_address["support@acme.test"]["messages"] == 3
    assert "rcpt_to" in by_address["support@acme.test"]["roles"]
    theirs = {c["address"] for c in api.call("GET", "/api/v1/contacts", globex)[1]["contacts"]}
    assert theirs == {SUBJECT, "x@globex.test"}

    holds = api.call("GET", "/api/v1/holds", acme)[1]["holds"]
    assert holds == [{"id": None, "placed_by": "gateway", "name": "case-9", "reason": "court",
                      "address": "held@client.test", "tag": None, "tenant_only": False,
                      "until": None}]


def test_subprocessors_notices_and_an_objection_through_the_api(api_gateway):
    gw, api = api_gateway
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    reader = _token(gw, "acme", "read")
    status, doc, _ = api.call("GET", "/api/v1/subprocessors", acme)
    assert status == 200 and doc["policy"] is True
    assert [(s["name"], s["region"], s["usable"], s["why_not"])
            for s in doc["subprocessors"]] == [("relay-eu", "EU", True, None)]
    assert api.call("GET", "/api/v1/subprocessors/notices", acme)[1] == {"notices": []}

    path = "/api/v1/subprocessors/relay-eu/objections"
    assert api.call("POST", path, reader, {})[0] == 403
    assert api.call("POST", "/api/v1/subprocessors/relay-xx/objections", acme, {})[0] == 404
    status, doc, _ = api.call("POST", path, acme, {"note": "by letter"})
    assert (status, doc) == (201, {"subprocessor": "relay-eu", "note": "by letter",
                                   "usable": False})
    mine = api.call("GET", "/api/v1/subprocessors", acme)[1]["subprocessors"][0]
    assert (mine["usable"], mine["why_not"]) == (False, "tenant acme objected to relay-eu")
    theirs = api.call("GET", "/api/v1/subprocessors", globex)[1]["subprocessors"][0]
    assert theirs["usable"] is True
    listed = json.loads(gw.cli("subprocessors", "list", "--json", check=True).stdout)
    assert listed["tenants"]["acme"]["relay-eu"] == "tenant acme objected to relay-eu"
    assert listed["tenants"]["globex"]["relay-eu"] == "usable"
    [event] = _audit(gw, "subprocessor.objection")
    assert (event["actor"], event["tenant"], event["detail"]) == (
        f"api:{acme.split('_')[1]}", "acme", {"subprocessor": "relay-eu", "note": "by letter"})


def test_audit_events_are_paged_in_both_directions_and_filtered(api_gateway):
    gw, api = api_gateway
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    for _ in range(5):
        api.call("GET", "/api/v1/users", acme)
    api.call("POST", "/api/v1/erasures", acme, {"subject": SUBJECT, "dry_run": True})
    api.call("POST", "/api/v1/erasures", acme, {"subject": "bob@client.test"})

    everything = [e["id"] for e in json.loads(gw.cli("audit", "list", "--tenant", "acme",
                                                     "--json", check=True).stdout)]
    # backwards from the newest page, then forwards from the oldest
    page = api.call("GET", "/api/v1/audit?limit=3", acme)[1]
    assert page["newer"] is None
    backwards = [e["id"] for e in page["events"]]
    while page["older"]:
        page = api.call("GET", f"/api/v1/audit?limit=3&before={page['older']}", acme)[1]
        backwards = [e["id"] for e in page["events"]] + backwards
    # the calls made while paging are audited too, after the first page was read
    assert backwards == everything[:len(backwards)] and len(backwards) >= len(everything) - 1
    page = api.call("GET", f"/api/v1/audit?limit=4&after=0&before={everything[-1] + 1}",
                    acme)[1]
    forwards = [e["id"] for e in page["events"]]
    while page["newer"]:
        page = api.call("GET", f"/api/v1/audit?limit=4&after={page['newer']}"
                               f"&before={everything[-1] + 1}", acme)[1]
        forwards += [e["id"] for e in page["events"]]
    assert forwards == everything
    theirs = {e["id"] for e in api.call("GET", "/api/v1/audit?limit=1000", globex)[1]["events"]}
    assert not theirs & set(everything)

    erasures = api.call("GET", "/api/v1/audit?action=subject", acme)[1]["events"]
    assert [e["action"] for e in erasures] == ["subject.erase"]
    about_bob = api.call("GET", "/api/v1/audit?subject=BOB@client.test", acme)[1]["events"]
    assert [e["action"] for e in about_bob] == ["subject.erase"]
    assert api.call("GET", "/api/v1/audit?subject=jane.doe@sender.test", acme)[1]["events"] == []
    gets = api.call("GET", "/api/v1/audit?action=api.get&limit=1000", acme)[1]["events"]
    assert len(gets) >= 5 and {e["action"] for e in gets} == {"api.get"}
    since = gets[2]["at"]
    newer = api.call("GET", "/api/v1/audit?action=api.get&limit=1000&since="
                     + urllib.parse.quote(since), acme)[1]["events"]
    assert newer and all(e["at"] >= since for e in newer) and len(newer) < len(gets)


@pytest.mark.sqlite_only  # the daemon's timer: any database
def test_an_export_archive_expires(make_gateway, tmp_path):
    port = free_port()
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}", "export_expiry": "3s"}})
    with gw.smtp() as s:
        s.sendmail(SUBJECT, ["support@acme.test"], b"Subject: kept\r\n\r\nkept\r\n")
    gw.wait_processed(1)
    api, token = test_api.Api(port), _token(gw, "acme", "export,read")
    export_id = api.call("POST", "/api/v1/exports", token, {})[1]["id"]
    done = wait_for(lambda: api.call("GET", f"/api/v1/exports/{export_id}", token)[1]
                    if api.call("GET", f"/api/v1/exports/{export_id}", token)[1]["status"]
                    == "done" else None, what="the export")
    archive = gw.directory / "var" / "exports" / "acme" / f"{export_id}.tar"
    assert done["bytes"] > 0 and archive.is_file()
    assert api.call("GET", f"/api/v1/exports/{export_id}/archive", token)[0] == 200

    gone = wait_for(lambda: (doc := api.call("GET", f"/api/v1/exports/{export_id}",
                                             token)[1])["status"] == "removed" and doc,
                    what="the expiry")
    assert gone["error"] == "expired (admin_api.export_expiry)"
    wait_for(lambda: not archive.exists(), what="the archive deleted")
    status, doc, _ = api.call("GET", f"/api/v1/exports/{export_id}/archive", token)
    assert status == 404 and "expired" in doc["error"]


def test_the_record_of_processing_states_what_the_gateway_holds(make_gateway, tmp_path,
                                                                 relay):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "retention.yaml").write_text(
        "default: 1y\ntags:\n  support: {keep: 2y, description: support requests}\n"
        "tenants:\n  acme: {tags: [support]}\n"
        "holds:\n  - {name: case-9, reason: court, tenant: acme}\n")
    (policies / "subprocessors.yaml").write_text(
        test_api.SUBPROCESSORS.format(port=relay.port))
    port = free_port()
    gw = make_gateway({"policies": {"directory": str(policies)},
                       "admin_api": {"listen": f"127.0.0.1:{port}"}})
    with gw.smtp() as s:
        for to in ("support@acme.test", "billing@acme.test", "x@globex.test"):
            s.sendmail(SUBJECT, [to], f"To: {to}\r\nSubject: s\r\n\r\nbody\r\n".encode())
    gw.wait_processed(3)
    api = test_api.Api(port)
    acme, globex = _token(gw, "acme", "read"), _token(gw, "globex", "read")

    status, doc, _ = api.call("GET", "/api/v1/processing-record", acme)
    assert status == 200 and (doc["tenant"], doc["tenant_name"]) == ("acme", "Acme")
    assert doc["privacy_contact"] == "dpo@customer.test"
    categories = {c["tag"]: c for c in doc["categories"]}
    assert categories[None]["messages"] == 2 and categories[None]["bytes"] > 0
    assert (categories["support"]["category"], categories["support"]["messages"]) == (
        "support requests", 2)
    assert doc["retention"]["default"]["keep"] == "1y"
    assert doc["retention"]["tags"]["support"]["keep"] == "2y"
    assert doc["retention"]["legal_holds"] == ["case-9"]
    assert [(s["name"], s["region"], s["outside_eea"], s["in_use"])
            for s in doc["subprocessors"]] == [("relay-eu", "EU", False, True)]
    assert doc["security"]["encryption_at_rest"] is False
    assert doc["counts"]["messages"] == {"inbound": 2}
    assert doc["counts"]["addresses"] == 3  # jane, support@, billing@
    assert doc["not_stated"]  # what only the controller can say is named as such

    theirs = api.call("GET", "/api/v1/processing-record", globex)[1]
    assert theirs["counts"]["messages"] == {"inbound": 1}
    assert theirs["retention"]["legal_holds"] == []
    status, text, headers = api.call("GET", "/api/v1/processing-record?format=markdown", acme)
    assert status == 200 and headers["Content-Type"].startswith("text/markdown")
    assert text.decode().startswith("# Record of processing: Acme (acme)\n")
    assert "| support requests | support | 2 |" in text.decode()
    printed = gw.cli("processing-record", "--tenant", "acme", check=True).stdout.decode()
    assert printed.split("Generated")[0] == text.decode().split("Generated")[0]
    as_json = json.loads(gw.cli("processing-record", "--tenant", "acme", "--json",
                                check=True).stdout)
    assert as_json["categories"] == doc["categories"]


def test_a_tenant_places_a_legal_hold_that_erasure_and_deletion_respect(api_gateway):
    gw, api = api_gateway
    admin, reader = _token(gw, "acme", "admin"), _token(gw, "acme", "read")
    globex = _token(gw, "globex", "admin")
    hold = {"name": "audit-2026", "reason": "tax audit", "address": "Bob@client.test"}
    assert api.call("POST", "/api/v1/holds", reader, hold)[0] == 403
    assert api.call("POST", "/api/v1/holds", admin, {**hold, "tag": "nope"})[0] == 409
    assert api.call("POST", "/api/v1/holds", admin, {**hold, "until": "2020-01-01"})[0] == 409
    assert api.call("POST", "/api/v1/holds", admin, {**hold, "until": "20991231"})[0] == 400
    status, doc, _ = api.call("POST", "/api/v1/holds", admin, hold)
    assert status == 201 and doc["name"] == "audit-2026"
    hold_id = doc["id"]
    assert api.call("POST", "/api/v1/holds", admin, hold)[0] == 409  # in force already
    mine = api.call("GET", "/api/v1/holds", admin)[1]["holds"]
    assert {(h["placed_by"], h["name"], h["address"]) for h in mine} == {
        ("gateway", "case-9", "held@client.test"), ("tenant", "audit-2026", "bob@client.test")}
    theirs = api.call("GET", "/api/v1/holds", globex)[1]["holds"]
    assert [h["name"] for h in theirs] == ["case-9"]
    assert api.call("DELETE", f"/api/v1/holds/{hold_id}", globex)[0] == 404

    bob = next(m["id"] for m in gw.messages(tenant="acme") if m["subject"] == "acme from bob")
    status, doc, _ = api.call("POST", "/api/v1/erasures", admin,
                              {"subject": "bob@client.test"})
    assert status == 409 and "legal hold audit-2026" in doc["error"]
    assert api.call("DELETE", f"/api/v1/messages/{bob}", admin)[0] == 409
    detail = api.call("GET", f"/api/v1/messages/{bob}", admin)[1]
    assert detail["retention"]["held_by"] == ["audit-2026"]
    shown = json.loads(gw.cli("messages", "show", bob, "--json", check=True).stdout)
    assert shown["held_by"] == ["audit-2026"]

    status, doc, _ = api.call("DELETE", f"/api/v1/holds/{hold_id}", admin)
    assert (status, doc) == (200, {"id": hold_id, "released": True})
    assert api.call("POST", "/api/v1/erasures", admin, {"subject": "bob@client.test"})[0] \
        == 200
    assert gw.store.get_message(bob) is None
    assert [e["action"] for e in _audit(gw, "hold")] == ["hold.place", "hold.release"]
