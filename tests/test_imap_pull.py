"""Mailbox import (tenants.ID.imap_pull) from a real Dovecot, through the real daemon."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import free_port, samples, value, wait_for

PW_ENV = {"MAILFLOWR_TEST_IMAP_PW": "secret"}


def message(n: int, size: int = 0) -> bytes:
    return (f"Return-Path: <sender{n}@sender.test>\r\nFrom: sender{n}@sender.test\r\n"
            f"To: help@customer.test\r\nMessage-ID: <m{n}@sender.test>\r\n"
            f"Subject: message {n}\r\n\r\nBody {n}.\r\n").encode() + b"x" * size


def pull_gateway(make_gateway, dovecot, user, start=True, **source):
    settings = {"account": "customer", "recipient": "support@acme.test", "interval": "1s",
                **source}
    gw = make_gateway({
        "imap_accounts": {"customer": dovecot.account(user)},
        "tenants": {"acme": {"imap_pull": {"helpdesk": settings}}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
    }, start=False)
    return gw.start(env=PW_ENV) if start else gw


def imported(gw):
    return [m for m in gw.messages() if m["protocol"] == "IMAP"]


def wait_imported(gw, count, timeout=30):
    return wait_for(lambda: len(imported(gw)) >= count and imported(gw), timeout,
                    f"{count} imported messages")


def imports(gw, outcome):
    _, values = samples(int(gw.config["metrics"]["listen"].rsplit(":", 1)[1]))
    return value(values, "mailflowr_gateway_imap_imports_total", tenant="acme",
                 source="helpdesk", outcome=outcome)


def originals(gw):
    return sorted(gw.store.raw(m["id"]) for m in imported(gw))


def test_each_message_once_across_restarts_and_keep_leaves_flags(make_gateway, dovecot):
    user = dovecot.user()
    dovecot.fill(user, "INBOX", [message(1), message(2)], flags="\\Flagged")
    dovecot.fill(user, "INBOX", [message(3)])
    gw = pull_gateway(make_gateway, dovecot, user, interval="30s")
    rows = wait_imported(gw, 3)
    assert sorted(originals(gw)) == sorted([message(1), message(2), message(3)])
    stored = gw.store.get_message(rows[0]["id"])
    assert stored["mail_from"].startswith("sender") and stored["direction"] == "inbound"
    for row in rows:  # the digest taken to find copies is the one stored
        assert gw.store.get_message(row["id"])["sha256"] == \
            hashlib.sha256(gw.store.raw(row["id"])).hexdigest()
    assert stored["recipients"] == ["support@acme.test"]
    gw.wait_processed(3)
    # keep: the server's copies are untouched, not even \Seen
    flags = [set(f) - {b"\\Recent"} for _, f, _ in dovecot.contents(user, "INBOX")]
    assert flags == [{b"\\Flagged"}, {b"\\Flagged"}, set()]
    assert gw.terminate() == 0
    gw.start(env=PW_ENV)
    dovecot.fill(user, "INBOX", [message(4)])
    started = time.monotonic()
    wait_imported(gw, 4)
    assert time.monotonic() - started < 20  # IDLE: no 30 s wait for the next round
    time.sleep(1.5)
    assert sorted(originals(gw)) == sorted(message(n) for n in range(1, 5))
    assert len(dovecot.contents(user, "INBOX")) == 4
    assert imports(gw, "imported") == 1  # since the restart
    status = json.loads(gw.cli("imap", "status", "--json", env=PW_ENV).stdout)["sources"]
    assert [(s["tenant"], s["source"], s["folder"], s["imported"], s["backlog"], s["last_uid"])
            for s in status] == [("acme", "helpdesk", "INBOX", 4, 0, 4)]
    assert status[0]["last_success_at"] and status[0]["last_error"] is None


@pytest.mark.parametrize("mode", ["mark_seen", "move", "delete"])
def test_after_import(make_gateway, dovecot, mode):
    user = dovecot.user()
    dovecot.fill(user, "INBOX", [message(1), message(2)])
    extra = {"move_to": "Imported/Done"} if mode == "move" else {}
    gw = pull_gateway(make_gateway, dovecot, user, after_import=mode, **extra)
    wait_imported(gw, 2)
    if mode == "mark_seen":
        wait_for(lambda: all(b"\\Seen" in f for _, f, _ in dovecot.contents(user, "INBOX")),
                 20, "marked seen")
    else:
        wait_for(lambda: dovecot.contents(user, "INBOX") == [], 20, "INBOX emptied")
    if mode == "move":
        moved = sorted(c[2] for c in dovecot.contents(user, "Imported/Done"))
        assert moved == [message(1), message(2)]
    time.sleep(1.5)
    assert len(imported(gw)) == 2


@pytest.mark.parametrize("backend", ["postgresql"])
def test_delete_only_after_the_import_is_committed(make_gateway, dovecot, backend):
    user = dovecot.user()
    dovecot.fill(user, "INBOX", [message(1), message(2)])
    gw = pull_gateway(make_gateway, dovecot, user, start=False, after_import="delete")
    blocker = create_engine(gw.db_url)
    gw.cli("db", "upgrade", check=True)
    with blocker.connect() as conn:
        conn.execute(text("LOCK TABLE messages IN EXCLUSIVE MODE"))  # inserts wait
        gw.start(env=PW_ENV)
        def import_waiting():  # the batch is fetched and its commit waits on the lock
            with blocker.connect() as watcher:  # a new snapshot of pg_stat_activity each time
                queries = watcher.execute(text(
                    "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )).scalars().all()
            return any(q.startswith("INSERT INTO messages") for q in queries)

        wait_for(import_waiting, 20, "the import waiting")
        time.sleep(1)
        assert len(dovecot.contents(user, "INBOX")) == 2
        conn.rollback()
    wait_imported(gw, 2)
    wait_for(lambda: dovecot.contents(user, "INBOX") == [], 20, "deleted after commit")
    blocker.dispose()


def test_uidvalidity_change_resyncs_without_reimporting(make_gateway, dovecot):
    user = dovecot.user()
    dovecot.fill(user, "Support", [message(1), message(2), message(3)])
    gw = pull_gateway(make_gateway, dovecot, user, folders=["Support"])
    wait_imported(gw, 3)
    assert gw.terminate() == 0
    # The customer's server is migrated: the folder comes back renumbered, plus one new.
    conn = dovecot.client(user)
    before = conn.status("Support", "(UIDVALIDITY)")[1][0]
    assert conn.rename("Support", "Old")[0] == "OK"
    conn.logout()
    time.sleep(1.1)  # Dovecot's UIDVALIDITY is a timestamp
    dovecot.fill(user, "Support", [message(2), message(1), message(4), message(3)])
    conn = dovecot.client(user)
    assert conn.status("Support", "(UIDVALIDITY)")[1][0] != before
    conn.logout()
    gw.start(env=PW_ENV)
    wait_imported(gw, 4)
    wait_for(lambda: "imap_resync" in gw.log(), 10, "the resync logged")
    time.sleep(1.5)
    assert originals(gw) == sorted(message(n) for n in range(1, 5))
    assert (imports(gw, "imported"), imports(gw, "duplicate")) == (1, 3)


def test_server_lost_mid_import_resumes_exactly_once(make_gateway, own_dovecot):
    user = own_dovecot.user()
    own_dovecot.start()
    own_dovecot.drop(user, "INBOX", [message(n, 100_000) for n in range(300)])
    gw = pull_gateway(make_gateway, own_dovecot, user, batch_size=10)
    wait_for(lambda: len(imported(gw)) >= 20, 30, "the import under way")
    own_dovecot.stop()  # the connection drops, most likely inside a FETCH
    wait_for(lambda: "imap_failed" in gw.log(), 20, "the failure logged")
    failing = json.loads(gw.cli("imap", "status", "--json", env=PW_ENV).stdout)
    assert failing["sources"][0]["last_error"]
    count = len(imported(gw))
    assert count < 300
    own_dovecot.start()
    wait_imported(gw, 300, timeout=60)
    time.sleep(1.5)
    ids = [gw.store.raw(m["id"]) for m in imported(gw)]
    assert len(ids) == 300 and len(set(ids)) == 300


def test_bad_folder_large_message_and_hostile_names(make_gateway, dovecot):
    user = dovecot.user()
    folder = 'Kund\u00e9n "Support" \\ team'
    big = message(99, 300_000)  # over smtp.max_message_size (200 kB in the tests)
    dovecot.fill(user, 'Kund&AOk-n "Support" \\ team', [message(1), big, message(2)])
    gw = pull_gateway(make_gateway, dovecot, user, folders=[folder, "Missing"],
                      after_import="delete")
    wait_imported(gw, 2)
    wait_for(lambda: "imap_skipped" in gw.log() and "Missing" in gw.log(), 20, "logged")
    # the large one stays on the server, even with after_import: delete
    left = dovecot.contents(user, 'Kund&AOk-n "Support" \\ team')
    wait_for(lambda: [c[2] for c in dovecot.contents(
        user, 'Kund&AOk-n "Support" \\ team')] == [big], 20, "only the large one left")
    assert left  # it was there all along
    status = json.loads(gw.cli("imap", "status", "--json", env=PW_ENV).stdout)
    by_folder = {s["folder"]: s for s in status["sources"]}
    assert by_folder[folder]["imported"] == 2 and by_folder[folder]["last_error"] is None
    assert "Missing" in by_folder["Missing"]["last_error"]
    # the missing folder appears: imported on a later round, the daemon carried on
    dovecot.fill(user, "Missing", [message(3)])
    wait_imported(gw, 3)
    assert gw.proc.poll() is None


def test_a_mailbox_of_5000_is_imported_exactly_once(make_gateway, dovecot):
    """(Its memory and speed: bench/imap.py.)"""
    user = dovecot.user()
    dovecot.drop(user, "Archive", [message(n, 1000) for n in range(5000)])
    gw = pull_gateway(make_gateway, dovecot, user, folders=["Archive"], batch_size=200)
    wait_for(lambda: len(gw.messages(limit=6000)) >= 5000, 120, "5,000 imported")
    time.sleep(1.5)
    rows = [m for m in gw.messages(limit=6000) if m["protocol"] == "IMAP"]
    assert len(rows) == 5000
    assert imports(gw, "imported") == 5000 and imports(gw, "duplicate") == 0
    status = json.loads(gw.cli("imap", "status", "--json", env=PW_ENV).stdout)["sources"]
    assert (status[0]["imported"], status[0]["backlog"], status[0]["last_uid"]) == (5000, 0, 5000)
    assert gw.log().count("imported queue_id=") == 5000
