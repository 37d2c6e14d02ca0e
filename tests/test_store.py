"""The store's claim rules, on SQLite and PostgreSQL, without a daemon."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from gateway.clock import aware, utcnow
from gateway.errors import TempFailure
from gateway.records import AttemptResult, NewMessage, Outcome, ParsedFields, PlannedDelivery
from gateway.store import database, intake
from gateway.store.ids import new_id
from gateway.store.intake import HASH_ON_LOOP_MAX
from gateway.store.models import message_addresses, message_blobs, messages


def _accept(store, count):
    async def run():
        await store.start()
        batch = [
            NewMessage(id=new_id(), tenant_id="acme", mail_from="a@sender.test",
                       recipients=("support@acme.test",), data=b"Subject: x\r\n\r\nx\r\n",
                       received_at=utcnow(),
                       client_address="127.0.0.1", helo="t", protocol="ESMTP",
                       trace_header="Received: x\r\n", smtputf8=False)
            for _ in range(count)
        ]
        await store.accept(batch)
        await store.close()
        return [m.id for m in batch]

    return asyncio.run(run())


def test_the_store_records_the_sha256_of_each_original(store):
    """Taken by the store before the commit, once per original (a message for two
    tenants is one bytes object in two rows); a batch over HASH_ON_LOOP_MAX is hashed
    in a thread."""
    one = b"Subject: one\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    two = b"Subject: two\r\n\r\nshort\r\n"
    big = b"Subject: big\r\n\r\n" + b"y" * HASH_ON_LOOP_MAX + b"\r\n"

    def message(tenant, data):
        return NewMessage(id=new_id(), tenant_id=tenant, mail_from="a@sender.test",
                          recipients=(f"support@{tenant}.test",), data=data,
                          received_at=utcnow(), client_address="127.0.0.1", helo="t",
                          protocol="ESMTP", trace_header="", smtputf8=False)

    async def run():
        await store.start()
        batch = [message("acme", one), message("globex", one), message("acme", two)]
        await store.accept(batch)
        large = [message("acme", big), message("globex", two)]
        await store.accept(large)
        await store.close()
        return [m.id for m in batch + large]

    a, b, c, d, e = asyncio.run(run())
    assert store.get_message(a)["sha256"] == store.get_message(b)["sha256"] \
        == hashlib.sha256(one).hexdigest()
    assert store.get_message(c)["sha256"] == store.get_message(e)["sha256"] \
        == hashlib.sha256(two).hexdigest()
    assert store.get_message(d)["sha256"] == hashlib.sha256(big).hexdigest()
    assert store.raw(a) == store.raw(b) == one
    assert store.raw(d) == big


def test_rows_inserted_in_bulk_read_back_as_one_by_one(store):
    """database.insert_rows (multi-row statements on SQLite) stores every type as
    SQLAlchemy's executemany does: times with their zone, JSON, booleans, NULL, bytes
    (also as bulky rows), the columns' defaults; more rows than one statement may bind
    go in several."""
    when = datetime(2026, 12, 1, 22, 9, 29, 123456, tzinfo=UTC)

    def row(message_id):
        return {"id": message_id, "tenant_id": "acme", "status": "received",
                "received_at": when, "mail_from": "", "size": 3, "sha256": "0" * 64,
                "client_address": "::1", "helo": "h\u00e9lo", "protocol": "ESMTP",
                "trace_header": "Received: x\r\n", "smtputf8": True, "direction": "inbound",
                "submitted_by": None, "tags": ["a", {"b": 1}], "parse_failed": False,
                "attempts": 0}

    bulk, single = new_id(), new_id()
    with store.writing() as conn:
        database.insert_rows(conn, messages, [row(bulk)])
        conn.execute(insert(messages), [row(single)])
        database.insert_rows(conn, message_blobs, [
            {"message_id": bulk, "data": b"\x00\xff\r\n", "key_id": None}], bulky=True)
        conn.execute(insert(message_blobs),
                     [{"message_id": single, "data": b"\x00\xff\r\n", "key_id": None}])
        many = database.SQLITE_MAX_VALUES // 3 * 2 + 5  # three statements on SQLite
        database.insert_rows(conn, message_addresses, [
            {"message_id": bulk, "role": "rcpt_to", "address": f"r{i}@acme.test"}
            for i in range(many)])
    with store.engine.connect() as conn:
        got = {r.id: r._asdict() for r in conn.execute(
            select(messages).where(messages.c.id.in_([bulk, single])))}
        blobs = dict(conn.execute(select(message_blobs.c.message_id, message_blobs.c.data)).all())
        addresses = conn.execute(select(message_addresses.c.address)
                                 .where(message_addresses.c.message_id == bulk)
                                 .order_by(message_addresses.c.id)).scalars().all()
    assert set(got) == {bulk, single}
    got[bulk]["id"] = got[single]["id"]
    assert got[bulk] == got[single]
    assert got[bulk]["tags"] == ["a", {"b": 1}] and got[bulk]["smtputf8"] is True
    assert got[bulk]["tag_key"] == "" and got[bulk]["received_at"].replace(tzinfo=UTC) == when
    assert bytes(blobs[bulk]) == bytes(blobs[single]) == b"\x00\xff\r\n"
    assert addresses == [f"r{i}@acme.test" for i in range(many)]


def test_a_fault_in_a_commit_fails_that_group_and_the_next_commits(store, monkeypatch):
    """An error nobody foresaw in the committer's thread answers the waiting sessions
    (451 from TempFailure) and leaves the committer running for the next ones."""
    real, calls = intake._blobs, []

    def blobs_failing_once(batch, keystore):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("unforeseen")
        return real(batch, keystore)

    monkeypatch.setattr(intake, "_blobs", blobs_failing_once)

    def message():
        return NewMessage(id=new_id(), tenant_id="acme", mail_from="a@sender.test",
                          recipients=("support@acme.test",), data=b"Subject: x\r\n\r\nx\r\n",
                          received_at=utcnow(), client_address="127.0.0.1", helo="t",
                          protocol="ESMTP", trace_header="", smtputf8=False)

    async def run():
        await store.start()
        first, second = message(), message()
        with pytest.raises(TempFailure, match="unforeseen"):
            await asyncio.wait_for(store.accept([first]), 10)
        await asyncio.wait_for(store.accept([second]), 10)
        await store.close()
        return first.id, second.id

    first, second = asyncio.run(run())
    assert store.get_message(first) is None
    assert store.raw(second) == b"Subject: x\r\n\r\nx\r\n"


def test_a_stale_claim_of_our_own_is_taken_back_at_once(store):
    ids = _accept(store, 3)
    assert sorted(store.claim("host:1", 10, lease=300)) == sorted(ids)
    # a claim whose results were never saved (database gone half-way): the same worker
    # takes it again at once, another worker only when the lease has run out
    assert store.claim("host:2", 10, lease=300) == []
    assert sorted(store.claim("host:1", 10, lease=300)) == sorted(ids)
    assert sorted(store.claim("host:2", 10, lease=0)) == []
    store.release(ids, "host:1")
    assert sorted(store.claim("host:2", 10, lease=300)) == sorted(ids)


def test_dead_leases_of_this_host_are_freed(store):
    ids = _accept(store, 2)
    store.claim("thishost:999999", 10, lease=300)
    assert store.claim("thishost:1", 10, lease=300) == []
    freed = store.release_dead_leases("messages", "thishost",
                                     alive=lambda pid: pid != 999999)
    assert freed == 2
    assert sorted(store.claim("thishost:1", 10, lease=300)) == sorted(ids)


def _parsed(subject: str) -> ParsedFields:
    return ParsedFields(message_id=f"<{subject}@sender.test>", header_from="a@sender.test",
                        header_to="support@acme.test", header_cc=None, subject=subject,
                        date=None, attachments=[], defects=[], parse_failed=False,
                        addresses=[("from", "a@sender.test"), ("to", "support@acme.test")])


def test_finishing_a_batch_saves_only_what_is_still_ours(store):
    """One transaction for the batch; a message whose lease another worker took in the
    meantime is left to it, untouched, and the others are saved whole."""
    ids = sorted(_accept(store, 3))
    assert sorted(store.claim("host:1", 10, lease=0)) == ids  # leases run out at once
    [stolen] = store.claim("host:2", 1, lease=300)  # one is taken over
    kept = [mid for mid in ids if mid != stolen]
    copy = (PlannedDelivery("bcc", "archive@vault.test", None, "archive"),)
    results = store.finish_many("host:1", [
        (mid, _parsed(f"s-{mid}"), Outcome(tags=("support",), deliveries=copy)) for mid in ids
    ])
    assert results == [mid != stolen for mid in ids] and results.count(False) == 1
    for mid in kept:
        row = store.get_message(mid)
        assert (row["status"], row["subject"], row["lease_owner"]) == ("processed", f"s-{mid}",
                                                                       None)
        assert row["tags"] == ["support"]
        assert ("from", "a@sender.test") in row["addresses"]
        assert ("rcpt_to", "support@acme.test") in row["addresses"]  # envelope rows kept
    taken = store.get_message(stolen)
    assert (taken["status"], taken["subject"], taken["lease_owner"]) == ("received", None,
                                                                        "host:2")
    planned = store.list_deliveries()
    assert sorted(d["message_id"] for d in planned) == kept
    assert {(d["tenant_id"], d["kind"], d["recipient"]) for d in planned} == {
        ("acme", "bcc", "archive@vault.test")}
    assert store.finish_many("host:1", [(stolen, _parsed("late"), Outcome())]) == [False]


def test_recording_delivery_results_saves_only_what_is_still_ours(store):
    """A group of attempt results in one go: a copy whose lease another instance took
    meanwhile is left to it, untouched; the others are saved with their outcome."""
    ids = sorted(_accept(store, 3))
    store.claim("host:1", 10, lease=300)
    copy = (PlannedDelivery("bcc", "archive@vault.test", None, "archive"),)
    store.finish_many("host:1", [(mid, _parsed(mid), Outcome(deliveries=copy)) for mid in ids])
    jobs = store.claim_deliveries("host:1", 10, lease=0)  # leases run out at once
    assert len(jobs) == 3
    [stolen] = store.claim_deliveries("host:2", 1, lease=300)
    later = datetime(2030, 1, 1, tzinfo=UTC)
    outcomes = {jobs[0].id: AttemptResult(jobs[0].id, "sent"),
                jobs[1].id: AttemptResult(jobs[1].id, "pending", "451 4.3.0 later", later),
                jobs[2].id: AttemptResult(jobs[2].id, "failed", "550 5.1.1 no such user")}
    saved = store.delivery_results("host:1", list(outcomes.values()))
    assert saved == [job.id != stolen.id for job in jobs]
    for row in store.list_deliveries():
        if row["id"] == stolen.id:
            assert (row["status"], row["attempts"], row["lease_owner"]) == ("pending", 0,
                                                                           "host:2")
            continue
        result = outcomes[row["id"]]
        assert (row["status"], row["attempts"], row["lease_owner"], row["last_error"]) == (
            result.status, 1, None, result.error)
        if result.retry_at is not None:
            assert aware(row["next_attempt_at"]) == later
