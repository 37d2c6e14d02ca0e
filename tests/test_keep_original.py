"""Keep-original: the untouched original on the customer's own server (real Dovecot).

The gateway runs as a child process; mail goes in over SMTP; what arrived is read
from Dovecot with imaplib, and the queue from the database and ``queue list``.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import update

from gateway.store.models import deliveries
from tests.conftest import wait_for

PW_ENV = {"MAILFLOWR_TEST_IMAP_PW": "secret"}
ORIGINAL = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
            b"Message-ID: <kept-1@sender.test>\r\nSubject: keep me\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            b"Caf\xc3\xa9 body.\r\n.leading dot\r\n")


def keep_gateway(make_gateway, tmp_path, dovecot, user, keep=None, rules=None, relay=None,
                 **delivery):
    overrides = {
        "imap_accounts": {"customer": dovecot.account(user)},
        "tenants": {"acme": {"keep_original": {"imap": "customer", "folder": "Kept/Gateway",
                                               "flags": ["\\Seen", "$Gateway"], **(keep or {})}}},
        "delivery": {"poll_interval": "0.2s", "retry_base": "1s", "retry_max": "2s",
                     **({"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none"} if relay
                        else {}), **delivery},
    }
    if rules is not None:
        policies = tmp_path / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "workflows.yaml").write_text(rules)
        overrides["policies"] = {"directory": str(policies)}
    gw = make_gateway(overrides, start=False)
    return gw.start(env=PW_ENV)


def appends(gw):
    return [d for d in gw.store.list_deliveries() if d["kind"] == "append"]


def sent_appends(gw, count, timeout=30):
    return wait_for(lambda: len([d for d in appends(gw) if d["status"] == "sent"]) >= count
                    and appends(gw), timeout, "appends sent")


def test_original_lands_byte_exact_with_flags_in_a_created_folder(make_gateway, tmp_path,
                                                                  dovecot, relay):
    user = dovecot.user()
    rules = """
tenants:
  acme:
    rules:
      - name: copy
        match: {recipient: "support@acme.test"}
        actions: {cc: [boss@partner.test]}
"""
    gw = keep_gateway(make_gateway, tmp_path, dovecot, user, rules=rules, relay=relay)
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], ORIGINAL)
    rows = sent_appends(gw, 1)
    assert [(r["recipient"], r["destination"], r["rule"]) for r in rows] == [
        ("Kept/Gateway", "customer", "(keep_original)")]
    kept = dovecot.contents(user, "Kept/Gateway")
    assert len(kept) == 1
    _, flags, data = kept[0]
    assert data == ORIGINAL  # byte for byte: no Received, no Authentication-Results
    assert set(flags) - {b"\\Recent"} == {b"\\Seen", b"$Gateway"}
    # the copy still went out, with our trace header; the kept one did not get it
    copy = relay.wait(1)[0]
    assert b"Received: from" in copy.data and copy.data.endswith(ORIGINAL[-30:])
    assert dovecot.contents(user, "INBOX") == []
    listing = gw.cli("queue", "list", "--all").stdout.decode()
    assert "append" in listing and "customer:Kept/Gateway" in listing


def test_retried_until_the_server_is_back(make_gateway, tmp_path, own_dovecot):
    user = own_dovecot.user()  # the server is not running yet
    gw = keep_gateway(make_gateway, tmp_path, own_dovecot, user)
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], ORIGINAL)
    deferred = wait_for(lambda: [d for d in appends(gw) if d["attempts"] >= 1], 30,
                        "a failed attempt")
    assert deferred[0]["status"] == "pending"
    assert "refused" in deferred[0]["last_error"].lower()
    listed = json.loads(gw.cli("queue", "list", "--json").stdout)
    assert [(d["kind"], d["status"]) for d in listed] == [("append", "pending")]
    status = json.loads(gw.cli("imap", "status", "--json").stdout)["keep_original"]
    assert [(k["tenant"], k["account"], k["folder"], k["pending"], k["sent"]) for k in status] \
        == [("acme", "customer", "Kept/Gateway", 1, 0)]
    assert "refused" in status[0]["last_error"].lower() and status[0]["last_success_at"] is None
    assert not deferred[0]["uncertain"]  # nothing reached the server: no need to look
    own_dovecot.start()
    sent_appends(gw, 1)
    assert [c[2] for c in own_dovecot.contents(user, "Kept/Gateway")] == [ORIGINAL]
    status = json.loads(gw.cli("imap", "status", "--json").stdout)["keep_original"]
    assert (status[0]["pending"], status[0]["sent"], status[0]["last_error"]) == (0, 1, None)
    assert status[0]["last_success_at"] is not None
    text = gw.cli("imap", "status").stdout.decode()
    assert "acme customer:Kept/Gateway: 1 appended, backlog 0" in text


def _interrupt(gw, row_id, **values):
    """Put a delivery back as a crash would have left it."""
    with gw.store.engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.id == row_id).values(
            status="pending", next_attempt_at=deliveries.c.created_at, **values))


def test_no_second_copy_after_a_crash_between_append_and_bookkeeping(make_gateway, tmp_path,
                                                                      dovecot):
    user = dovecot.user()
    gw = keep_gateway(make_gateway, tmp_path, dovecot, user)
    hostile = ORIGINAL.replace(b"<kept-1@sender.test>", b'<a" OR ALL \\"x@sender.test>')
    no_id = b"From: b@sender.test\r\nSubject: no id\r\n\r\nbody\r\n"
    with gw.smtp() as s:
        for data in (ORIGINAL, hostile, no_id):
            s.sendmail("alice@sender.test", ["support@acme.test"], data)
    rows = sent_appends(gw, 3)
    assert len(dovecot.contents(user, "Kept/Gateway")) == 3
    # The daemon died after the server's OK, before the result was written (its lease
    # was left behind), or the OK was lost with the connection (recorded as uncertain).
    for i, row in enumerate(rows):
        if i % 2:
            _interrupt(gw, row["id"], lease_owner="gone:1", lease_until=row["created_at"])
        else:
            _interrupt(gw, row["id"], uncertain=True)
    done = sent_appends(gw, 3)
    # each was tried exactly once more than before the crash (counted from what the
    # first round recorded: on a busy machine a first append can itself take a retry)
    assert [d["attempts"] for d in done] == [r["attempts"] + 1 for r in rows]
    assert not any(d["uncertain"] for d in done)
    kept = dovecot.contents(user, "Kept/Gateway")
    assert sorted(c[2] for c in kept) == sorted([ORIGINAL, hostile, no_id])
    # and a job whose attempt never reached the server is appended on its retry
    conn = dovecot.client(user)
    conn.select('"Kept/Gateway"')
    conn.uid("STORE", "1:*", "+FLAGS", "(\\Deleted)")
    conn.expunge()
    conn.logout()
    _interrupt(gw, rows[0]["id"], attempts=2)
    wait_for(lambda: len(dovecot.contents(user, "Kept/Gateway")) == 1, 30, "appended again")


def test_keep_only_what_a_rule_keeps_and_relay_by_smtp(make_gateway, tmp_path, dovecot, sinks):
    relay, own_server = sinks
    rules = """
tenants:
  acme:
    rules:
      - name: keep-billing
        match: {recipient: "billing@acme.test"}
        actions: {keep_original: true}
"""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "workflows.yaml").write_text(rules)
    gw = make_gateway({
        "policies": {"directory": str(policies)},
        "destinations": {"own": {"host": "127.0.0.1", "port": own_server.port, "tls": "none"}},
        "tenants": {"acme": {"keep_original": {"destination": "own", "all_mail": False}}},
        "delivery": {"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none",
                     "poll_interval": "0.2s"},
    })
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["billing@acme.test", "info@acme-mail.test"], ORIGINAL)
        s.sendmail("alice@sender.test", ["support@acme.test"], ORIGINAL)
    got = own_server.wait(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["billing@acme.test", "info@acme-mail.test"]
    for m in got:
        assert m.mail_from == "alice@sender.test"  # untouched: no SRS
        assert m.data == ORIGINAL  # no trace header, no signature
    gw.wait_processed(2)
    time.sleep(0.5)
    keeps = [d for d in gw.store.list_deliveries() if d["kind"] == "keep"]
    assert len(keeps) == 2 and {d["rule"] for d in keeps} == {"keep-billing"}
    assert len(own_server.messages) == 2  # the support message was not kept
