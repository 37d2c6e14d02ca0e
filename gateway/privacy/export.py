"""The export archive: everything the gateway holds about a tenant, or about one
data subject within a tenant, as one tar file (POSIX pax; ``tar xf`` and every
archive program open it).

::

    manifest.json        format, tenant, counts, and every other file's size and SHA-256
    messages/ID.eml      each message exactly as it was received (our trace not added)
    mailbox.mbox         all of them in one mbox (mboxrd, LF line ends), for mail clients
    messages.json        metadata: envelope, headers, size, attachments, tags, checks
    deliveries.json      copies, routes and kept originals, with their outcome
    contacts.json        every address seen, in which roles, how often, first and last
    settings.json        domains, addresses, keep-original, mailbox import, workflow,
                         retention and subprocessor terms of the tenant
    users.json           users of the submission service (never password hashes)
    mailboxes.json       where each imported mailbox folder stands
    notices.json         subprocessor notices and objections
    audit.json           the tenant's audit events

A subject export (``--subject``) holds only the messages in which the person
appears, the copies sent to them, their own user entry and the audit events
about them; of each message's envelope only the recipients visible in its
headers and the person themself, and the Bcc field is left out of the .eml
unless the person sent it: other people's Bcc data is not theirs to receive.

Written as it is read: the originals go into the archive one by one, the mbox
and the JSON files grow in temporary files beside it, so memory stays flat
whatever the size of the tenant.  The archive appears under its name only when
complete.

The admin API keeps its archives in a directory of its own until an erasure
removes them (``tidy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from gateway import __version__, files
from gateway.clock import aware
from gateway.config import GatewayConfig
from gateway.privacy import requests
from gateway.privacy.keys import load_or_create
from gateway.store.models import imap_folders, subprocessor_notices, subprocessor_objections
from gateway.store.privacy import ExportReader, PrivacyStore
from gateway.yamlfile import YamlFileError, load_yaml

T = TypeVar("T")
_EXPORT_ID = re.compile(r"[0-9A-Z]{26}")
FORMAT = "mailflowr-export/1"
_MBOX_FROM = re.compile(rb"^(>*From )", re.MULTILINE)
_BCC = re.compile(rb"^Bcc:.*(?:\r?\n[ \t].*)*\r?\n", re.IGNORECASE | re.MULTILINE)
_COPY_CHUNK = 1 << 20


@dataclass
class ExportResult:
    path: Path
    messages: int = 0
    bytes: int = 0  # of the originals
    size: int = 0  # of the archive
    seconds: float = 0.0
    manifest_sha256: str = ""
    files: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return aware(value).isoformat()
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, sort_keys=True)


class _Hashed:
    """A temporary file that counts and hashes what is written to it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory, buffering=_COPY_CHUNK)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)


class _JsonArray(_Hashed):
    def __init__(self, directory: Path, name: str) -> None:
        super().__init__(directory, name)
        self.count = 0
        self.write(b"[")

    def add(self, item: Any) -> None:
        self.write((",\n" if self.count else "\n").encode() + _dumps(item).encode())
        self.count += 1

    def close(self) -> None:
        self.write(b"\n]\n")


class ArchiveWriter:
    """A tar archive (POSIX pax) written as a stream, with the manifest of every file.

    tar rather than ZIP: a ZIP's directory at the end must be held in memory entry
    by entry until then, a tar needs nothing but the next header.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        # personal data: readable by the owner only, from the first byte
        self.file = os.fdopen(files.create(self.tmp), "wb", buffering=_COPY_CHUNK)
        self.listing = tempfile.TemporaryFile(dir=path.parent)  # the manifest's file list
        self.files = 0
        self.mtime = int(time.time())

    def _header(self, name: str, size: int) -> None:
        if name.isascii() and len(name) < 100 and size < 0o77777777777:
            self.file.write(ustar_header(name.encode(), size, self.mtime))
            return
        info = tarfile.TarInfo(name)  # pax for whatever a plain header cannot hold
        info.size, info.mtime, info.mode = size, self.mtime, 0o644
        self.file.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self.file.write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def _listed(self, name: str, size: int, sha256: str) -> None:
        self.listing.write((_dumps({"path": name, "size": size, "sha256": sha256})
                            + "\n").encode())
        self.files += 1

    def add_bytes(self, name: str, data: bytes, sha256: str | None = None) -> None:
        self._header(name, len(data))
        self.file.write(data)
        self._pad(len(data))
        self._listed(name, len(data), sha256 or hashlib.sha256(data).hexdigest())

    def add_temp(self, temp: _Hashed, listed: bool = True) -> None:
        temp.file.seek(0)
        self._header(temp.name, temp.size)
        shutil.copyfileobj(temp.file, self.file, _COPY_CHUNK)
        self._pad(temp.size)
        temp.file.close()
        if listed:
            self._listed(temp.name, temp.size, temp.sha.hexdigest())

    def finish(self, header: dict[str, Any]) -> str:
        """Add manifest.json (header + file list), end the archive, move it into place;
        the manifest's SHA-256."""
        manifest = _Hashed(self.path.parent, "manifest.json")
        head = _dumps({**header, "files": []})
        cut = head.rindex("[]")
        manifest.write(head[:cut].encode() + b"[")
        self.listing.seek(0)
        for n, line in enumerate(self.listing):
            manifest.write((b",\n  " if n else b"\n  ") + line.rstrip(b"\n"))
        manifest.write(b"\n]" + head[cut + 2:].encode() + b"\n")
        self.listing.close()
        self.add_temp(manifest, listed=False)
        end = self.file.tell() + 2 * tarfile.BLOCKSIZE
        self.file.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)
        return manifest.sha.hexdigest()

    def abandon(self) -> None:
        self.file.close()
        self.listing.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def ustar_header(name: bytes, size: int, mtime: int) -> bytes:
    """A POSIX ustar header for a plain file, as tarfile writes it, without its cost."""
    h = bytearray(tarfile.BLOCKSIZE)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def mbox_entry(row: dict[str, Any], raw: bytes) -> bytes:
    """One message as an mbox entry: a From_ line, the message with LF line ends and
    mboxrd quoting (a '>' before any line of '>'s and 'From '), a blank line."""
    sender = row["mail_from"] or "MAILER-DAEMON"
    if len(sender.split()) != 1:  # a From_ line separates by whitespace
        sender = "MAILER-DAEMON"
    when = aware(row["received_at"]).astimezone(UTC).strftime("%a %b %e %H:%M:%S %Y")
    body = raw.replace(b"\r\n", b"\n")
    if body.startswith((b"From ", b">")) or b"\nFrom " in body or b"\n>" in body:
        body = _MBOX_FROM.sub(rb">\1", body)
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender} {when}\n".encode("utf-8", "surrogateescape") + body + b"\n"


def _metadata(row: dict[str, Any], visible: set[str] | None) -> dict[str, Any]:
    """What messages.json says about one message; ``visible``: a subject export's
    filter of the addresses it may show (None: all)."""
    recipients = [a for role, a in row["addresses"] if role == "rcpt_to"]
    headers = [{"role": role, "address": a} for role, a in row["addresses"]
               if role not in ("mail_from", "rcpt_to")]
    if visible is not None:
        recipients = [a for a in recipients if a.lower() in visible]
        headers = [h for h in headers if h["role"] != "bcc" or h["address"] in visible]
    auth = row["auth_results"] or {}
    return {
        "id": row["id"], "received_at": row["received_at"], "status": row["status"],
        "direction": row["direction"], "protocol": row["protocol"],
        "client_address": row["client_address"], "helo": row["helo"],
        "sender": row["mail_from"], "recipients": recipients,
        "submitted_by": row["submitted_by"], "message_id": row["message_id"],
        "from": row["header_from"], "to": row["header_to"], "cc": row["header_cc"],
        "subject": row["subject"], "date": row["date"], "header_addresses": headers,
        "size": row["size"], "sha256": row["sha256"], "attachments": row["attachments"] or [],
        "tags": row["tags"] or [], "policy_version": row["policy_version"],
        "authentication": {k: auth[k] for k in ("dkim", "spf", "dmarc", "arc") if k in auth},
        "parse_failed": row["parse_failed"], "defects": row["defects"] or [],
        "processed_at": row["processed_at"], "file": f"messages/{row['id']}.eml",
    }


def _delivery(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "message_id", "kind", "recipient", "destination",
                                "rule", "status", "attempts", "created_at", "last_attempt_at",
                                "last_error")}


def _settings(config: GatewayConfig, tenant: str) -> dict[str, Any]:
    t = config.tenants.get(tenant)
    out: dict[str, Any] = {"tenant": tenant}
    if t is not None:
        out.update(t.model_dump(mode="json", exclude={"users"}))
    for name in ("workflows.yaml", "retention.yaml", "subprocessors.yaml"):
        path = config.policies.directory / name
        try:
            doc = load_yaml(path).data  # bounded: a hostile policy file is skipped, not a crash
        except YamlFileError:
            continue
        section = (doc or {}).get("tenants", {}) if isinstance(doc, dict) else {}
        if isinstance(section, dict) and tenant in section:
            out[name.removesuffix(".yaml")] = section[tenant]
    return out


def _users(config: GatewayConfig, tenant: str, subject: str | None) -> list[dict[str, Any]]:
    t = config.tenants.get(tenant)
    if t is None:
        return []
    return [{"login": login, "send_as": list(u.send_as)} for login, u in t.users.items()
            if subject is None or login.lower() == subject
            or subject in (a.lower() for a in u.send_as)]


def export(store: PrivacyStore, config: GatewayConfig, tenant: str, out: Path, *,
           actor: str, subject: str | None = None,
           audit_detail: dict[str, Any] | None = None,
           progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the archive for ``tenant`` (or one ``subject`` of it) to ``out``, and
    record it in the audit log (``audit_detail`` added to the event's detail);
    ``progress`` is told the messages and bytes written so far after each message."""
    started = time.monotonic()
    subject_hash = (load_or_create(config.privacy.key_file).subject_hash(subject)
                    if subject else None)
    audit_events = store.store.audit_events(tenant)
    reader = ExportReader(store.store)
    who = subject.strip().lower() if subject else None
    ids = [f.id for f in store.find_subject(tenant, subject)] if subject else None
    result = ExportResult(out)
    archive = ArchiveWriter(out)
    try:
        temps = out.parent
        mbox = _Hashed(temps, "mailbox.mbox")
        meta = _JsonArray(temps, "messages.json")
        for row in _rows(prefetched(_prepared(reader.messages(tenant, ids), who))):
            raw: bytes = row["data"]
            archive.add_bytes(f"messages/{row['id']}.eml", raw, row["data_sha256"])
            mbox.write(row["mbox"])
            meta.add(_metadata(row, _visible(row, who) if who else None))
            result.messages += 1
            result.bytes += len(raw)
            if progress is not None:
                progress(result.messages, result.bytes)
        meta.close()
        archive.add_temp(mbox)
        archive.add_temp(meta)

        deliveries = _JsonArray(temps, "deliveries.json")
        for d in reader.deliveries(tenant, ids):
            if who is None or d["recipient"].lower() == who:
                deliveries.add(_delivery(d))
        deliveries.close()
        archive.add_temp(deliveries)

        contacts = _JsonArray(temps, "contacts.json")
        if who is None:
            for c in reader.contacts(tenant):
                contacts.add(c)
        contacts.close()
        archive.add_temp(contacts)

        archive.add_bytes("users.json", _dumps(_users(config, tenant, who)).encode())
        if who is None:
            archive.add_bytes("settings.json", _dumps(_settings(config, tenant)).encode())
            archive.add_bytes("mailboxes.json",
                              _dumps(reader.rows(imap_folders, tenant)).encode())
            archive.add_bytes("notices.json", _dumps({
                "notices": reader.rows(subprocessor_notices, tenant),
                "objections": reader.rows(subprocessor_objections, tenant)}).encode())
        audit = _JsonArray(temps, "audit.json")
        wanted = set(ids or ())
        for e in audit_events:
            if who is None or e["message_id"] in wanted or \
                    (e["detail"] or {}).get("subject") == subject_hash:
                audit.add({k: e[k] for k in ("id", "at", "actor", "action", "message_id",
                                             "detail", "hash")})
        audit.close()
        archive.add_temp(audit)
        result.counts = {"messages": result.messages, "deliveries": deliveries.count,
                         "contacts": contacts.count, "audit_events": audit.count}
        header = {"format": FORMAT, "gateway_version": __version__, "tenant": tenant,
                  "subject": subject_hash, "created_at": datetime.now(UTC).isoformat(),
                  "counts": result.counts, "message_bytes": result.bytes}
        result.files = archive.files
        result.manifest_sha256 = archive.finish(header)
    except BaseException:
        archive.abandon()
        raise
    result.size = out.stat().st_size
    result.seconds = time.monotonic() - started
    detail: dict[str, Any] = {"messages": result.messages, "bytes": result.size,
                              "manifest_sha256": result.manifest_sha256, **(audit_detail or {})}
    if subject_hash:
        detail["subject"] = subject_hash
    store.store.audit(actor, "subject.export" if subject else "tenant.export",
                      tenant_id=tenant, detail=detail)
    if subject:
        export_id = (audit_detail or {}).get("export")
        requests.fulfilled(store.store, tenant, subject, "export",
                           f"export {export_id}" if export_id else "export (command line)",
                           actor)
    return result


def _senders(row: dict[str, Any]) -> set[str]:
    return {a.lower() for role, a in row["addresses"] if role in ("mail_from", "from", "sender")}


def _visible(row: dict[str, Any], who: str) -> set[str]:
    """The addresses a subject export may show: those in the visible headers, and the
    person themself (a Bcc recipient sees only that they received it)."""
    shown = {a.lower() for role, a in row["addresses"] if role not in ("rcpt_to", "bcc")}
    return shown | {who}


def _prepared(groups: Iterable[list[dict[str, Any]]], who: str | None
              ) -> Iterator[list[dict[str, Any]]]:
    """Each message as it goes into the archive, with its SHA-256 and mbox entry:
    done in the read-ahead thread, where hashing runs beside the writing."""
    for group in groups:
        for row in group:
            if who and who not in _senders(row):
                row["data"] = without_bcc(row["data"])
            row["data_sha256"] = hashlib.sha256(row["data"]).hexdigest()
            row["mbox"] = mbox_entry(row, row["data"])
        yield group


def _rows(groups: Iterable[list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    for group in groups:
        yield from group


def prefetched(groups: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``groups``, read by a thread of their own up to ``depth`` ahead: the database
    works on the next group while this one is written (memory: depth + 1 groups)."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for group in groups:
                while not stop.is_set():
                    try:
                        slots.put(group, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put(_Failed(exc))

    thread = threading.Thread(target=produce, name="export-read", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.2)
        thread.join()


@dataclass
class _Failed:
    exc: BaseException


def without_bcc(raw: bytes) -> bytes:
    """The message without its Bcc fields (header section only)."""
    end = raw.find(b"\r\n\r\n")
    head, rest = (raw, b"") if end < 0 else (raw[:end + 2], raw[end + 2:])
    return _BCC.sub(b"", head) + rest


def tidy(store: PrivacyStore, directory: Path) -> list[Path]:
    """Delete the archives in ``directory`` (the admin API's: one folder per tenant),
    finished or half-written, of exports that are no longer running or done: removed
    by an erasure, here or on another instance.  The files deleted."""
    found: dict[str, list[Path]] = {}
    try:
        for folder in directory.iterdir():
            for path in folder.iterdir() if folder.is_dir() else ():
                # ID.tar, or .ID.tar.PID.tmp while it is written
                export_id = path.name.lstrip(".").split(".", 1)[0]
                if _EXPORT_ID.fullmatch(export_id):
                    found.setdefault(export_id, []).append(path)
    except FileNotFoundError:  # no export made on this machine yet
        return []
    kept = store.kept_exports(sorted(found)) if found else set()
    gone = [path for export_id, paths in found.items() if export_id not in kept
            for path in paths]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone
