"""250 means stored: kill -9 under load, database outages, disk space, shutdown."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest

from tests.conftest import RawClient, postgres_server_url, simple_message


class Load:
    """Clients sending numbered messages until told to stop; remembers each 250."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _client(self, n: int) -> None:
        k = 0
        while not self.stop.is_set():
            try:
                c = RawClient(self.port, timeout=5)
                c.reply()
                c.command("EHLO load.test")
                while not self.stop.is_set():
                    subject = f"load-{n}-{k}"
                    k += 1
                    c.command("MAIL FROM:<load@sender.test>")
                    c.command(f"RCPT TO:<user{n}@globex.test>")
                    if not c.command("DATA").startswith("354"):
                        break
                    reply = c.command(simple_message(subject=subject) + b".")
                    if reply.startswith("250"):
                        with self.lock:
                            self.acked.add(subject)
                c.close()
            except OSError:
                time.sleep(0.05)  # the daemon is gone or refusing: try again until told to stop

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _assert_whole(gateway, rows):
    for row in rows:
        raw = gateway.store.raw(row["id"])
        assert raw is not None, row["id"]
        assert hashlib.sha256(raw).hexdigest() == row["sha256"]
        assert row["recipients"], row["id"]


def test_kill_9_under_load_loses_no_acknowledged_message(make_gateway):
    gw = make_gateway({"smtp": {"max_connections_per_ip": 100}})
    total_acked: set[str] = set()
    for _round in range(2):
        with Load(gw.port) as load:
            deadline = time.monotonic() + 20
            while len(load.acked) < 150 and time.monotonic() < deadline:
                time.sleep(0.05)
            gw.kill()
            time.sleep(0.3)
        assert len(load.acked) >= 150, "the load never got going"
        total_acked |= load.acked
        gw.start()
    rows = gw.wait_processed(len(total_acked), timeout=60)
    stored = {r["subject"] for r in rows}
    assert total_acked - stored == set()
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


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_disk_nearly_full_gives_452_at_mail(make_gateway, backend):
    gw = make_gateway({"storage": {"min_free_space": "1000000GB"}})
    c = RawClient(gw.port)
    c.reply()
    c.command("EHLO client.test")
    assert c.command("MAIL FROM:<a@sender.test>").startswith("452 4.3.1")


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
