"""The export archive: byte-exact originals, an mbox mail programs read, JSON for the
rest, a manifest that checks out; the subset for one data subject; flat memory."""

from __future__ import annotations

import hashlib
import json
import mailbox
import tarfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import utcnow
from gateway.config import GatewayConfig
from gateway.privacy.export import ArchiveWriter, export, mbox_entry
from gateway.records import NewMessage
from gateway.store.intake import _insert_messages
from gateway.store.privacy import PrivacyStore
from tests.conftest import gateway_with_rules
from tests.test_privacy import SUBJECT, _json, _unreachable_relay

RULES = """
tenants:
  acme:
    rules:
      - name: archive
        actions: {bcc: [archive@copies.test]}
"""
HASH = "scrypt$16384$8$1$zgF2P8KcQwybeWdkCwGBwQ==$JbERpsidAraxwg4f+6LP3KBsQ99xJ7V7DUCiVHz1fms="


class Archive:
    """An export read back with Python's tarfile (what `tar xf` would unpack)."""

    def __init__(self, path: Path) -> None:
        with tarfile.open(path) as t:
            self.files = {m.name: t.extractfile(m).read() for m in t.getmembers()}

    def read(self, name: str) -> bytes:
        return self.files[name]

    def namelist(self) -> list[str]:
        return list(self.files)


def _manifest_checks_out(z: Archive) -> dict[str, Any]:
    manifest = json.loads(z.read("manifest.json"))
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == set(z.namelist()) - {"manifest.json"}
    for name, f in listed.items():
        data = z.read(name)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"]), name
    return manifest


def test_a_tenant_export_round_trips(make_gateway, tmp_path):
    gw = gateway_with_rules(make_gateway, tmp_path, _unreachable_relay(), RULES, {
        "tenants": {"acme": {"users": {"agent@acme.test": {"password_hash": HASH}}}}})
    sent = {
        "plain": b"From: Bob <bob@client.test>\r\nTo: support@acme.test\r\nSubject: plain\r\n"
                 b"\r\nHello.\r\n",
        "fromline": b"From: Bob <bob@client.test>\r\nTo: support@acme.test\r\n"
                    b"Subject: fromline\r\n\r\nFrom the start, a line mbox must quote.\r\n"
                    b">From an already quoted one.\r\n",
        "eightbit": "From: Zoë <zoe@client.test>\r\nTo: billing@acme.test\r\n"
                    "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8"
                    "\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCafé crème, 5 €.\r\n"
                    .encode(),
        "attachment": b"From: bob@client.test\r\nTo: support@acme.test\r\nSubject: attachment"
                      b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"
                      b"\r\n--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--b1\r\n"
                      b"Content-Type: application/pdf; name=a.pdf\r\nContent-Disposition: "
                      b"attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n"
                      b"\r\nJVBERi0xLjQK\r\n--b1--\r\n",
    }
    with gw.smtp() as s:
        for data in sent.values():
            s.sendmail("bob@client.test", ["support@acme.test"], data)
        s.sendmail("bob@client.test", ["x@globex.test"], b"Subject: globex only\r\n\r\nx\r\n")
    gw.wait_processed(5)
    by_subject = {r["subject"]: r for r in gw.messages(tenant="acme")}

    out = tmp_path / "acme.tar"
    result = _json(gw.cli("export", "--tenant", "acme", "--out", str(out), "--json"))
    assert result["messages"] == 4 and out.stat().st_mode & 0o777 == 0o600
    z = Archive(out)
    if True:
        manifest = _manifest_checks_out(z)
        assert manifest["format"] == "mailflowr-export/1" and manifest["tenant"] == "acme"
        assert manifest["counts"]["messages"] == 4
        for name, data in sent.items():
            subject = "café" if name == "eightbit" else name
            assert z.read(f"messages/{by_subject[subject]['id']}.eml") == data
        meta = json.loads(z.read("messages.json"))
        assert sorted(m["id"] for m in meta) == sorted(r["id"] for r in by_subject.values())
        assert {m["subject"] for m in meta} == {"plain", "fromline", "café", "attachment"}
        attachment = next(m for m in meta if m["subject"] == "attachment")
        assert attachment["attachments"][0]["filename"] == "a.pdf"
        deliveries = json.loads(z.read("deliveries.json"))
        assert {(d["kind"], d["recipient"], d["rule"]) for d in deliveries} == {
            ("bcc", "archive@copies.test", "archive")}
        assert len(deliveries) == 4
        contacts = {(c["address"], c["role"]): c["messages"]
                    for c in json.loads(z.read("contacts.json"))}
        assert contacts[("bob@client.test", "mail_from")] == 4
        assert contacts[("zoe@client.test", "from")] == 1
        assert json.loads(z.read("users.json")) == [{"login": "agent@acme.test", "send_as": []}]
        settings = json.loads(z.read("settings.json"))
        assert settings["domains"] == ["acme.test", "acme-mail.test"]
        assert settings["workflows"]["rules"][0]["name"] == "archive"
        everything = b"".join(z.read(n) for n in z.namelist())
        mbox_bytes = z.read("mailbox.mbox")
    assert b"globex only" not in everything  # another tenant's mail
    assert HASH.encode() not in everything  # never a password hash

    path = tmp_path / "mailbox.mbox"
    path.write_bytes(mbox_bytes)
    box = mailbox.mbox(str(path))
    assert sorted(m["Subject"] for m in box) == sorted(
        ["plain", "fromline", "=?utf-8?q?caf=C3=A9?=", "attachment"])
    quoted = next(m for m in box if m["Subject"] == "fromline").get_payload()
    assert "\n>From the start" in "\n" + quoted and ">>From an already quoted" in quoted
    assert next(m for m in box if m["Subject"] == "plain").get_from().startswith(
        "bob@client.test ")
    box.close()

    again = gw.cli("export", "--tenant", "acme", "--out", str(out))
    assert again.returncode == 1 and b"exists" in again.stderr
    events = _json(gw.cli("audit", "list", "--action", "tenant.export", "--json"))
    assert events[-1]["detail"]["messages"] == 4
    assert events[-1]["detail"]["manifest_sha256"] == result["manifest_sha256"]


def test_a_subject_export_is_complete_and_minimal(make_gateway, tmp_path):
    gw = gateway_with_rules(make_gateway, tmp_path, _unreachable_relay(), RULES)
    with gw.smtp() as s:
        # Jane is in Cc; billing@ was a Bcc recipient (envelope only, and a Bcc field
        # the sender's program left in): neither is hers to see.
        s.sendmail("bob@client.test", ["support@acme.test", "billing@acme.test"],
                   f"From: bob@client.test\r\nTo: support@acme.test\r\nCc: {SUBJECT}\r\n"
                   f"Bcc: billing@acme.test\r\nSubject: to jane\r\n\r\nHi Jane.\r\n".encode())
        mine = (f"From: {SUBJECT}\r\nTo: support@acme.test\r\nBcc: info@acme-mail.test\r\n"
                "Subject: from jane\r\n\r\nMy question.\r\n").encode()
        s.sendmail(SUBJECT, ["support@acme.test", "info@acme-mail.test"], mine)
        s.sendmail("bob@client.test", ["support@acme.test"],
                   b"From: bob@client.test\r\nSubject: not about jane\r\n\r\nx\r\n")
    gw.wait_processed(3)
    gw.cli("erase", "--tenant", "acme", "--subject", "someone@else.test", check=True)

    out = tmp_path / "jane.tar"
    result = _json(gw.cli("export", "--tenant", "acme", "--subject", SUBJECT, "--out",
                          str(out), "--json"))
    assert result["messages"] == 2
    z = Archive(out)
    if True:
        _manifest_checks_out(z)
        meta = {m["subject"]: m for m in json.loads(z.read("messages.json"))}
        assert set(meta) == {"to jane", "from jane"}
        assert meta["to jane"]["recipients"] == ["support@acme.test"]
        assert {"role": "cc", "address": SUBJECT} in meta["to jane"]["header_addresses"]
        assert "billing@acme.test" not in json.dumps(meta["to jane"])
        to_jane = z.read(f"messages/{meta['to jane']['id']}.eml")
        assert b"Bcc:" not in to_jane and b"billing@acme.test" not in to_jane
        assert z.read(f"messages/{meta['from jane']['id']}.eml") == mine  # her own, whole
        assert json.loads(z.read("deliveries.json")) == []  # the archive copies are acme's
        assert json.loads(z.read("contacts.json")) == []
        assert "settings.json" not in z.namelist()
        audit = json.loads(z.read("audit.json"))
        assert audit == []  # the erasure above was about someone else
    event = _json(gw.cli("audit", "list", "--subject", SUBJECT, "--json"))
    assert [e["action"] for e in event] == ["subject.export"]


def _fill(store: Any, count: int, size: int) -> None:
    body = (b"x" * 76 + b"\r\n") * (size // 78)
    now = utcnow()
    for start in range(0, count, 500):
        batch = []
        for n in range(start, min(count, start + 500)):
            data = (f"From: s{n}@client.test\r\nTo: support@acme.test\r\nSubject: m{n}\r\n\r\n"
                    .encode() + body)
            batch.append(NewMessage(
                id=f"01JEXP{n:020d}", tenant_id="acme", mail_from=f"s{n}@client.test",
                recipients=("support@acme.test",), data=data,
                received_at=now,
                client_address="127.0.0.1", helo="h", protocol="ESMTP", trace_header="",
                smtputf8=False))
        with store.engine.begin() as conn:
            _insert_messages(conn, batch)


def _peak(store: Any, tmp_path: Path, name: str) -> tuple[int, int]:
    config = GatewayConfig.model_validate(
        {"tenants": {"acme": {"domains": ["acme.test"], "catch_all": True}}})
    tracemalloc.start()
    try:
        result = export(PrivacyStore(store), config, "acme", tmp_path / name, actor="test")
        return tracemalloc.get_traced_memory()[1], result.bytes
    finally:
        tracemalloc.stop()


def test_export_memory_does_not_grow_with_the_mail(store, tmp_path, monkeypatch):
    """Past the working set (a page of rows, three groups of originals in flight), three
    times as much mail takes no more memory to export. (What does grow with a tenant is
    small: a manifest entry per file and a contact entry per address.)"""
    from gateway.store.models import message_addresses, message_blobs, messages
    from gateway.store.privacy import ExportReader

    # Groups of at most 1 MB: each export is many times the working set.  The writing
    # side is the slow one (a slow disk), so the reading thread always runs ahead and
    # both exports fill the read-ahead: which thread is faster must not decide the peak.
    monkeypatch.setattr(ExportReader, "PAGE", 50)
    monkeypatch.setattr(ExportReader, "BLOB_BYTES", 1 << 20)
    add_bytes = ArchiveWriter.add_bytes

    def slow_add_bytes(self: ArchiveWriter, *args: Any, **kw: Any) -> None:
        time.sleep(0.001)
        add_bytes(self, *args, **kw)

    monkeypatch.setattr(ArchiveWriter, "add_bytes", slow_add_bytes)
    _fill(store, 1500, 20_000)
    small, small_bytes = _peak(store, tmp_path, "small.tar")
    with store.engine.begin() as conn:
        for table in (message_addresses, message_blobs, messages):
            conn.execute(table.delete())
    _fill(store, 1500, 60_000)
    large, large_bytes = _peak(store, tmp_path, "large.tar")
    assert large_bytes > 2.9 * small_bytes  # 90 MB of mail against 30 MB
    assert large - small < 2_000_000, (small, large)
    assert large < 40_000_000, large


def test_mbox_entries_quote_from_lines_and_end_with_a_blank_line():
    row = {"mail_from": "", "received_at": utcnow()}
    entry = mbox_entry(row, b"Subject: x\r\n\r\nFrom me\r\n>From you\r\nno end")
    lines = entry.split(b"\n")
    assert lines[0].startswith(b"From MAILER-DAEMON ")
    assert lines[1:] == [b"Subject: x", b"", b">From me", b">>From you", b"no end", b"", b""]


def test_the_read_ahead_thread_passes_errors_on_and_stops_with_its_reader():
    import threading

    from gateway.privacy.export import prefetched

    def failing():
        yield [1]
        raise OSError("the database went away")

    got = []
    with pytest.raises(OSError, match="went away"):
        for group in prefetched(failing()):
            got.append(group)
    assert got == [[1]]

    endless = prefetched([n] for n in range(10**9))
    assert next(endless) == [0]
    endless.close()  # the consumer gives up (e.g. the disk is full): the thread ends
    assert not [t for t in threading.enumerate() if t.name == "export-read"]


def test_our_tar_headers_are_the_ones_tarfile_writes():
    from gateway.privacy.export import ustar_header

    info = tarfile.TarInfo("messages/01JD0000000000000000000000.eml")
    info.size, info.mtime, info.mode = 123456, 1_790_000_000, 0o644
    assert ustar_header(info.name.encode(), 123456, 1_790_000_000) == info.tobuf(
        tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
