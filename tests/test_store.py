"""The store's claim rules, on SQLite and PostgreSQL, without a daemon."""

from __future__ import annotations

import asyncio
import hashlib

from gateway.store.ids import new_id
from gateway.store.repository import NewMessage, utcnow


def _accept(store, count):
    async def run():
        await store.start()
        batch = [
            NewMessage(id=new_id(), tenant_id="acme", mail_from="a@sender.test",
                       recipients=("support@acme.test",), data=b"Subject: x\r\n\r\nx\r\n",
                       sha256=hashlib.sha256(b"x").hexdigest(), received_at=utcnow(),
                       client_address="127.0.0.1", helo="t", protocol="ESMTP",
                       trace_header="Received: x\r\n", smtputf8=False)
            for _ in range(count)
        ]
        await store.accept(batch)
        await store.close()
        return [m.id for m in batch]

    return asyncio.run(run())


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
    freed = store.release_dead_leases("thishost", alive=lambda pid: pid != 999999)
    assert freed == 2
    assert sorted(store.claim("thishost:1", 10, lease=300)) == sorted(ids)
