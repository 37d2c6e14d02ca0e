"""250 means stored: kill -9 under load, database outages, disk space, shutdown."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import threading
import time

import pytest
from sqlalchemy import delete, text

from gateway.clock import utcnow
from gateway.records import NewMessage
from gateway.store import database
from gateway.store.ids import new_id
from gateway.store.intake import _insert_messages
from gateway.store.models import message_blobs
from tests.conftest import (
    RawClient,
    need_tool,
    peer_missing,
    postgres_server_url,
    simple_message,
)
from tests.load import Load


def _assert_whole(gateway, rows):
    for row in rows:
        raw = gateway.store.raw(row["id"])
        assert raw is not None, row["id"]
        assert hashlib.sha256(raw).hexdigest() == row["sha256"]
        assert row["recipients"], row["id"]


def test_kill_9_at_random_moments_loses_no_acknowledged_message(make_gateway):
    """Three kills under load, each at a random moment once the load is going, each
    followed by a restart: every message that got a 250 is stored whole and processed."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    gw = make_gateway({"smtp": {"max_connections_per_ip": 100}})
    total_acked: set[str] = set()
    for _round in range(3):
        with Load(gw.port) as load:
            load.wait(20, timeout=30)
            time.sleep(rng.uniform(0.0, 1.5))
            gw.kill()
            time.sleep(0.3)
        total_acked |= load.acked
        gw.start()
    rows = gw.wait_processed(len(total_acked), timeout=60)
    stored = {r["subject"] for r in rows}
    assert total_acked - stored == set(), f"seed {seed}"
    _assert_whole(gw, rows)


class Proxy:
    """A TCP relay to PostgreSQL that the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        assert self.listener is not None
        # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_a_message_that_fails_in_a_batch_is_quarantined_alone(gateway):
    """The pipeline takes messages a batch at a time: one whose stored original has gone
    missing (a damaged store) is quarantined with the reason, and the others of its
    batch are processed as usual."""
    ids = [new_id() for _ in range(3)]
    with gateway.store.engine.begin() as conn:
        _insert_messages(conn, [NewMessage(
            id=message_id, tenant_id="acme", mail_from="a@sender.test",
            recipients=("support@acme.test",),
            data=simple_message(subject=f"number {n}"), received_at=utcnow(),
            client_address="127.0.0.1", helo="client.test", protocol="ESMTP",
            trace_header="", smtputf8=False) for n, message_id in enumerate(ids)])
        conn.execute(delete(message_blobs).where(message_blobs.c.message_id == ids[1]))
    rows = {r["id"]: r for r in gateway.wait_processed(3)}
    assert [rows[i]["status"] for i in ids] == ["processed", "quarantined", "processed"]
    assert rows[ids[1]]["last_error"] == "LookupError: message or its raw original missing"
    assert [rows[i]["subject"] for i in (ids[0], ids[2])] == ["number 0", "number 2"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_database_down_gives_451_and_recovers(make_gateway, backend):
    from sqlalchemy.engine import make_url

    from tests.conftest import PostgresDatabase

    pg = PostgresDatabase(postgres_server_url())
    try:
        url = make_url(pg.url)
        proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
        gw = make_gateway(db_url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False))
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="before"))
        proxy.down()
        c = RawClient(gw.port, timeout=30)
        assert c.start_data().startswith("354")
        reply = c.command(simple_message(subject="during") + b".")
        assert reply.startswith("451 4.3.0"), reply
        proxy.up()
        c.command("MAIL FROM:<a@sender.test>")
        c.command("RCPT TO:<support@acme.test>")
        c.command("DATA")
        reply = c.command(simple_message(subject="after") + b".")
        assert reply.startswith("250 2.0.0"), reply
        c.close()
        rows = gw.wait_processed(2)
        assert sorted(r["subject"] for r in rows) == ["after", "before"]
        gw.close()
        proxy.down()
    finally:
        pg.drop()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_unreachable_database_at_start_is_one_clear_line(make_gateway, backend):
    gw = make_gateway(start=False,
                      db_url="postgresql+psycopg://postgres@127.0.0.1:9/nothing")
    result = gw.cli("serve", timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "database unreachable" in err and "Traceback" not in err


def test_the_schema_this_code_needs_is_the_newest_migration():
    newest = database.head_revision()
    assert database.HEAD == newest, f"set gateway.store.database.HEAD to {newest!r}"


@pytest.mark.sqlite_only
def test_a_new_sqlite_database_is_upgraded_at_start(make_gateway, backend):
    gw = make_gateway(fresh=True)
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
    assert len(gw.wait_processed(1)) == 1
    assert database.current_revision(gw.store.engine) == database.HEAD
    assert f"database schema upgraded from empty to {database.HEAD}" in gw.log()


@pytest.mark.sqlite_only
def test_a_failed_upgrade_at_start_is_one_clear_line(make_gateway, backend):
    """A database from a newer version: no migration leads from its revision."""
    gw = make_gateway(start=False)
    gw.cli("db", "upgrade", check=True)
    with gw.store.engine.begin() as conn:
        conn.execute(text(f"UPDATE {database.VERSION_TABLE} SET version_num = '9999'"))
    result = gw.cli("serve", timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "database schema upgrade failed" in err and "9999" in err, err
    assert "Traceback" not in err


@pytest.mark.sqlite_only
def test_a_port_in_use_is_one_clear_line_and_a_prompt_exit(make_gateway, backend):
    """Another server (or a second instance) holds the SMTP port: the daemon says so and
    exits 1 at once, after stopping what it had started (its sweeper included)."""
    gw = make_gateway(start=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", gw.port))
        taken.listen()
        started = time.monotonic()
        result = gw.cli("serve", timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"cannot start: 127.0.0.1:{gw.port}: " in err and "address already in use" in err
    assert "Traceback" not in err
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_behind_the_code_is_not_upgraded_by_the_daemon(make_gateway, backend):
    gw = make_gateway(start=False, fresh=True)
    result = gw.cli("serve", timeout=60)
    assert result.returncode == 1
    assert "run 'mailflowr-gateway db upgrade' first" in result.stderr.decode()
    assert database.current_revision(gw.store.engine) is None


@pytest.mark.sqlite_only
def test_disk_nearly_full_gives_452_at_mail(make_gateway, backend):
    gw = make_gateway({"storage": {"min_free_space": "1000000GB"}})
    c = RawClient(gw.port)
    c.reply()
    c.command("EHLO client.test")
    assert c.command("MAIL FROM:<a@sender.test>").startswith("452 4.3.1")


def _root_only(what: str) -> None:
    if os.geteuid() != 0:
        peer_missing(f"{what} needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs of the test's own, to fill up."""
    _root_only("mounting a small tmpfs")
    need_tool("mount", "mount")
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk, leave: int) -> None:
    """Grow (or shrink) disk/filler until ``leave`` bytes are free."""
    filler = disk / "filler"
    size = filler.stat().st_size if filler.exists() else 0
    st = os.statvfs(disk)
    with open(filler, "ab") as f:
        f.truncate(max(size + st.f_bavail * st.f_frsize - leave, 0))
    # tmpfs allocates on write, not on truncate
    with open(filler, "r+b") as f:
        for offset in range(0, filler.stat().st_size, 1 << 20):
            f.seek(offset)
            f.write(b"\1" * min(1 << 20, filler.stat().st_size - offset))


@pytest.mark.sqlite_only
def test_disk_full_refuses_with_4xx_and_recovers_when_space_returns(make_gateway, small_disk,
                                                                     backend):
    gw = make_gateway({"smtp": {"max_message_size": "20MB"},
                       "storage": {"min_free_space": "2MB"}},
                      db_url=f"sqlite:///{small_disk / 'gateway.db'}")
    try:
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="before"))
        gw.wait_processed(1)

        _fill(small_disk, leave=1_000_000)  # below min_free_space: refused at MAIL
        time.sleep(1.2)  # the free space is looked up once a second
        c = RawClient(gw.port)
        c.reply()
        c.command("EHLO client.test")
        assert c.command("MAIL FROM:<a@sender.test>").startswith("452 4.3.1")
        c.close()

        _fill(small_disk, leave=3_000_000)  # MAIL passes, then the message does not fit
        time.sleep(1.2)
        c = RawClient(gw.port, timeout=30)
        assert c.start_data().startswith("354")
        big = simple_message(subject="too big for the disk", body=("x" * 76 + "\r\n") * 80_000)
        reply = c.command(big.replace(b"\r\n.", b"\r\n..") + b".")
        assert reply.startswith("451 4.3.0"), reply
        c.close()

        (small_disk / "filler").unlink()  # space returns: no restart needed
        time.sleep(1.2)
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="after"))
        rows = gw.wait_processed(2)
        assert sorted(r["subject"] for r in rows) == ["after", "before"]
        _assert_whole(gw, rows)
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        gw.close()


def _postgres_restarter(url: str):
    """A function that restarts the local PostgreSQL cluster serving ``url`` and waits
    until it takes connections again; skips (fails in CI) when that cannot be done."""
    from sqlalchemy.engine import make_url

    _root_only("restarting PostgreSQL")
    ctl = need_tool("pg_ctlcluster", "postgresql-common")
    isready = need_tool("pg_isready", "postgresql-client")
    u = make_url(url)
    host, port = u.host or "127.0.0.1", u.port or 5432
    clusters = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    local = [line.split()[:2] for line in clusters.splitlines()
             if len(line.split()) > 2 and line.split()[2] == str(port)]
    if host not in ("127.0.0.1", "localhost", "::1") or not local:
        peer_missing(f"PostgreSQL at {host}:{port} is not a cluster of this machine")
    version, name = local[0]

    def restart() -> None:
        subprocess.run([ctl, "--skip-systemctl-redirect", version, name, "restart",
                        "-m", "fast"], check=True, capture_output=True, timeout=60)
        for _ in range(300):
            if subprocess.run([isready, "-h", host, "-p", str(port), "-q"]).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("PostgreSQL did not come back")

    return restart


@pytest.mark.exclusive_postgres  # the restart drops every other test's connections
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgresql_restart_under_load_loses_nothing(make_gateway, backend):
    restart = _postgres_restarter(postgres_server_url())
    gw = make_gateway({"smtp": {"max_connections_per_ip": 100}})
    pid = gw.proc.pid
    with Load(gw.port) as load:
        load.wait(50, timeout=30)
        restart()
        back = len(load.acked)
        load.wait(back + 50, timeout=60)  # the daemon recovered on its own
    assert load.replies, "no sender noticed the restart"
    # while the database was away: a temporary failure, never a 5xx or exception text
    assert all(r.startswith(("451 4.3.0", "452 4.3.1")) for r in load.replies), load.replies
    rows = gw.wait_processed(len(load.acked), timeout=60)
    assert load.acked - {r["subject"] for r in rows} == set()
    _assert_whole(gw, rows)
    assert gw.proc.pid == pid and gw.proc.poll() is None


def test_sigterm_lets_a_transaction_finish_then_exits_0(make_gateway):
    gw = make_gateway()
    idle = RawClient(gw.port)
    idle.reply()
    idle.command("EHLO idle.test")
    busy = RawClient(gw.port)
    busy.reply()
    busy.command("EHLO busy.test")
    busy.command("MAIL FROM:<a@sender.test>")
    busy.command("RCPT TO:<support@acme.test>")
    busy.command("DATA")
    busy.send(b"Subject: in flight\r\n\r\nfirst half, ")
    gw.proc.send_signal(15)
    idle.sock.settimeout(10)
    assert idle.reply().startswith("421 4.3.2")
    time.sleep(0.5)
    busy.send(b"second half\r\n")
    assert busy.command(b".").startswith("250 2.0.0")
    assert busy.reply().startswith("421 4.3.2")
    assert gw.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
    rows = gw.messages()
    assert [r["subject"] or gw.store.raw(r["id"]).split(b"\r\n")[0] for r in rows] in (
        [b"Subject: in flight"], ["in flight"])


def test_a_writer_waits_for_sqlites_write_lock_and_gives_up_after_the_busy_timeout(
        tmp_path, monkeypatch):
    """The daemon's processes share one SQLite file.  A write transaction that finds
    another connection holding the write lock waits and writes once it is free; one
    that finds it held past the busy timeout fails with "database is locked"; every
    other statement keeps SQLite's busy timeout."""
    import sqlite3

    path = tmp_path / "gateway.db"
    engine = database.create(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    assert time.monotonic() - started >= 0.25  # it waited for the lock
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT x FROM t ORDER BY x").scalars().all() == [1, 2]
        assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
                == database.SQLITE_BUSY_TIMEOUT_MS)
    monkeypatch.setattr(database, "SQLITE_BUSY_TIMEOUT_MS", 300)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(Exception, match="database is locked"), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (3)")
    holder.execute("ROLLBACK")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 2
    holder.close()
    engine.dispose()
