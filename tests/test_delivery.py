"""Workflow copies and routes, delivered through the durable queue to real SMTP servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.clock import utcnow
from gateway.delivery import journal as journal_module
from gateway.delivery.smtp import PERMANENT, SENT, TEMPORARY, Result, Sender, Target
from gateway.records import NewMessage
from gateway.store import database
from gateway.store.ids import new_id
from gateway.store.repository import Store
from tests.conftest import free_port, settled, simple_message, wait_for

RETENTION = """
default: 1y
tags: {support: 2y, invoice: 7y}
"""

WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copies
        match: {recipient: "support@acme.test"}
        actions:
          cc: [manager@partner.test]
          bcc: [archive@vault.test, hidden@vault.test]
          tag: [support]
      - name: billing
        match: {recipient: "billing@acme.test"}
        actions: {route: finance, tag: [invoice]}
      - name: drop-spam
        match: {header: {Subject: "*SPAM*"}}
        actions: {discard: true}
      - name: no-exe
        match: {attachment_name: "*.exe"}
        actions: {reject: "550 5.7.1 No executables"}
"""


def _gateway(make_gateway, tmp_path, sinks, pipeline=None, metrics=None, **delivery):
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    (policies / "retention.yaml").write_text(RETENTION)
    relay, finance = sinks
    settings = {"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none",
                "poll_interval": "0.2s", "retry_base": "1s", "retry_max": "4s", "timeout": "10s"}
    settings.update(delivery)
    return make_gateway({
        "policies": {"directory": str(policies)},
        "destinations": {"finance": {"host": "127.0.0.1", "port": finance.port, "tls": "none"}},
        "delivery": settings,
        "pipeline": pipeline or {},
        "metrics": metrics or {},
    })


def _send_to_billing(gw):
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["billing@acme.test"], simple_message(to="billing@acme.test"))


def _deliveries(gw, timeout=30, until=lambda rows: True):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = gw.store.list_deliveries()
        if rows and until(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"deliveries did not settle: {gw.store.list_deliveries()}")


def test_cc_and_bcc_copies(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, _ = sinks
    original = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                b"Cc: someone@sender.test\r\nBcc: leaked@sender.test\r\n"
                b"Subject: help\r\n\r\nPlease help.\r\n.leading dot stays\r\n")
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["support@acme.test"], original)
    got = {m.rcpt_tos[0]: m for m in relay.wait(3)}
    assert set(got) == {"manager@partner.test", "archive@vault.test", "hidden@vault.test"}
    for m in got.values():
        assert m.mail_from == "alice@sender.test"
        assert m.data.startswith(b"Received: from ")  # our trace header first
        # dot-stuffed on the wire, so the dot survives the receiver's unstuffing
        assert m.data.endswith(b"\r\n\r\nPlease help.\r\n.leading dot stays\r\n")
        assert b"Bcc" not in m.header_block and b"leaked@" not in m.data
        assert b"\r\n" in m.data and m.data.count(b"\n") == m.data.count(b"\r\n")
        # No Bcc target appears in any delivered header.
        assert b"archive@vault.test" not in m.header_block
        assert b"hidden@vault.test" not in m.header_block
    cc = got["manager@partner.test"].headers
    assert cc["Cc"].split(",")[-1].strip() == "manager@partner.test"
    assert "someone@sender.test" in cc["Cc"]
    assert "manager@partner.test" not in got["archive@vault.test"].headers.get("Cc", "")
    rows = _deliveries(gw, until=lambda rows: all(r["status"] == "sent" for r in rows))
    assert sorted((r["kind"], r["recipient"], r["rule"]) for r in rows) == [
        ("bcc", "archive@vault.test", "copies"), ("bcc", "hidden@vault.test", "copies"),
        ("cc", "manager@partner.test", "copies")]
    assert gw.messages()[0]["tags"] == ["support"]


def test_route_to_a_destination(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, finance = sinks
    _send_to_billing(gw)
    m = finance.wait(1)[0]
    assert m.rcpt_tos == ["billing@acme.test"]
    assert relay.messages == []
    row = _deliveries(gw, until=lambda rows: rows[0]["status"] == "sent")[0]
    assert (row["kind"], row["destination"]) == ("route", "finance")
    assert gw.messages()[0]["tags"] == ["invoice"]


def test_a_delivery_slower_than_its_lease_keeps_it_and_is_sent_once(make_gateway, tmp_path,
                                                                     sinks):
    """The destination takes 4 s to answer the dot; the lease is 1 s.  While the
    attempt goes on its lease is renewed: neither this instance nor another claims
    the delivery again, and the copy is sent once."""
    _, finance = sinks
    finance.handler.delay = 4.0
    gw = _gateway(make_gateway, tmp_path, sinks, lease_time="1s")
    _send_to_billing(gw)
    wait_for(lambda: finance.handler.attempts == 1, what="the attempt to begin")
    deadline = time.monotonic() + 3.0  # three lease times, the copy still on its way
    while time.monotonic() < deadline:
        assert gw.store.claim_deliveries("other-host:1", 10, 60) == []
        time.sleep(0.2)
    assert finance.messages == []  # the probes really ran while the attempt went on
    finance.wait(1)
    row = _deliveries(gw, until=lambda rows: rows[0]["status"] == "sent")[0]
    assert (row["attempts"], row["lease_owner"]) == (1, None)
    time.sleep(1.5)  # nothing is sent again once the lease would have run out
    assert len(finance.messages) == 1 and finance.handler.attempts == 1


def test_discard_and_late_reject_send_nothing(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"],
                   simple_message(subject="buy SPAM now"))
        s.sendmail("a@sender.test", ["support@acme.test"],
                   b"Subject: tool\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                   b"--b\r\nContent-Type: application/octet-stream\r\n"
                   b"Content-Disposition: attachment; filename=run.exe\r\n\r\nMZ\r\n--b--\r\n")
    rows = {r["subject"]: r for r in gw.wait_processed(2)}
    assert rows["buy SPAM now"]["defects"] == ["discarded by rule drop-spam"]
    assert rows["tool"]["defects"][-1] == (
        "rejected by rule no-exe after acceptance: 550 5.7.1 No executables")
    time.sleep(1)
    assert gw.store.list_deliveries() == []
    assert sinks[0].messages == []


def test_temporary_failure_retries_with_backoff(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    _, finance = sinks
    finance.handler.mode = "tempfail"
    _send_to_billing(gw)
    row = _deliveries(gw, until=lambda rows: rows[0]["attempts"] >= 2)[0]
    assert row["status"] == "pending"
    assert row["last_error"].startswith("451 4.3.0")
    due = row["next_attempt_at"].replace(tzinfo=None)
    last = row["last_attempt_at"].replace(tzinfo=None)
    assert timedelta(seconds=1.5) <= due - last <= timedelta(seconds=2.5)  # 1s, then 2s
    listed = json.loads(gw.cli("queue", "list", "--json", check=True).stdout)
    assert listed[0]["reason"].startswith("451 4.3.0") and listed[0]["next_attempt_at"]
    deferred = [ln for ln in gw.log().splitlines() if " deferred queue_id=" in ln]
    assert deferred and all(" code=451 " in ln for ln in deferred)
    # messages show says what became of the message: the rule, each copy and its state
    shown = json.loads(gw.cli("messages", "show", row["message_id"], "--json",
                              check=True).stdout)
    assert shown["rules"] == [row["rule"]]
    [copy] = shown["deliveries"]
    assert (copy["id"], copy["status"], copy["destination"]) == (row["id"], "pending", "finance")
    assert copy["reason"].startswith("451 4.3.0")
    text = gw.cli("messages", "show", row["message_id"], check=True).stdout.decode()
    fields = {line.split(":", 1)[0]: line for line in text.splitlines()}
    assert fields["deliveries"].split()[1:3] == [str(row["id"]), "route"]
    assert "via finance: pending after" in fields["deliveries"]
    # every value starts in one column, however long the longest name
    column = fields["deliveries"].index(str(row["id"]))
    assert {len(line) - len(line[column:].lstrip()) for line in fields.values()} == {column}
    assert fields["retention_policy"].startswith("retention_policy: ")  # not run together
    finance.handler.mode = "accept"
    assert len(finance.wait(1, timeout=15)) == 1
    _deliveries(gw, until=lambda rows: rows[0]["status"] == "sent")


def test_a_server_that_cannot_be_reached_is_logged_without_a_reply_code(make_gateway,
                                                                         tmp_path, sinks):
    """Connection refused: no server answered, so no code (not the 127 of 127.0.0.1)."""
    gw = _gateway(make_gateway, tmp_path, sinks)
    _, finance = sinks
    finance.stop()
    _send_to_billing(gw)
    _deliveries(gw, until=lambda rows: rows[0]["attempts"] >= 1)
    [line] = wait_for(lambda: [ln for ln in gw.log().splitlines()
                               if " deferred queue_id=" in ln], what="the deferral")
    assert " code=" not in line and f"relay=127.0.0.1:{finance.port}" in line, line


def test_dropped_connection_is_temporary(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    _, finance = sinks
    finance.handler.mode = "drop"
    _send_to_billing(gw)
    row = _deliveries(gw, until=lambda rows: rows[0]["attempts"] >= 1)[0]
    assert row["status"] == "pending"
    finance.handler.mode = "accept"
    finance.wait(1, timeout=15)


def test_permanent_failure_fails_once(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    _, finance = sinks
    finance.handler.mode = "permfail"
    _send_to_billing(gw)
    row = _deliveries(gw, until=lambda rows: rows[0]["status"] == "failed")[0]
    assert row["last_error"].startswith("550 5.1.1")
    time.sleep(2.5)
    assert finance.handler.attempts == 1
    # The sender of inbound mail is not known to be genuine: no DSN (no backscatter).
    assert len(gw.messages()) == 1


def test_expired_delivery_fails(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks, max_age="1s")
    _, finance = sinks
    finance.handler.mode = "tempfail"
    _send_to_billing(gw)
    row = _deliveries(gw, until=lambda rows: rows[0]["status"] == "failed")[0]
    assert row["attempts"] >= 2 and row["last_error"].startswith("451")


def test_copies_without_a_relay_are_held_visibly(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks, relay=None)
    assert gw.cli("queue", "list", check=True).stdout.startswith(b"the queue is empty")
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
    rows = _deliveries(gw, until=lambda rows: len(rows) == 3 and all(
        r["status"] == "held" for r in rows))
    assert all("no relay configured" in r["last_error"] for r in rows)
    text = gw.cli("queue", "list", check=True).stdout.decode()
    assert text.count("held") == 3 and "no relay configured" in text
    drop = gw.cli("queue", "drop", str(rows[0]["id"]), "--reason", "not wanted", check=True)
    assert b"dropped" in drop.stdout
    assert gw.store.list_deliveries(status="failed")[0]["last_error"] == "dropped: not wanted"
    assert gw.cli("queue", "drop", "999999").returncode == 1
    retried = gw.cli("queue", "retry", "--all", check=True).stdout
    assert retried.startswith(b"3 deliveries due now")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # its write lock
def test_a_copy_the_relay_took_before_a_kill_is_not_sent_again(make_gateway, tmp_path,
                                                               sinks, backend):
    """The destination answers 250 while the database cannot take the result (its
    write lock held elsewhere); the daemon is killed with SIGKILL before the result
    is recorded.  Started again, it reads what its dead delivery process wrote down
    the moment the 250 came (delivery.journal), records the copy as sent, and the
    destination gets it once, where without the journal the restart would free the
    lease and send it again."""
    _, finance = sinks
    finance.handler.delay = 1.0
    gw = _gateway(make_gateway, tmp_path, sinks)
    _send_to_billing(gw)
    wait_for(lambda: finance.handler.attempts == 1, what="the copy's DATA")
    lock = sqlite3.connect(gw.store.engine.url.database, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the result cannot be written from now on
        journal = gw.directory / "var" / "journal"
        wait_for(lambda: any(p.read_bytes() for p in journal.glob("*.journal")),
                 what="the copy written down")
        assert len(finance.messages) == 1
        gw.kill()
    finally:
        lock.close()
    row = gw.store.list_deliveries()[0]
    assert row["status"] == "pending" and row["lease_owner"] is not None  # not recorded
    gw.start()
    row = _deliveries(gw, until=lambda rows: rows[0]["status"] == "sent")[0]
    assert (row["attempts"], row["lease_owner"]) == (1, None)
    time.sleep(1.0)  # a copy sent again would be in by now
    assert len(finance.messages) == 1 and finance.handler.attempts == 1
    assert "1 copies that process" in gw.log()
    # the dead process's journal is gone; the new one's lists nothing
    assert all(not p.read_bytes() for p in journal.glob("*.journal"))


def test_restart_mid_delivery_loses_and_duplicates_nothing(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, _ = sinks
    relay.handler.mode = "tempfail"
    with gw.smtp() as s:
        for n in range(5):
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject=f"m{n}"))
    _deliveries(gw, until=lambda rows: len(rows) == 15 and all(r["attempts"] for r in rows))
    gw.kill()
    relay.handler.mode = "accept"
    gw.start()
    got = relay.wait(15, timeout=30)
    time.sleep(2)  # anything sent twice would arrive by now
    got = relay.messages
    keys = [(m.rcpt_tos[0], m.headers["Subject"]) for m in got]
    assert len(keys) == 15 and len(set(keys)) == 15
    _deliveries(gw, until=lambda rows: all(r["status"] == "sent" for r in rows))


def test_a_pipeline_process_killed_with_messages_in_hand_is_replaced_and_nothing_is_lost(
        make_gateway, tmp_path, sinks):
    """The pipeline runs in a child process of the daemon.  Killed while the checks of
    the messages it claimed wait on a DNS server that never answers, it is replaced,
    and the new one takes the dead one's messages up at once, not after the lease time
    (5 minutes); the daemon goes on accepting meanwhile; every message is processed
    once and each of its copies arrives once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        gw = _gateway(make_gateway, tmp_path, sinks,
                      dns_servers=[f"127.0.0.1:{silent.getsockname()[1]}"], dns_timeout="1s")
        relay, _ = sinks
        with gw.smtp() as s:
            for n in range(2):
                s.sendmail("a@sender.test", ["support@acme.test"],
                           simple_message(subject=f"m{n}"))
        claimed = wait_for(lambda: {r["id"] for r in gw.messages() if r["lease_owner"]},
                           what="a claim")
        (victim,) = [pid for pid, name in gw.children().items() if name == "mailflowr-pipe"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: f"pipeline process (pid {victim}) ended" in gw.log(),
                 what="the restart")
        with gw.smtp() as s:  # accepting goes on
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="m2"))
        wait_for(lambda: len(relay.messages) >= 9, timeout=30, what="nine copies")
        time.sleep(2)  # a message processed twice would have its copies here by now
    keys = [(m.rcpt_tos[0], m.headers["Subject"]) for m in relay.messages]
    assert len(keys) == 9 and len(set(keys)) == 9, keys
    rows = gw.messages()
    assert [r["status"] for r in rows] == ["processed"] * 3
    # what the dead one had claimed was taken up again, the rest processed once
    assert {r["id"]: r["attempts"] for r in rows} == {
        r["id"]: 2 if r["id"] in claimed else 1 for r in rows}
    names = gw.children().values()
    assert "mailflowr-pipe" in names and victim not in gw.children()
    assert gw.proc.poll() is None


def test_a_pipeline_process_without_work_leaves_and_mail_brings_another(
        make_gateway, tmp_path, sinks):
    """After ``pipeline.max_idle`` without work the pipeline process exits, as
    Postfix's cleanup does: a quiet gateway holds one process fewer.  The next
    message starts another at once (well before the daemon's next look at the
    database, ``poll_interval``), and mail the daemon was not told of (another
    instance's, stored straight into the database) has one started at that look;
    the pipeline's counters carry on from one process to the next."""
    gw = _gateway(make_gateway, tmp_path, sinks,
                  pipeline={"max_idle": "2s", "poll_interval": "8s"},
                  metrics={"listen": f"127.0.0.1:{free_port()}"})
    relay, _ = sinks
    processed = "mailflowr_gateway_pipeline_messages_total"

    def left() -> bool:
        return "mailflowr-pipe" not in gw.children().values()

    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="m0"))
    wait_for(lambda: len(relay.messages) >= 3, what="three copies")
    wait_for(left, timeout=20, what="the idle pipeline process to exit")
    settled(gw, processed, 1, tenant="acme", outcome="processed")  # kept while it is away

    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="m1"))
    wait_for(lambda: len(relay.messages) >= 6, timeout=5, what="six copies, woken")
    settled(gw, processed, 2, tenant="acme", outcome="processed")

    wait_for(left, timeout=20, what="the pipeline process to exit again")
    aside = Store(database.create(gw.db_url, pool_size=1))

    async def store_one() -> None:
        await aside.start()
        await aside.accept([NewMessage(
            id=new_id(), tenant_id="acme", mail_from="a@sender.test",
            recipients=("support@acme.test",), data=simple_message(subject="m2"),
            received_at=utcnow(), client_address="127.0.0.1", helo="other.test",
            protocol="ESMTP", trace_header="", smtputf8=False)])
        await aside.close()

    asyncio.run(store_one())
    aside.engine.dispose()
    wait_for(lambda: len(relay.messages) >= 9, timeout=30, what="nine copies, found")
    time.sleep(1)  # a copy sent twice would be in by now
    keys = [(m.rcpt_tos[0], m.headers["Subject"]) for m in relay.messages]
    assert len(keys) == 9 and len(set(keys)) == 9, keys
    assert [r["status"] for r in gw.messages()] == ["processed"] * 3
    settled(gw, processed, 3, tenant="acme", outcome="processed")
    assert "ended with" not in gw.log() and gw.proc.poll() is None


def test_a_delivery_process_killed_mid_copy_is_replaced_and_nothing_is_lost(
        make_gateway, tmp_path, sinks):
    """Delivery runs in a child process of the daemon.  Killed with copies in flight
    (held by the server before any message data went out), it is replaced, and the new
    one takes up the dead one's copies at once, not after the lease time (5 minutes);
    the daemon goes on accepting meanwhile, and every copy arrives once."""
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, _ = sinks
    relay.handler.hold = True
    with gw.smtp() as s:
        for n in range(2):
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject=f"m{n}"))
    wait_for(lambda: relay.handler.held >= 6, what="six copies held at RCPT")
    (victim,) = [pid for pid, name in gw.children().items() if name == "mailflowr-deliv"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"delivery process (pid {victim}) ended" in gw.log(), what="the restart")
    with gw.smtp() as s:  # accepting goes on
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="m2"))
    relay.handler.hold = False
    wait_for(lambda: len(relay.messages) >= 9, what="nine copies")
    time.sleep(2)  # a copy sent twice would arrive by now
    keys = [(m.rcpt_tos[0], m.headers["Subject"]) for m in relay.messages]
    assert len(keys) == 9 and len(set(keys)) == 9, keys
    assert relay.handler.cut >= 6  # the killed process's copies were cut, not finished
    _deliveries(gw, until=lambda rows: all(r["status"] == "sent" for r in rows))
    names = gw.children().values()
    assert "mailflowr-deliv" in names and victim not in gw.children()
    assert gw.proc.poll() is None


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def test_children_are_forked_by_the_zygote_and_without_it_still_replaced(
        make_gateway, tmp_path, sinks):
    """The pipeline and delivery processes are forked by the daemon's zygote
    (mailflowr-forks), a copy of the daemon made before it opened anything.  When the
    zygote is killed the daemon says so and goes on: a child that dies afterwards is
    replaced by a fresh interpreter, and mail still flows."""
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, _ = sinks
    # a process the zygote has just forked bears its name a moment: until both children
    # have named themselves, a slow machine shows one of them as the zygote
    wait_for(lambda: {"mailflowr-pipe", "mailflowr-deliv"} <= set(gw.children().values()),
             what="both children named")
    procs = gw.children()
    # the daemon's child
    (zygote,) = [pid for pid, name in procs.items()
                 if name == "mailflowr-forks" and _parent(pid) == gw.proc.pid]
    assert _parent(zygote) == gw.proc.pid
    forked = {name: _parent(pid) for pid, name in procs.items()
              if name in ("mailflowr-pipe", "mailflowr-deliv")}
    assert forked == {"mailflowr-pipe": zygote, "mailflowr-deliv": zygote}
    (victim,) = [pid for pid, name in procs.items() if name == "mailflowr-deliv"]
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: f"the zygote (pid {zygote}) is gone" in gw.log(), what="the notice")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"delivery process (pid {victim}) ended" in gw.log(), what="the restart")
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="after"))
    wait_for(lambda: len(relay.messages) >= 3, what="three copies")
    (replaced,) = [pid for pid, name in gw.children().items() if name == "mailflowr-deliv"]
    assert replaced != victim and _parent(replaced) == gw.proc.pid
    assert gw.proc.poll() is None


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_daemons_on_one_database_send_each_delivery_once(make_gateway, tmp_path, sinks,
                                                             backend):
    relay, _ = sinks
    relay.handler.mode = "tempfail"  # let work pile up, so both daemons claim side by side
    first = _gateway(make_gateway, tmp_path, sinks, concurrency=4)
    second = make_gateway(dict(first.config), db_url=first.db_url)
    for n in range(20):
        gw = first if n % 2 else second
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject=f"m{n}"))
    _deliveries(first, until=lambda rows: len(rows) == 60 and all(r["attempts"] for r in rows))
    # a slow server keeps one instance's 4 slots busy, so the other must take its share
    relay.handler.delay = 0.2
    relay.handler.mode = "accept"
    relay.wait(60, timeout=60)
    time.sleep(2)  # a duplicate would arrive by now
    keys = [(m.rcpt_tos[0], m.headers["Subject"]) for m in relay.messages]
    assert len(keys) == 60 and len(set(keys)) == 60
    rows = _deliveries(first, until=lambda rows: all(r["status"] == "sent" for r in rows))
    assert len(rows) == 60
    # both instances did part of the work
    logs = first.log() + second.log()
    assert first.log().count(" delivered queue_id=") > 0, logs[-2000:]
    assert second.log().count(" delivered queue_id=") > 0, logs[-2000:]


MX_WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copies
        match: {recipient: "support@acme.test"}
        actions:
          bcc: [archive@vault.test, x@nowhere.test, y@broken.test, z@nullmx.test,
                w@fallback.test]
"""


def test_copies_by_mx_lookup(make_gateway, tmp_path, sinks):
    from tests.dns_server import ZoneServer

    relay, _ = sinks
    zone = ZoneServer({
        ("vault.test", "MX"): ["10 mx1.vault.test."],
        ("mx1.vault.test", "A"): ["127.0.0.1"],
        ("nullmx.test", "MX"): ["0 ."],
        # the preferred host does not answer on the port; the second one does
        ("fallback.test", "MX"): ["10 down.fallback.test.", "20 up.fallback.test."],
        ("down.fallback.test", "A"): ["127.0.0.3"],
        ("up.fallback.test", "A"): ["127.0.0.1"],
    }, servfail={"broken.test"})
    try:
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "workflows.yaml").write_text(MX_WORKFLOWS)
        gw = make_gateway({
            "policies": {"directory": str(policies)},
            "delivery": {"mx_lookup": True, "dns_servers": [zone.address],
                         "mx_port": relay.port, "dns_timeout": "3s", "poll_interval": "0.2s",
                         "retry_base": "30s"},
        })
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
        rows = {r["recipient"]: r for r in _deliveries(
            gw, until=lambda rows: len(rows) == 5 and all(r["attempts"] for r in rows))}
        assert rows["archive@vault.test"]["status"] == "sent"
        assert rows["w@fallback.test"]["status"] == "sent"
        assert sorted(m.rcpt_tos[0] for m in relay.messages) == [
            "archive@vault.test", "w@fallback.test"]
        assert rows["x@nowhere.test"]["status"] == "failed"
        assert rows["x@nowhere.test"]["last_error"].startswith("550 5.1.2")
        assert rows["z@nullmx.test"]["status"] == "failed"
        assert "null MX" in rows["z@nullmx.test"]["last_error"]
        assert rows["y@broken.test"]["status"] == "pending"  # SERVFAIL: try again later
        assert rows["y@broken.test"]["last_error"].startswith("451 4.4.3")
    finally:
        zone.stop()


def test_required_tls_is_never_downgraded(make_gateway, tmp_path, sinks):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    (policies / "retention.yaml").write_text(RETENTION)
    _, finance = sinks  # a server that offers no STARTTLS
    gw = make_gateway({
        "policies": {"directory": str(policies)},
        "destinations": {"finance": {"host": "127.0.0.1", "port": finance.port,
                                     "tls": "required"}},
        "delivery": {"poll_interval": "0.2s", "retry_base": "30s"},
    })
    _send_to_billing(gw)
    row = _deliveries(gw, until=lambda rows: rows[0]["attempts"] >= 1)[0]
    assert row["status"] == "pending" and "STARTTLS" in row["last_error"]
    assert finance.messages == []


@pytest.mark.parametrize(
    ("kind", "direction", "mail_from", "expected"),
    [
        ("rcpt", "outbound", "support@acme.test", True),
        ("rcpt", "outbound", "", False),  # never to the null sender
        ("cc", "outbound", "support@acme.test", False),  # the tenant's own copies
        ("bcc", "inbound", "someone@else.test", False),  # inbound senders may be forged
        ("route", "inbound", "someone@else.test", False),
    ],
)
def test_who_gets_a_dsn(kind, direction, mail_from, expected):
    from gateway.delivery.dsn import wants_dsn

    assert wants_dsn(kind=kind, direction=direction, mail_from=mail_from) is expected


@pytest.mark.sqlite_only
def test_an_address_with_cr_lf_or_spaces_never_reaches_the_wire(relay):
    """The last guard before the wire, whatever let such an address into a delivery."""

    async def send_all() -> list[str]:
        sender = Sender(helo="mx.gateway.test", reply_timeout=10)
        target = Target("127.0.0.1", relay.port, "none")
        outcomes = []
        for mail_from, rcpt in (("a@sender.test", "x@b.test\r\nRCPT TO:<y@c.test>"),
                                ("a@sender.test\r\nRSET", "x@b.test"),
                                ("a@sender.test", "x y@b.test"),
                                ("a@sender.test", "x@b.test")):
            result = await sender.send(target, sender=mail_from, recipient=rcpt,
                                       data=b"Subject: hi\r\n\r\nhello\r\n")
            outcomes.append(result.outcome)
        await sender.close()
        return outcomes

    assert asyncio.run(send_all()) == [PERMANENT, PERMANENT, PERMANENT, SENT]
    [got] = relay.wait(1)
    assert got.rcpt_tos == ["x@b.test"] and relay.messages == [got]


class _ScriptedRelay:
    """A relay on a raw socket, for what aiosmtpd does not do: it may offer PIPELINING
    (and records which commands came in one read), refuse given recipients, and take
    one message per connection, dropping the connection when the next MAIL FROM comes
    (without a reply, or with ``farewell``): an idle connection the peer closed while
    the gateway still held it."""

    def __init__(self, *, pipelining: bool = False, one_per_connection: bool = False,
                 farewell: bytes | None = None, refuse: dict[bytes, bytes] | None = None,
                 hold: float = 0.0) -> None:
        self.pipelining = pipelining
        self.hold = hold  # seconds before the 250 for a message
        self.one_per_connection = one_per_connection
        self.farewell = farewell
        self.refuse = refuse or {}
        self.connections = 0
        self.messages: list[bytes] = []
        self.reads: list[list[bytes]] = []  # the commands of each read from the socket
        self.open = self.most_open = 0  # connections open now, and at most

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self._session(reader, writer)
        finally:
            self.open -= 1

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        writer.write(b"220 relay.test ESMTP\r\n")
        served = refused = False
        pending = b""
        while chunk := await reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            self.reads.append([line.split(b" ")[0].split(b":")[0].upper() for line in lines])
            for line in lines:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-relay.test\r\n" + extra + b"250 SIZE 1000000\r\n")
                elif verb == b"MAIL" and served and self.one_per_connection:
                    if self.farewell is not None:
                        writer.write(self.farewell)
                        await writer.drain()
                    writer.close()
                    return
                elif verb == b"RCPT" and (why := self.refuse.get(line[9:-1])) is not None:
                    refused = True
                    writer.write(why)
                elif verb == b"DATA" and refused:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    await writer.drain()
                    data = pending + await reader.readuntil(b"\r\n.\r\n")
                    pending = b""
                    self.messages.append(data)
                    served = True
                    await asyncio.sleep(self.hold)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"RSET":
                    refused = False
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        writer.close()


def _send_each(relay: _ScriptedRelay, messages: list[tuple[str, bytes]]) -> list[Result]:
    """Send (recipient, data) pairs one after the other through one Sender."""

    async def run() -> list[Result]:
        server = await asyncio.start_server(relay.session, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = Sender(helo="mx.gateway.test", reply_timeout=10)
        target = Target("127.0.0.1", port, "none")
        results = [await sender.send(target, sender="a@sender.test", recipient=rcpt,
                                     data=data) for rcpt, data in messages]
        await sender.close()
        server.close()
        await server.wait_closed()
        return results

    return asyncio.run(run())


@pytest.mark.sqlite_only
def test_copies_beyond_the_connections_per_server_wait_for_one():
    """Twelve copies at once to one relay, three connections allowed: the relay never
    sees more than three sessions, and every copy arrives on one of them, also when the
    one server is named as two targets (a relay and a destination on the same port)."""
    relay = _ScriptedRelay(pipelining=True, hold=0.05)

    async def run() -> list[Result]:
        server = await asyncio.start_server(relay.session, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sender = Sender(helo="mx.gateway.test", reply_timeout=10, per_server=3)
        targets = [Target("127.0.0.1", port, "none", name="relay"),
                   Target("127.0.0.1", port, "none", name="finance")]
        try:
            return await asyncio.gather(*(
                sender.send(targets[n % 2], sender="a@sender.test", recipient=f"r{n}@b.test",
                            data=f"Subject: {n}\r\n\r\nhi\r\n".encode())
                for n in range(12)))
        finally:
            await sender.close()
            server.close()
            await server.wait_closed()

    results = asyncio.run(run())
    assert [r.outcome for r in results] == [SENT] * 12
    assert sorted(m.split(b"\r\n", 1)[0] for m in relay.messages) == sorted(
        f"Subject: {n}".encode() for n in range(12))
    assert relay.most_open == 3
    assert relay.connections == 3  # kept and reused, not opened per copy


@pytest.mark.sqlite_only
@pytest.mark.parametrize("farewell", [None, b"421 4.4.2 relay.test idle too long\r\n"])
def test_an_idle_connection_the_relay_dropped_is_replaced_once(farewell):
    """Idle connections are reused without a NOOP first; one the relay dropped meanwhile
    fails at MAIL FROM, before any of the message went out, and the message goes on a
    new connection: sent once, not deferred."""
    relay = _ScriptedRelay(one_per_connection=True, farewell=farewell)
    results = _send_each(relay, [("x@b.test", f"Subject: {n}\r\n\r\nhi\r\n".encode())
                                 for n in range(3)])
    assert [r.outcome for r in results] == [SENT, SENT, SENT]
    assert [m.split(b"\r\n", 1)[0] for m in relay.messages] == [
        b"Subject: 0", b"Subject: 1", b"Subject: 2"]
    assert relay.connections == 3


@pytest.mark.sqlite_only
def test_pipelining_sends_the_envelope_in_one_write_and_handles_refusals():
    """With PIPELINING offered, MAIL, RCPT and DATA go out together; a refused recipient
    is a permanent failure with the relay's words, and the connection, reset, carries
    the next message."""
    relay = _ScriptedRelay(pipelining=True,
                           refuse={b"gone@b.test": b"550 5.1.1 <gone@b.test>: unknown\r\n"})
    results = _send_each(relay, [("x@b.test", b"Subject: 1\r\n\r\nhi\r\n"),
                                 ("gone@b.test", b"Subject: 2\r\n\r\nhi\r\n"),
                                 ("y@b.test", b"Subject: 3\r\n\r\nhi\r\n")])
    assert [r.outcome for r in results] == [SENT, PERMANENT, SENT]
    assert results[1].detail == "550 5.1.1 <gone@b.test>: unknown"
    assert [m.split(b"\r\n", 1)[0] for m in relay.messages] == [b"Subject: 1", b"Subject: 3"]
    assert relay.connections == 1
    assert relay.reads.count([b"MAIL", b"RCPT", b"DATA"]) == 3


@pytest.mark.sqlite_only
def test_the_message_arrives_byte_for_byte_with_leading_dots(relay):
    """Dot-stuffing on the way out, undone by the relay: what arrives is what was sent."""
    data = (b".Subject: dots\r\nFrom: a@sender.test\r\n\r\n.one dot\r\n..two dots\r\n"
            b".\r\nlast line without CRLF")

    async def send() -> Result:
        sender = Sender(helo="mx.gateway.test", reply_timeout=10)
        try:
            return await sender.send(Target("127.0.0.1", relay.port, "none"),
                                     sender="a@sender.test", recipient="x@b.test", data=data)
        finally:
            await sender.close()

    assert asyncio.run(send()).outcome == SENT
    [got] = relay.wait(1)
    assert got.data == data + b"\r\n"


@pytest.mark.sqlite_only
@pytest.mark.parametrize("tls", ["opportunistic", "required"])
def test_copies_go_over_starttls_to_a_verified_relay(tls, tls_files, tmp_path, monkeypatch):
    """STARTTLS when the relay offers it, its certificate checked against the trusted
    CAs (here the test CA, as SSL_CERT_FILE names it); an untrusted one gets nothing."""
    import ssl

    from tests.sink import Sink

    ca, chain, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(chain, key)
    sink = Sink(tls_context=server_context)

    async def send(subject: str) -> Result:
        sender = Sender(helo="mx.gateway.test", reply_timeout=10)
        try:
            return await sender.send(Target("127.0.0.1", sink.port, tls),
                                     sender="a@sender.test", recipient="x@b.test",
                                     data=f"Subject: {subject}\r\n\r\nhi\r\n".encode())
        finally:
            await sender.close()

    try:
        untrusted = asyncio.run(send("untrusted"))
        assert untrusted.outcome == TEMPORARY and not untrusted.connected
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        assert asyncio.run(send("trusted")).outcome == SENT
        [got] = sink.wait(1)
        assert got.tls and got.data.startswith(b"Subject: trusted")
    finally:
        sink.stop()


def test_the_journal_keeps_only_what_is_not_recorded_and_is_read_by_host_and_pid(
        tmp_path, monkeypatch):
    """Each copy taken is a line on disk at once; a file goes once all it lists is
    recorded, and a full one makes way for the next.  What a dead process left is
    read per process of this host only (a host whose name has dashes, another host
    whose name begins the same), a line cut short skipped."""
    monkeypatch.setattr(journal_module, "SEGMENT", 8)  # a new file after two lines
    folder = tmp_path / "journal"
    journal = journal_module.Journal(folder, "mx-1")
    journal.open()
    pid = os.getpid()
    journal.sent(101)
    assert (folder / f"mx-1-{pid}-0.journal").read_bytes() == b"101\n"
    journal.sent(102)  # the file is full: the next one begins
    journal.sent(103)
    assert sorted(p.name for p in folder.iterdir()) == [f"mx-1-{pid}-0.journal",
                                                       f"mx-1-{pid}-1.journal"]
    journal.recorded([101])
    assert (folder / f"mx-1-{pid}-0.journal").exists()  # 102 is not recorded yet
    journal.recorded([102, 999])
    assert [p.name for p in folder.iterdir()] == [f"mx-1-{pid}-1.journal"]
    (folder / "mx-1-77-0.journal").write_bytes(b"5\n6\n7")  # 7: cut short
    (folder / "mx-1-78-0.journal").write_bytes(b"8\n")  # a process that still runs
    (folder / "mx-77-0.journal").write_bytes(b"9\n")  # host "mx"? not a journal of ours
    (folder / "mx-1-2-77-0.journal").write_bytes(b"10\n")  # host "mx-1-2"
    left = journal_module.left_behind(folder, "mx-1", lambda p: p in (pid, 78))
    assert {p: ids for p, (ids, _) in left.items()} == {77: [5, 6]}
    assert journal_module.left_behind(folder, "mx", lambda p: False) == {
        77: ([9], [folder / "mx-77-0.journal"])}
    journal.close()  # 103 was never recorded: its file stays for the next start
    assert (folder / f"mx-1-{pid}-1.journal").read_bytes() == b"103\n"
