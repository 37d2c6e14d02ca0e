"""Data-subject requests that reached the processor: recorded, forwarded with a copy to
the tenant's privacy contact through the delivery queue, due a month after they arrived,
and fulfilled by the export or erasure of the person (CLI and admin API alike)."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import free_port, metrics_port, samples, value, wait_for
from tests.test_api import Api, _token
from tests.test_incident import SUBPROCESSORS

JANE = "jane.doe@sender.test"


def _gateway(make_gateway: Any, tmp_path: Any, relay: Any) -> tuple[Any, Api]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "subprocessors.yaml").write_text(SUBPROCESSORS.format(port=relay.port))
    port = free_port()
    gw = make_gateway({"policies": {"directory": str(policies)},
                       "delivery": {"poll_interval": "0.2s"},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
                       "admin_api": {"listen": f"127.0.0.1:{port}"}})
    return gw, Api(port)


def _requests(gw: Any) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(
        gw.cli("request", "list", "--json", check=True).stdout)}


def test_a_request_is_forwarded_tracked_and_fulfilled_by_the_export_or_erasure(
        make_gateway, tmp_path, relay):
    gw, api = _gateway(make_gateway, tmp_path, relay)
    with gw.smtp() as s:
        s.sendmail(JANE, ["support@acme.test"], b"Subject: hello\r\n\r\nhello\r\n")
    gw.wait_processed(1)
    letter = tmp_path / "request.txt"
    letter.write_text("Dear processor,\nplease tell me what you hold about me, and erase it.\n"
                      "Jane Doe\n")
    received = datetime(2026, 11, 20, 10, tzinfo=UTC)  # a month later: 20 December
    for kind in ("access", "erasure"):
        out = gw.cli("request", "record", "--tenant", "acme", "--kind", kind, "--subject",
                     "Jane.Doe@sender.test", "--received", received.isoformat(),
                     "--file", str(letter), check=True).stdout.decode()
        assert f"({kind}) recorded and forwarded to dpo@customer.test; due by " \
               "2026-12-20T10:00:00+00:00" in out
    # the forwards reach the privacy contact, the request quoted
    forwards = relay.wait(2)
    assert [m.rcpt_tos for m in forwards] == [["dpo@customer.test"]] * 2
    assert b"Kind: access" in forwards[0].data and b"> please tell me what you hold" \
        in forwards[0].data
    wait_for(lambda: {r["forward"] for r in _requests(gw).values()} == {"sent"},
             what="both forwards delivered")

    def gauges() -> tuple[float, float]:
        _, values = samples(metrics_port(gw))
        return (value(values, "mailflowr_gateway_subject_requests_open"),
                value(values, "mailflowr_gateway_subject_request_deadline_seconds"))

    wait_for(lambda: gauges()[0] == 2, what="two open requests")
    due = (datetime(2026, 12, 20, 10, tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    assert abs(gauges()[1] - due) < 60

    # an export of the person answers the access request, an erasure the other
    gw.cli("export", "--tenant", "acme", "--subject", JANE, "--out",
           str(tmp_path / "jane.zip"), check=True)
    requests = _requests(gw)
    assert (requests[1]["status"], requests[1]["fulfilled_by"]) == (
        "fulfilled", "export (command line)")
    assert requests[2]["status"] == "open"
    token = _token(gw, "acme", "erase,read")
    status, doc, _ = api.call("POST", "/api/v1/erasures", token, {"subject": JANE})
    assert status == 200 and doc["messages"] == 1
    requests = _requests(gw)
    assert (requests[2]["status"], requests[2]["fulfilled_by"]) == ("fulfilled", "erasure")
    wait_for(lambda: gauges() == (0, 0), what="nothing open")

    # the tenant's tools see them; another tenant's do not
    mine = api.call("GET", "/api/v1/requests", token)[1]["requests"]
    assert [(r["id"], r["kind"], r["status"]) for r in mine] == [
        (2, "erasure", "fulfilled"), (1, "access", "fulfilled")]
    theirs = api.call("GET", "/api/v1/requests", _token(gw, "globex", "read"))[1]
    assert theirs == {"requests": []}
    # the audit log names the person only by a keyed hash
    events = [e for e in gw.store.audit_events("acme") if e["action"].startswith("request.")]
    assert [e["action"] for e in events] == ["request.record", "request.record",
                                             "request.fulfil", "request.fulfil"]
    assert "jane" not in json.dumps([e["detail"] for e in events]).lower()
    again = gw.cli("request", "close", "1", "--note", "answered")
    assert again.returncode == 1 and b"no open request 1" in again.stderr


def test_request_input_is_checked(make_gateway, tmp_path, relay):
    gw, _ = _gateway(make_gateway, tmp_path, relay)
    letter = tmp_path / "request.txt"
    letter.write_text("Please erase my data.\n")
    now = datetime.now(UTC)

    def run(*args: str) -> Any:
        return gw.cli("request", "record", "--tenant", "acme", "--subject", JANE,
                      "--file", str(letter), *args)

    bogus = run("--kind", "bogus", "--received", now.isoformat())
    assert bogus.returncode == 2 and b"invalid choice: 'bogus'" in bogus.stderr
    future = run("--kind", "erasure", "--received", (now + timedelta(days=1)).isoformat())
    assert future.returncode == 1 and b"is in the future" in future.stderr
    nobody = gw.cli("request", "record", "--tenant", "nobody", "--subject", JANE, "--kind",
                    "access", "--received", now.isoformat(), "--file", str(letter))
    assert nobody.returncode == 1 and b"no tenant 'nobody'" in nobody.stderr
    for r in (bogus, future, nobody):
        assert b"Traceback" not in r.stderr
    closed = run("--kind", "other", "--received", now.isoformat())
    assert closed.returncode == 0
    gw.cli("request", "close", "1", "--note", "answered by letter", check=True)
    [row] = json.loads(gw.cli("request", "list", "--json", check=True).stdout)
    assert (row["status"], row["fulfilled_by"]) == ("closed", "answered by letter")


def test_a_request_through_the_api_is_recorded_forwarded_and_checked(make_gateway, tmp_path,
                                                                      relay):
    """A tenant's own channel (a web form, a helpdesk) hands a request to the processor
    through the API: the same record, forward and audit as ``request record``."""
    gw, api = _gateway(make_gateway, tmp_path, relay)
    admin, reader = _token(gw, "acme"), _token(gw, "acme", "read")
    received = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
    ask = {"kind": "portability", "subject": "Jane.Doe@sender.test",
           "text": "Please send me my data in a portable form.\nJane",
           "received_at": received.isoformat()}
    status, doc, _ = api.call("POST", "/api/v1/requests", admin, ask)
    assert status == 201, doc
    assert (doc["kind"], doc["subject"], doc["status"]) == (
        "portability", "Jane.Doe@sender.test", "open")
    assert doc["received_at"] == received.isoformat()
    assert doc["due_at"].startswith((received + timedelta(days=28)).date().isoformat()[:7])
    [forward] = relay.wait(1)
    assert forward.rcpt_tos == ["dpo@customer.test"]
    assert b"Kind: portability" in forward.data and b"> Please send me my data" in forward.data
    listed = wait_for(lambda: [r for r in api.call("GET", "/api/v1/requests", reader)[1]
                               ["requests"] if r["forward"] == "sent"], what="forwarded")
    assert [r["id"] for r in listed] == [doc["id"]]
    events = [e for e in gw.store.audit_events("acme") if e["action"] == "request.record"]
    assert [e["actor"] for e in events] == [f"api:{admin.split('_')[1]}"]
    assert "jane" not in json.dumps(events[0]["detail"]).lower()

    # a read token may not; bad fields are 400; what cannot be is 409
    assert api.call("POST", "/api/v1/requests", reader, ask)[0] == 403
    for bad, field in (({**ask, "kind": "gossip"}, "kind"), ({**ask, "subject": "jane"}, "subject"),
                       ({**ask, "text": " \n"}, "text"),
                       ({**ask, "received_at": "yesterday"}, "received_at"),
                       ({**ask, "extra": 1}, "extra")):
        status, doc, _ = api.call("POST", "/api/v1/requests", admin, bad)
        assert status == 400 and field in doc["error"], (bad, doc)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    status, doc, _ = api.call("POST", "/api/v1/requests", admin, {**ask, "received_at": later})
    assert status == 409 and "in the future" in doc["error"]
    assert len(json.loads(gw.cli("request", "list", "--json", check=True).stdout)) == 1


PROCESSOR = {"name": "The processor", "domains": ["processor.test"],
             "addresses": ["privacy@processor.test"]}


def test_a_request_by_mail_is_recorded_and_forwarded_or_waits_for_its_tenant(
        make_gateway, tmp_path, relay):
    """Mail to privacy.request_address is a request: to privacy+acme@ it goes to acme's
    privacy contact at once; one that names no tenant waits, counted, until assigned."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "subprocessors.yaml").write_text(SUBPROCESSORS.format(port=relay.port).replace(
        "routing:", "  processor: {privacy_contact: dpo@processor.test, authorised: all}\n"
                    "routing:"))
    gw = make_gateway({"policies": {"directory": str(policies)},
                       "pipeline": {"poll_interval": "0.2s"},
                       "delivery": {"poll_interval": "0.2s"},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
                       "privacy": {"request_address": "privacy@processor.test"},
                       "tenants": {"processor": PROCESSOR}})
    letters = [
        (JANE, "privacy+ACME@processor.test", "Jane Doe <jane.doe@sender.test>",
         "Please send me all you hold about me."),
        ("bob@client.test", "privacy+nobody@processor.test", "bob@client.test",
         "Erase me from the helpdesk of the shop where I bought a kettle.\r\nGr\u00fc\u00dfe"),
        ("carol@client.test", "support@acme.test", "carol@client.test", "not a request")]
    with gw.smtp() as s:
        for sender, to, header, body in letters:
            assert s.sendmail(sender, [to], f"From: {header}\r\nTo: {to}\r\nSubject: my data"
                                            f"\r\nContent-Type: text/plain; charset=utf-8"
                                            f"\r\n\r\n{body}\r\n".encode()) == {}
    [forward] = relay.wait(1)
    assert forward.rcpt_tos == ["dpo@customer.test"]
    assert b"Person: jane.doe@sender.test" in forward.data
    assert b"> Please send me all you hold about me." in forward.data
    assert b"> Subject: my data" in forward.data
    # with a copy: the mail itself, attached whole
    parts = list(email.message_from_bytes(forward.data, policy=email.policy.default)
                 .iter_attachments())
    assert [p.get_content_type() for p in parts] == ["message/rfc822"]
    original = parts[0].get_content()
    assert (original["From"], original["To"]) == ("Jane Doe <jane.doe@sender.test>",
                                                  "privacy+ACME@processor.test")
    assert "Please send me all you hold" in original.get_content()

    def listed() -> dict[int, dict[str, Any]]:
        return _requests(gw)

    rows = wait_for(lambda: listed() if len(listed()) == 2 and all(
        r["status"] != "received" for r in listed().values()) else None, what="both read")
    assert [(r["tenant"], r["kind"], r["status"], r["subject"]) for r in rows.values()] == [
        ("", "other", "unassigned", "bob@client.test"),
        ("acme", "other", "open", "jane.doe@sender.test")]
    assert "request 2 by mail names no tenant" in gw.log()
    wait_for(lambda: value(samples(metrics_port(gw))[1],
                           "mailflowr_gateway_subject_requests_open") == 2, what="the gauge")
    shown = gw.cli("request", "list", "--open", check=True).stdout.decode()
    assert shown.splitlines()[1].split()[:4] == ["2", "-", "other", "unassigned"]

    # the operator reads it and names the tenant: forwarded, as an erasure request
    out = gw.cli("request", "assign", "2", "--tenant", "globex", "--kind", "erasure",
                 check=True).stdout.decode()
    assert "request 2 (erasure) forwarded to dpo@globex.test for tenant globex" in out
    second = wait_for(lambda: [m for m in relay.messages if m.rcpt_tos == ["dpo@globex.test"]],
                      what="the second forward")
    assert b"Kind: erasure" in second[0].data and b"> Erase me from the helpdesk" \
        in second[0].data
    [attached] = email.message_from_bytes(second[0].data, policy=email.policy.default
                                          ).iter_attachments()
    assert "Gr\u00fc\u00dfe" in attached.get_content().get_content()  # 8-bit text, intact
    row = listed()[2]
    assert (row["tenant"], row["kind"], row["status"]) == ("globex", "erasure", "open")
    again = gw.cli("request", "assign", "2", "--tenant", "acme", "--kind", "access")
    assert again.returncode == 1 and b"no request 2 by mail waits" in again.stderr
    # an erasure of the person in globex answers it
    gw.cli("erase", "--tenant", "globex", "--subject", "bob@client.test", check=True)
    assert listed()[2]["status"] == "fulfilled"
    events = [(e["action"], e["actor"], e["tenant_id"]) for e in gw.store.audit_events()
              if e["action"].startswith("request.")]
    assert events[:3] == [("request.record", "gateway", "acme"),
                          ("request.unassigned", "gateway", None),
                          ("request.record", events[2][1], "globex")]
    assert events[2][1] != "gateway"  # the operator who assigned it
    # the mail itself is the processor's, kept under its retention like any other
    assert len(gw.messages(tenant="processor")) == 2


def test_the_request_address_must_be_one_the_gateway_receives(gateway):
    for address, said in (("privacy@nowhere.test", "no tenant has the domain nowhere.test"),
                          ("privacy@acme.test", "add it to the addresses of tenant acme"),
                          ("privacy+x@acme.test", "is not a plain address")):
        checked = gateway.cli("check", env={"MAILFLOWR_PRIVACY__REQUEST_ADDRESS": address})
        assert checked.returncode != 0 and said.encode() in checked.stderr, checked.stderr
        assert b"Traceback" not in checked.stderr
    # globex takes all of its domain's mail
    assert gateway.cli("check", env={"MAILFLOWR_PRIVACY__REQUEST_ADDRESS":
                                     "privacy@globex.test"}).returncode == 0


def test_a_request_by_mail_in_html_only_is_forwarded_as_its_text():
    from gateway.privacy.requests import letter

    raw = (b"From: Jane <jane@client.test>\r\nSubject: my data\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><head><style>p {}</style>"
           b"</head><body><p>Please erase &amp; confirm.</p><script>x()</script></body>"
           b"</html>\r\n")
    person, text = letter(raw, "bounce@client.test")
    assert person == "jane@client.test"
    assert text == "From: Jane <jane@client.test>\nSubject: my data\n\nPlease erase & confirm."
    plain = b"From: jane@client.test\r\nSubject: x\r\n\r\nerase me\r\n"
    assert letter(plain, "b@client.test")[1] == "From: jane@client.test\nSubject: x\n\nerase me\n"
    broken = b"Content-Type: multipart/mixed\r\n\r\nno boundary at all"
    assert letter(broken, "b@client.test")[1].endswith("no boundary at all")
