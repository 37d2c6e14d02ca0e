"""Freed memory goes back to the system: what a burst of mail leaves behind in the C
allocator's heaps is returned by the trimmer the daemon runs every minute."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.memory import trimmer

pytestmark = pytest.mark.sqlite_only  # no database involved


@pytest.mark.skipif(trimmer() is None, reason="the C library has no malloc_trim (not glibc)")
def test_memory_freed_inside_the_heap_is_returned():
    # A fresh interpreter: 1,000 originals of 100 KB, of which every twentieth is kept
    # (as a burst leaves a few long-lived objects among the freed ones).
    script = textwrap.dedent("""
        from gateway.memory import trimmer
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
        blocks = [bytes(100_000) + bytes([i % 256]) for i in range(1000)]
        kept = blocks[::20]
        del blocks
        before = rss()
        trimmer()()
        print(before, rss(), len(kept))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                         timeout=60).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before > 90  # the burst's memory is still held
    assert after < before - 60, (before, after)


@pytest.mark.skipif(trimmer() is None, reason="the C library has no malloc_trim (not glibc)")
def test_the_database_keeps_no_copy_of_the_last_original(tmp_path):
    """SQLite's driver keeps the values last bound to each statement it caches, as
    copies, and SQLite the last record each one built: once more mail has come, the
    statements that stored a 64 MB original and a group of eight 4 MB ones must not
    keep them (a statement of eight originals may not run again for a long time)."""
    script = textwrap.dedent("""
        import asyncio, gc, sys
        from gateway.memory import trimmer
        from gateway.store import database
        from gateway.store.ids import new_id
        from gateway.store.repository import Store
        from gateway.records import NewMessage
        from gateway.clock import utcnow

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

        def message(data):
            return NewMessage(id=new_id(), tenant_id="acme", mail_from="a@sender.test",
                              recipients=("b@acme.test",), data=data, received_at=utcnow(),
                              client_address="127.0.0.1", helo="t", protocol="ESMTP",
                              trace_header="", smtputf8=False)

        engine = database.create("sqlite:///" + sys.argv[1])
        database.upgrade(engine)
        store = Store(engine)
        store.sync_tenants({"acme": "Acme"})

        async def run():
            await store.start()
            await store.accept([message(b"Subject: warm-up\\r\\n\\r\\nx\\r\\n")])
            gc.collect(); trimmer()()
            before = rss()
            await store.accept([message(b"Subject: big\\r\\n\\r\\n" + b"x" * (64 << 20))])
            await store.accept([message(b"Subject: group " + bytes([65 + i]) + b"\\r\\n\\r\\n"
                                        + b"y" * (4 << 20)) for i in range(8)])
            for _ in range(3):
                await store.accept([message(b"Subject: small\\r\\n\\r\\nx\\r\\n")])
            gc.collect(); trimmer()()
            print(before, rss())
            await store.close()

        asyncio.run(run())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "g.db")],
                         capture_output=True, check=True, timeout=120).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert after < before + 20, (before, after)  # 64 MB + 32 MB stored, none of it kept
