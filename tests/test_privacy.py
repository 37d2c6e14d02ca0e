"""Erasure of a data subject, tenant deactivation and the audit chain, end to end:
the real daemon, real SMTP, the command line, and the database files themselves."""

from __future__ import annotations

import io
import json
import os
import pwd
import re
import smtplib
import stat
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import delete, func, insert, select, text, update

from gateway.clock import utcnow
from gateway.headers import header_addresses
from gateway.privacy.export import tidy
from gateway.privacy.keys import load_or_create
from gateway.records import NewMessage
from gateway.store import audit, database
from gateway.store.console import ConsoleStore
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    audit_events,
    console_sessions,
    console_users,
    legal_holds,
    metadata,
    subject_requests,
)
from gateway.store.privacy import PrivacyStore, _remove_exports
from gateway.store.repository import Store
from gateway.store.tokens import TokenOwner
from tests.conftest import free_port, gateway_with_rules, simple_message, wait_for
from tests.test_api import Api, _token
from tests.test_parsing import DEEP, MANY

SUBJECT = "jane.doe@sender.test"
RULES = """
tenants:
  acme:
    rules:
      - name: archive
        actions: {bcc: [archive@copies.test]}
"""


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def _send(gw: Any, sender: str, to: str, body: str, cc: str | None = None,
          rcpts: list[str] | None = None) -> None:
    head = f"From: <{sender}>\r\nTo: <{to}>\r\n" + (f"Cc: <{cc}>\r\n" if cc else "")
    with gw.smtp() as s:
        s.sendmail(sender, rcpts or [to], f"{head}Subject: {body}\r\n\r\n{body}\r\n".encode())


def _unreachable_relay() -> Any:
    """Copies wait in the queue (pending): nothing listens at this port."""
    return SimpleNamespace(port=free_port())


def _mixed_mail(gw: Any) -> None:
    """Three messages of acme name the subject (as sender in mixed case, as sender,
    in a Cc header); two of acme do not; globex has one from the subject too."""
    _send(gw, "Jane.Doe@Sender.test", "support@acme.test", "erasetoken-one")
    _send(gw, SUBJECT, "billing@acme.test", "erasetoken-two")
    _send(gw, "bob@client.test", "support@acme.test", "erasetoken-three", cc=SUBJECT)
    _send(gw, "bob@client.test", "support@acme.test", "keeptoken-one")
    _send(gw, "carol@client.test", "billing@acme.test", "keeptoken-two")
    _send(gw, SUBJECT, "anyone@globex.test", "globextoken")


def _database_bytes(gw: Any) -> bytes:
    """Everything the database holds, as bytes: the SQLite files as they are on disk,
    or on PostgreSQL every row of every table."""
    if gw.db_url.startswith("sqlite"):
        db = Path(gw.db_url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    out = []
    with gw.store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for v in row:
                    out.append(v if isinstance(v, bytes) else str(v).encode())
    return b"\n".join(out)


def test_erasure_removes_the_person_everywhere_and_nothing_else(make_gateway, tmp_path):
    gw = gateway_with_rules(make_gateway, tmp_path, _unreachable_relay(), RULES)
    _mixed_mail(gw)
    gw.wait_processed(6)
    queue = _json(gw.cli("queue", "list", "--json"))
    assert len(queue) == 5 and {d["status"] for d in queue} == {"pending"}
    before = _database_bytes(gw).lower()
    assert SUBJECT.encode() in before and b"erasetoken-one" in before

    dry = _json(gw.cli("erase", "--tenant", "acme", "--subject", SUBJECT, "--dry-run",
                       "--json"))
    assert dry["messages"] == 3 and dry["dry_run"] is True
    assert len(gw.messages()) == 6

    done = _json(gw.cli("erase", "--tenant", "acme", "--subject", "JANE.DOE@sender.test",
                        "--json"))
    assert (done["messages"], done["deliveries"], done["pending_deliveries"]) == (3, 3, 3)
    assert {r["subject"] for r in gw.messages()} == {"keeptoken-one", "keeptoken-two",
                                                     "globextoken"}
    assert len(_json(gw.cli("queue", "list", "--json"))) == 2
    # globex's mail from the same person is another controller's: untouched by acme's request
    assert [r["subject"] for r in gw.messages(tenant="globex")] == ["globextoken"]
    _json(gw.cli("erase", "--tenant", "globex", "--subject", SUBJECT, "--json"))

    after = _database_bytes(gw).lower()
    for gone in (SUBJECT.encode(), b"erasetoken-one", b"erasetoken-two", b"erasetoken-three",
                 b"globextoken"):
        assert gone not in after, gone
    # the scan does see what was kept: it would have found the erased data too
    for kept in (b"keeptoken-one", b"keeptoken-two", b"bob@client.test", b"carol@client.test"):
        assert kept in after, kept
    assert SUBJECT not in gw.log().lower()  # the daemon's log masks addresses

    events = _json(gw.cli("audit", "list", "--action", "subject.erase", "--json"))
    assert [(e["tenant"], e["detail"]["messages"]) for e in events] == [("acme", 3),
                                                                        ("globex", 1)]
    assert re.fullmatch(r"[0-9a-f]{64}", events[0]["detail"]["subject"])
    assert "jane" not in json.dumps(events).lower()
    found = _json(gw.cli("audit", "list", "--subject", "Jane.Doe@SENDER.test", "--json"))
    assert [e["id"] for e in found] == [e["id"] for e in events]
    assert _json(gw.cli("audit", "list", "--subject", "bob@client.test", "--json")) == []


HOLD_RETENTION = """
default: 1y
holds:
  - {name: dispute-117, reason: "case 2026-117", address: jane.doe@sender.test}
"""


def test_a_legal_hold_blocks_erasure_until_overridden_with_a_reason(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "retention.yaml").write_text(HOLD_RETENTION)
    gw = make_gateway({"policies": {"directory": str(policies)}})
    _send(gw, SUBJECT, "support@acme.test", "held mail")
    _send(gw, "bob@client.test", "support@acme.test", "other mail")
    gw.wait_processed(2)

    refused = gw.cli("erase", "--tenant", "acme", "--subject", SUBJECT)
    assert refused.returncode == 1
    assert b"legal hold dispute-117 (1 messages)" in refused.stderr
    assert b"nothing erased" in refused.stderr
    assert len(gw.messages()) == 2

    no_reason = gw.cli("erase", "--tenant", "acme", "--subject", SUBJECT, "--override-hold")
    assert no_reason.returncode == 1 and b"needs --reason" in no_reason.stderr
    assert len(gw.messages()) == 2

    done = _json(gw.cli("erase", "--tenant", "acme", "--subject", SUBJECT, "--override-hold",
                        "--reason", "hold lifted by counsel, ticket 88", "--json"))
    assert done["messages"] == 1 and done["held"] == {"dispute-117": 1}
    assert [r["subject"] for r in gw.messages()] == ["other mail"]
    event = _json(gw.cli("audit", "list", "--action", "subject.erase", "--json"))[-1]
    assert event["detail"]["holds_overridden"] == ["dispute-117"]
    assert event["detail"]["reason"] == "hold lifted by counsel, ticket 88"


@pytest.mark.sqlite_only  # input checks: any database
def test_erase_arguments_are_checked(gateway):
    bad = gateway.cli("erase", "--tenant", "acme", "--subject", "not an address")
    assert bad.returncode == 2 and b"not an e-mail address" in bad.stderr
    unknown = gateway.cli("erase", "--tenant", "nobody", "--subject", SUBJECT)
    assert unknown.returncode == 1
    assert b"no tenant 'nobody'" in unknown.stderr and b"Traceback" not in unknown.stderr


def test_deactivation_refuses_mail_and_deletes_everything_of_the_tenant(make_gateway,
                                                                          tmp_path):
    gw = gateway_with_rules(make_gateway, tmp_path, _unreachable_relay(), RULES)
    _send(gw, "bob@client.test", "support@acme.test", "acme one")
    _send(gw, "bob@client.test", "billing@acme.test", "acme two")
    _send(gw, "bob@client.test", "x@globex.test", "globex one")
    gw.wait_processed(3)
    assert len(_json(gw.cli("queue", "list", "--json"))) == 2
    # the tenant's records that name people: a data-subject request, a hold it placed
    now = datetime.now(UTC)
    with gw.store.engine.begin() as conn:
        conn.execute(insert(subject_requests).values(
            tenant_id="acme", kind="access", subject="jane@client.test", received_at=now,
            due_at=now, status="open"))
        conn.execute(insert(legal_holds).values(
            tenant_id="acme", name="case-1", reason="court", address="nobody@client.test",
            created_at=now, created_by="api:test"))
    console = ConsoleStore(gw.store)  # a console user of the tenant, logged in
    console.add_user("acme", "dpo@acme.test", "scrypt$16384$8$1$c2FsdA==$aGFzaA==",
                     frozenset({"read"}))
    console.open(TokenOwner("dpo@acme.test", "acme", frozenset({"read"}), "console"))

    result = gw.cli("tenant", "deactivate", "acme")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "deleted 2 messages, 2 deliveries (2 still to go" in out
    assert "still in" in out  # the operator is told to remove it from gateway.yaml

    def refused() -> bool:
        with gw.smtp() as s:
            s.ehlo()
            s.mail("bob@client.test")
            code, reply = s.rcpt("support@acme.test")
            return code == 550 and b"5.1.1" in reply

    wait_for(refused, 15, "RCPT for the deactivated tenant refused")
    _send(gw, "bob@client.test", "x@globex.test", "globex two")  # others go on
    assert {r["tenant_id"] for r in gw.messages()} == {"globex"}
    assert _json(gw.cli("queue", "list", "--json")) == []
    assert _json(gw.cli("request", "list", "--json")) == []
    with gw.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(legal_holds)).scalar() == 0
        for table in (console_users, console_sessions):
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 0
    actions = [e["action"] for e in _json(gw.cli("audit", "list", "--tenant", "acme",
                                                 "--json"))]
    assert actions[-3:] == ["tenant.deactivate", "tenant.purge", "tenant.shred"]

    # a restart does not bring it back, though it is still configured
    gw.terminate()
    gw.start()
    with gw.smtp() as s, pytest.raises(smtplib.SMTPRecipientsRefused):
        s.sendmail("bob@client.test", ["support@acme.test"], b"Subject: x\r\n\r\nx\r\n")
    assert "tenant acme is deactivated" in gw.log()
    assert _json(gw.cli("audit", "verify", "--json"))["ok"] is True


def test_the_audit_chain_detects_edits_removals_and_a_cut_end(store):
    for n in range(5):
        store.audit("cli:test", "message.export", tenant_id="acme", detail={"n": n})
    verdict = store.verify_audit()
    assert verdict.ok and verdict.events == 5 and verdict.head
    head = verdict.head

    with store.engine.begin() as conn:  # someone edits event 3 in the database
        conn.execute(update(audit_events).where(audit_events.c.id == 3)
                     .values(detail={"n": 99}))
    assert store.verify_audit().problem == "event 3 was changed after it was written"
    with store.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.id == 3)
                     .values(detail={"n": 2}))
    assert store.verify_audit().ok

    with store.engine.begin() as conn:  # ... or removes event 2
        row = dict(conn.execute(select(audit_events).where(audit_events.c.id == 2))
                   .one()._mapping)
        conn.execute(delete(audit_events).where(audit_events.c.id == 2))
    assert "event 3 does not follow" in store.verify_audit().problem
    with store.engine.begin() as conn:
        conn.execute(insert(audit_events).values(**row))
    assert store.verify_audit().ok

    with store.engine.begin() as conn:  # ... or cuts off the end: only an anchor shows it
        conn.execute(delete(audit_events).where(audit_events.c.id == 5))
    assert store.verify_audit().ok
    cut = store.verify_audit(anchor=head)
    assert not cut.ok and cut.anchor_found is False


def test_an_edit_cannot_be_hidden_without_the_key(store):
    """Recomputing every hash after an edit needs the privacy key."""
    store.audit_key = b"k" * 32
    for n in range(3):
        store.audit("cli:test", "message.export", tenant_id="acme", detail={"n": n})
    with store.engine.begin() as conn:
        prev = audit.GENESIS
        for r in conn.execute(select(audit_events).order_by(audit_events.c.id)).all():
            event = dict(r._mapping)
            if event["id"] == 2:
                event["detail"] = {"n": 42}
            forged = audit.digest(b"guess", prev, event)  # an attacker's best try
            conn.execute(update(audit_events).where(audit_events.c.id == event["id"])
                         .values(detail=event["detail"], prev_hash=prev, hash=forged))
            prev = forged
    assert store.verify_audit().problem == "event 1 was changed after it was written"


def test_concurrent_appends_keep_one_chain(store):
    def writer(n: int) -> None:
        for i in range(15):
            store.audit(f"writer-{n}", "test.append", detail={"i": i})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    verdict = store.verify_audit()
    assert verdict.ok and verdict.events == 60


def test_audit_verify_on_the_command_line(gateway):
    gateway.cli("queue", "drop", "999", "--reason", "x")  # unknown: nothing audited
    with gateway.smtp() as s:
        s.sendmail("bob@client.test", ["support@acme.test"], b"Subject: x\r\n\r\nx\r\n")
    row = gateway.wait_processed(1)[0]
    # to a pipe, twice: written to, and still a pipe afterwards
    fifo = gateway.directory / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    for _ in range(2):
        reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
        reader.start()
        gateway.cli("messages", "export", row["id"], "--out", str(fifo), check=True)
        reader.join(30)
    assert got == [gateway.store.raw(row["id"])] * 2
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    ok = gateway.cli("audit", "verify")
    assert ok.returncode == 0
    assert re.match(rb"audit log intact: 2 events, head [0-9a-f]{64}\n", ok.stdout)
    head = ok.stdout.split()[-1].decode()

    with gateway.store.engine.begin() as conn:
        actor = conn.execute(select(audit_events.c.actor)
                             .where(audit_events.c.id == 1)).scalar_one()
        conn.execute(update(audit_events).where(audit_events.c.id == 1)
                     .values(actor="someone-else"))
    bad = gateway.cli("audit", "verify")
    assert bad.returncode == 1
    assert b"audit log TAMPERED: event 1 was changed after it was written" in bad.stderr
    assert gateway.cli("audit", "verify", "--anchor", "x").returncode == 2
    with gateway.store.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.id == 1)
                     .values(actor=actor))
        conn.execute(delete(audit_events).where(audit_events.c.id == 2))
    cut = gateway.cli("audit", "verify", "--anchor", head)
    assert cut.returncode == 1 and b"removed from its end" in cut.stderr


@pytest.mark.sqlite_only  # input checks: any database
def test_policy_reloads_are_audited(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "retention.yaml").write_text("default: 1y\n")
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": "0.2s"}})
    (policies / "retention.yaml").write_text("default: 2y\n")

    def reloaded() -> list[Any]:
        return [e for e in gw.store.audit_events() if e["action"] == "policy.reload"]

    events = wait_for(reloaded, 15, "policy.reload audited")
    assert events[0]["actor"] == "daemon" and events[0]["detail"]["files"] == ["retention.yaml"]


def test_unparsed_mail_is_found_by_its_headers(store):
    """Mail the pipeline has not parsed yet has only its envelope in the index."""
    raw = (b"From: Bob <bob@client.test>\r\nTo: support@acme.test\r\n"
           b"Cc: \"Jane\" <Jane.Doe@sender.test>\r\nSubject: x\r\n\r\njane.doe@sender.test\r\n")
    plain = b"From: bob@client.test\r\nSubject: y\r\n\r\njane.doe@sender.test in the body\r\n"
    now = utcnow()
    batch = [NewMessage(id=f"01JTEST{n:019d}", tenant_id="acme", mail_from="bob@client.test",
                        recipients=("support@acme.test",), data=data,
                        received_at=now, client_address="127.0.0.1", helo="h",
                        protocol="ESMTP", trace_header="", smtputf8=False)
             for n, data in enumerate((raw, plain))]
    with store.engine.begin() as conn:
        _insert_messages(conn, batch)
    assert header_addresses(raw) == [("from", "bob@client.test"), ("to", "support@acme.test"),
                                     ("cc", SUBJECT)]
    found = PrivacyStore(store).find_subject("acme", SUBJECT)
    assert [f.id for f in found] == [batch[0].id]  # a mention in the body is not enough
    assert PrivacyStore(store).find_subject("globex", SUBJECT) == []


def test_the_privacy_key_is_made_once_and_must_be_private(tmp_path):
    path = tmp_path / "var" / "privacy.key"
    key = load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create(path).secret == key.secret
    assert key.subject_hash("A@B.test") == key.subject_hash("a@b.test")
    path.chmod(0o644)
    from gateway.keyfiles import KeyFileError

    with pytest.raises(KeyFileError, match="readable by everyone"):
        load_or_create(path)


def test_the_migration_keeps_events_written_before_the_chain(store):
    """Events from before the chain (hash NULL) may only come first."""
    with store.engine.begin() as conn:
        conn.execute(insert(audit_events).values(id=1, at=utcnow(), actor="old", action="x",
                                                 detail={}))
    store.audit("cli:test", "after")
    verdict = store.verify_audit()
    assert verdict.ok and (verdict.events, verdict.unchained) == (2, 1)
    with store.engine.begin() as conn:
        conn.execute(insert(audit_events).values(id=3, at=utcnow(), actor="sneaky",
                                                 action="x", detail={}))
    assert store.verify_audit().problem == "event 3 has no hash: it was written around the chain"
    time.sleep(0)  # keep the engine's pool quiet before the fixture drops the database
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@pytest.mark.sqlite_only  # the database's own files are SQLite's
def test_what_the_gateway_makes_is_its_users_alone_under_umask_022(make_gateway, tmp_path):
    from tests.test_api import Api, _token
    from tests.test_dkim import keygen

    data = tmp_path / "data"  # none of it is there: the gateway makes every folder
    master = tmp_path / "master.key"
    api_port = free_port()
    umask = os.umask(0o022)  # a start by hand, without the unit's UMask=0077; children inherit it
    try:
        gw = make_gateway({
            "privacy": {"master_key_file": str(master), "keystore": str(data / "keys"),
                        "key_file": str(data / "secrets" / "privacy.key")},
            "admin_api": {"listen": f"127.0.0.1:{api_port}",
                          "export_directory": str(data / "exports" / "api")},
        }, start=False, db_url=f"sqlite:///{data / 'db' / 'gateway.db'}")
        gw.cli("keys", "generate", "--out", str(master), check=True)
        gw.start()
        with gw.smtp() as s:
            s.sendmail("bob@client.test", ["support@acme.test"], b"Subject: mine\r\n\r\nx\r\n")
        [row] = gw.wait_processed(1)
        gw.cli("messages", "export", row["id"], "--out", str(data / "m.eml"), check=True)
        gw.cli("export", "--tenant", "acme", "--out", str(data / "acme.tar"), check=True)
        keygen(data, "acme.test", "s1", "ed25519")
        api = Api(api_port)
        status, started, _ = api.call("POST", "/api/v1/exports", _token(gw, "acme"), {})
        assert status == 202
        archive = data / "exports" / "api" / "acme" / f"{started['id']}.tar"
        wait_for(archive.exists, 30, "the API's export archive")
        made = {p.relative_to(data).as_posix(): stat.S_IMODE(p.stat().st_mode)
                for p in [data, *data.rglob("*")]}  # while the daemon runs: -wal and -shm too
    finally:
        os.umask(umask)
    assert {"db/gateway.db", "db/gateway.db-wal", "db/gateway.db-shm", "keys/acme.json",
            "secrets/privacy.key", "m.eml", "acme.tar", "acme.test.s1.key",
            archive.relative_to(data).as_posix()} <= set(made)
    assert {name: oct(mode) for name, mode in made.items()
            if mode != (0o700 if (data / name).is_dir() else 0o600)} == {}
    assert stat.S_IMODE(master.stat().st_mode) == 0o600


def _hits(data: bytes, address: str) -> int:
    """How often ``address`` is in ``data``, in any case (UTF-8 letters too)."""
    return data.decode("utf-8", "replace").lower().count(address.lower())


def _exported(api: Api, token: str, body: dict[str, Any]) -> str:
    """Start an export over the API and wait for it to be done; its id."""
    status, started, _ = api.call("POST", "/api/v1/exports", token, body)
    assert status == 202, started
    done = wait_for(lambda: (state := api.call("GET", f"/api/v1/exports/{started['id']}",
                                               token)[1])["status"] != "running" and state,
                    30, "export done")
    assert done["status"] == "done", done
    return str(started["id"])


def test_an_erasure_removes_the_exports_made_before_it(make_gateway, tmp_path):
    port = free_port()
    exports = tmp_path / "exports"
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}",
                                     "export_directory": str(exports)}})
    api = Api(port)
    _mixed_mail(gw)
    gw.wait_processed(6)
    acme = _token(gw, "acme")
    # the whole tenant, her own, and bob's (he wrote one of the mails she is in Cc of)
    made = sorted(_exported(api, acme, body) for body in
                  ({}, {"subject": SUBJECT}, {"subject": "bob@client.test"}))
    archives = sorted((exports / "acme").iterdir())
    assert [p.name for p in archives] == [f"{e}.tar" for e in made]
    assert all(_hits(p.read_bytes(), SUBJECT) for p in archives)  # the scan sees her
    before = {p: p.read_bytes() for p in archives}

    status, erased, _ = api.call("POST", "/api/v1/erasures", acme, {"subject": SUBJECT})
    assert status == 200 and erased["messages"] == 3 and sorted(erased["exports"]) == made
    assert list((exports / "acme").iterdir()) == []
    for export_id in made:
        status, doc, headers = api.call("GET", f"/api/v1/exports/{export_id}/archive", acme)
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        assert "removed by an erasure" in doc["error"]
        state = api.call("GET", f"/api/v1/exports/{export_id}", acme)[1]
        assert (state["status"], state["archive"]) == ("removed", None)
    event = _json(gw.cli("audit", "list", "--action", "subject.erase", "--json"))[-1]
    assert sorted(event["detail"]["exports"]) == made

    # one made after it holds the rest of the tenant's mail and nothing of hers
    after = _exported(api, acme, {})
    status, data, _ = api.call("GET", f"/api/v1/exports/{after}/archive", acme)
    assert status == 200 and b"keeptoken-one" in data
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    assert {"mailbox.mbox", "messages.json", "contacts.json"} < set(members)
    assert b"bob@client.test" in members["contacts.json"]
    assert {name: _hits(body, SUBJECT) for name, body in members.items()
            if _hits(body, SUBJECT)} == {}
    assert _hits(data, SUBJECT) == 0
    assert _hits((exports / "acme" / f"{after}.tar").read_bytes(), SUBJECT) == 0

    # an erasure from the command line reaches the API's archives as well
    done = _json(gw.cli("erase", "--tenant", "acme", "--subject", "bob@client.test",
                        "--json"))
    assert done["exports"] == [after] and list((exports / "acme").iterdir()) == []

    # an archive that another instance wrote, on its own disk: that instance deletes it
    path, old = next(iter(before.items()))
    path.write_bytes(old)
    wait_for(lambda: not path.exists(), 15, "the removed archive deleted by the daemon")


def test_an_export_running_during_an_erasure_keeps_no_archive(store, tmp_path):
    privacy = PrivacyStore(store)
    running, elsewhere = "01JEXPORT0000000000000000A", "01JEXPORT0000000000000000B"
    privacy.record_export(running, "acme", None)
    privacy.record_export(elsewhere, "globex", None)
    erased = privacy.erase("acme", [], {"actor": "test", "action": "subject.erase",
                                        "tenant_id": "acme"})
    assert erased.exports == [running]
    # it finishes after the erasure: told so, and its archive does not stay
    archive = tmp_path / "acme" / f"{running}.tar"
    archive.parent.mkdir()
    archive.write_bytes(b"read before the erasure")
    assert privacy.finish_export(running, str(archive), 23, None) is False
    assert privacy.get_export(running, "acme")["status"] == "removed"
    assert tidy(privacy, tmp_path) == [archive] and not archive.exists()
    assert privacy.finish_export(elsewhere, "x", 1, None) is True  # another tenant's


def test_an_export_cannot_start_inside_an_erasure(store):
    """Exports take turns with the erasure's last transaction: one that starts while
    it runs (on another instance) waits for it, and then reads what is left."""
    other = PrivacyStore(Store(database.create(
        store.engine.url.render_as_string(hide_password=False))))
    started = threading.Thread(target=other.record_export,
                               args=("01JEXPORT0000000000000000C", "acme", None))
    try:
        with store.writing() as conn:
            assert _remove_exports(conn, "acme") == []
            started.start()
            if store.engine.dialect.name == "postgresql":  # seen waiting for the lock
                wait_for(lambda: _waiting_for_advisory_locks(store) == 1, 10,
                         "the export waiting for the erasure's lock")
            started.join(1.0)
            assert started.is_alive()  # waits for the erasure to commit
        started.join(30)
        assert not started.is_alive()
        assert PrivacyStore(store).stored_exports("acme") == ["01JEXPORT0000000000000000C"]
    finally:
        other.engine.dispose()


def _waiting_for_advisory_locks(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                 "AND NOT granted")).scalar_one()


SMTPUTF8_MAIL = ("From: Zoë <zoë@people.example>\r\nTo: support@acme.test\r\n"
                 "Subject: grüße\r\n\r\nHallo.\r\n").encode()


def test_mail_is_found_and_erased_by_its_header_addresses_whatever_its_parse(make_gateway):
    """A UTF-8 From (SMTPUTF8) is parsed; mail that mail-parser cannot parse (an error,
    or over the time bound) has the addresses of its header indexed all the same."""
    port = free_port()
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}"},
                       "smtp": {"max_message_size": "10MB"},
                       "pipeline": {"parse_timeout": "1s"}})
    api = Api(port)
    deep = f"From: {SUBJECT}\r\nTo: support@acme.test\r\n".encode() + DEEP
    slow = f"From: Jane <{SUBJECT}>\r\nTo: support@acme.test\r\n".encode() + MANY
    with gw.smtp() as s:  # the envelope names neither: only the headers do
        s.sendmail("bounce@people.example", ["support@acme.test"], SMTPUTF8_MAIL,
                   mail_options=["SMTPUTF8"])
        s.sendmail("bounce@sender.test", ["support@acme.test"], deep)
        s.sendmail("bounce@sender.test", ["support@acme.test"], slow)
    rows = {r["size"]: r for r in gw.wait_processed(3, timeout=60)}
    assert rows[len(SMTPUTF8_MAIL)]["parse_failed"] is False
    assert rows[len(SMTPUTF8_MAIL)]["subject"] == "grüße"
    assert rows[len(deep)]["parse_failed"] and rows[len(slow)]["parse_failed"]
    acme = _token(gw, "acme")
    status, found, _ = api.call("GET", f"/api/v1/messages?address={quote('ZOË@people.example')}",
                                acme)
    assert status == 200
    assert [m["id"] for m in found["messages"]] == [rows[len(SMTPUTF8_MAIL)]["id"]]
    assert found["messages"][0]["from"] == "Zoë <zoë@people.example>"
    found = api.call("GET", f"/api/v1/messages?address={SUBJECT}", acme)[1]["messages"]
    assert sorted(m["id"] for m in found) == sorted([rows[len(deep)]["id"],
                                                     rows[len(slow)]["id"]])

    before = _database_bytes(gw)
    assert _hits(before, "zoë@people.example") and _hits(before, SUBJECT)
    for address, count in (("Zoë@people.example", 1), (SUBJECT, 2)):
        status, erased, _ = api.call("POST", "/api/v1/erasures", acme, {"subject": address})
        assert (status, erased["messages"]) == (200, count)
    assert gw.messages() == []
    after = _database_bytes(gw)
    assert _hits(after, "zoë@people.example") == 0 and _hits(after, SUBJECT) == 0
    assert _hits(after, "bounce@people.example") == 0  # the scan would have seen it


@pytest.mark.sqlite_only  # who the audit log names: any database
def test_operator_reads_of_mail_are_audited_with_the_real_login(gateway):
    """`messages show` and `messages export` are audit events naming the operator by the
    process's login, or under sudo the one who ran sudo: not by $USER, which anyone sets."""
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
    [row] = gateway.wait_processed(1)
    login = pwd.getpwuid(os.getuid()).pw_name
    gateway.cli("messages", "show", row["id"], env={"USER": "mallory"}, check=True)
    gateway.cli("messages", "export", row["id"], "--out", os.devnull,
                env={"USER": "mallory", "SUDO_USER": "alice"}, check=True)
    events = [(e["actor"], e["action"], e["message_id"])
              for e in gateway.store.audit_events("acme") if e["action"].startswith("message.")]
    by_sudo = "cli:alice (sudo)" if os.getuid() == 0 else f"cli:{login}"
    assert events == [(f"cli:{login}", "message.show", row["id"]),
                      (by_sudo, "message.export", row["id"])]


@pytest.mark.sqlite_only  # the command's checks: any database
def test_deactivation_respects_legal_holds_unless_overridden_with_a_reason(make_gateway,
                                                                           tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "retention.yaml").write_text(
        "default: 1y\nholds:\n  - {name: case-7, reason: court, address: held@client.test}\n")
    gw = make_gateway({"policies": {"directory": str(policies)}})
    _send(gw, "held@client.test", "support@acme.test", "under the hold")
    _send(gw, "bob@client.test", "support@acme.test", "not held")
    gw.wait_processed(2)
    token = gw.cli("token", "create", "--tenant", "acme", check=True).stdout.split()[-1]

    dry = gw.cli("tenant", "deactivate", "acme", "--dry-run", check=True).stdout.decode()
    assert "legal hold case-7 (1 messages) covers its mail" in dry
    refused = gw.cli("tenant", "deactivate", "acme", "--yes")
    assert refused.returncode == 1
    assert b"legal hold case-7 (1 messages) covers mail of tenant acme: nothing changed" \
        in refused.stderr
    assert len(gw.messages(tenant="acme")) == 2
    no_reason = gw.cli("tenant", "deactivate", "acme", "--yes", "--override-hold")
    assert no_reason.returncode == 1 and b"--override-hold needs --reason" in no_reason.stderr
    assert len(gw.messages(tenant="acme")) == 2

    gw.cli("tenant", "deactivate", "acme", "--yes", "--override-hold",
           "--reason", "hold lifted by letter of 2 December", check=True)
    assert gw.messages(tenant="acme") == []
    assert _json(gw.cli("token", "list", "--json")) == []
    assert token.decode().startswith("mfr_")
    events = [(e["action"], e["detail"]) for e in _json(
        gw.cli("audit", "list", "--tenant", "acme", "--json"))
        if e["action"].startswith("tenant.")]
    assert events[0] == ("tenant.hold_override", {
        "holds_overridden": ["case-7"], "reason": "hold lifted by letter of 2 December"})
    assert [a for a, _ in events[1:]] == ["tenant.deactivate", "tenant.purge", "tenant.shred"]
