"""The reads and deletes behind erasure and deactivation.

A message is deleted with everything the gateway keeps of it: its deliveries
(pending copies and keep-original jobs are cancelled with them), its address
index rows, its raw original, the record of where it was imported from, and
the row itself; a subprocessor notice that was this message forgets which
message it was.  Deleting runs in batches, one transaction each, so that
acceptance is never kept waiting long for the write lock.

On SQLite, ``secure_delete`` (set on every connection) overwrites what is
deleted, and ``scrub()`` copies the WAL back and truncates it, so no old page
still holding the data stays on disk in either file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update

from gateway.clock import utcnow
from gateway.headers import header_addresses
from gateway.records import NewMessage, Removed
from gateway.store import audit
from gateway.store.database import take_turn
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    PROCESSED,
    api_exports,
    api_tokens,
    console_sessions,
    console_users,
    deliveries,
    imap_folders,
    imap_imports,
    legal_holds,
    message_addresses,
    message_blobs,
    messages,
    subject_requests,
    subprocessor_notices,
    subprocessor_objections,
    tenants,
)
from gateway.store.repository import Store
from gateway.store.retention import _delete_messages

BATCH = 500
Progress = Callable[[int], None]  # told the count of messages deleted so far
# api_exports.status: running, then done or failed; removed: an erasure came after
# (or while) it was written, and its archive went with the erased mail.
EXPORT_RUNNING, EXPORT_DONE, EXPORT_REMOVED = "running", "done", "removed"
_KEPT = (EXPORT_RUNNING, EXPORT_DONE)


def lookup_forms(address: str) -> list[str]:
    """The lower-case forms an address is looked up by: Python's (Unicode) and
    SQLite's (ASCII letters only), so the lookup is case-blind on both databases."""
    value = address.strip()
    ascii_only = "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in value)
    return sorted({value.lower(), ascii_only})


@dataclass
class Found:
    """A message that mentions the subject."""

    id: str
    status: str
    tags: list[str]
    addresses: set[str] = field(default_factory=set)  # every address it carries, lower case


class PrivacyStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    # ------------------------------------------------------------ finding
    def find_subject(self, tenant: str, subject: str) -> list[Found]:
        """Every message of ``tenant`` that has ``subject`` as envelope sender or
        recipient, in an address header, or as the recipient of a copy.

        Messages the pipeline has not parsed (yet: received; or not: quarantined, or
        unparseable before their header addresses were indexed) may have only their
        envelope in the index; their headers are read here.
        """
        forms = lookup_forms(subject)
        lowered = subject.strip().lower()
        with self.engine.connect().execution_options(readonly=True) as conn:
            ids = set(conn.execute(
                select(message_addresses.c.message_id)
                .join(messages, messages.c.id == message_addresses.c.message_id)
                .where(messages.c.tenant_id == tenant,
                       func.lower(message_addresses.c.address).in_(forms))
            ).scalars())
            ids.update(conn.execute(
                select(deliveries.c.message_id)
                .where(deliveries.c.tenant_id == tenant,
                       func.lower(deliveries.c.recipient).in_(forms))
            ).scalars())
            unparsed = conn.execution_options(yield_per=200).execute(
                select(messages.c.id, message_blobs.c.data, message_blobs.c.key_id)
                .join(message_blobs, message_blobs.c.message_id == messages.c.id)
                .where(messages.c.tenant_id == tenant,
                       or_(messages.c.status != PROCESSED, messages.c.parse_failed))
            )
            for row in unparsed:
                if row.id not in ids and lowered in {a for _, a in header_addresses(
                        self.store.plain(row.id, row.key_id, row.data))}:
                    ids.add(row.id)
            return self._describe(conn, sorted(ids))

    def find_message(self, tenant: str, message_id: str) -> Found | None:
        """One message of ``tenant`` as erasure sees it; None when it has none such."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            mine = conn.execute(select(messages.c.id).where(
                messages.c.id == message_id, messages.c.tenant_id == tenant)).first()
            found = self._describe(conn, [message_id]) if mine else []
        return found[0] if found else None

    def tenant_messages(self, tenant: str) -> Iterable[list[Found]]:
        """Every message of ``tenant`` as erasure sees it, a page at a time."""
        after = ""
        while True:
            with self.engine.connect().execution_options(readonly=True) as conn:
                ids = list(conn.execute(
                    select(messages.c.id).where(messages.c.tenant_id == tenant,
                                                messages.c.id > after)
                    .order_by(messages.c.id).limit(BATCH)).scalars())
                if not ids:
                    return
                page = self._describe(conn, ids)
            yield page
            after = ids[-1]

    def _describe(self, conn: Any, ids: Sequence[str]) -> list[Found]:
        found: dict[str, Found] = {}
        for chunk in _chunks(ids):
            for r in conn.execute(select(messages.c.id, messages.c.status, messages.c.tags)
                                  .where(messages.c.id.in_(chunk))):
                found[r.id] = Found(r.id, r.status, list(r.tags or []))
            for r in conn.execute(select(message_addresses.c.message_id,
                                         message_addresses.c.address)
                                  .where(message_addresses.c.message_id.in_(chunk))):
                found[r.message_id].addresses.add(r.address.lower())
        return [found[i] for i in ids if i in found]

    # ------------------------------------------------------------ deleting
    def delete(self, ids: Sequence[str], progress: Progress | None = None,
               total: Removed | None = None) -> Removed:
        """Delete these messages completely, in batches (added to ``total``); after
        each, ``progress`` gets the count of messages deleted so far."""
        total = Removed() if total is None else total
        for chunk in _chunks(ids):
            with self.store.writing() as conn:
                total.add(_delete_messages(conn, chunk))
            if progress is not None:
                progress(total.messages)
        return total

    def erase(self, tenant: str, ids: Sequence[str], audit_event: dict[str, Any],
              progress: Progress | None = None) -> Removed:
        """Delete these messages of ``tenant`` completely, in batches, and with the last
        batch remove every export of the tenant made before (see ``_remove_exports``)
        and write the audit event (the keyword arguments of ``audit.append``)."""
        last = max(0, (len(ids) - 1) // BATCH * BATCH)
        total = self.delete(ids[:last], progress)
        with self.store.writing() as conn:
            total.add(_delete_messages(conn, ids[last:]))
            total.exports = _remove_exports(conn, tenant)
            detail = {**audit_event.get("detail", {}), **total.as_dict()}
            audit.append(conn, self.store.audit_key, **{**audit_event, "detail": detail})
        if progress is not None:
            progress(total.messages)
        return total

    def scrub(self, attempts: int = 5) -> bool:
        """SQLite: merge the search index (dropping the words of deleted messages), then
        copy the WAL into the database and truncate it, so pages from before a delete
        are gone from disk.  False when a reader kept it from finishing."""
        if self.engine.dialect.name != "sqlite":
            return True
        self.store.scrub_index()
        for _ in range(attempts):
            raw = self.engine.raw_connection()
            try:
                busy = raw.driver_connection.execute(  # type: ignore[union-attr]
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                raw.close()
            if not busy:
                return True
        return False

    # ------------------------------------------------------------ admin API
    def search(self, tenant: str, *, after: str | None, limit: int, address: str | None,
               since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
        """A page of the tenant's messages (id order), with their envelope recipients."""
        q = select(messages).where(messages.c.tenant_id == tenant)
        if after:
            q = q.where(messages.c.id > after)
        if since is not None:
            q = q.where(messages.c.received_at >= since)
        if until is not None:
            q = q.where(messages.c.received_at < until)
        if address is not None:
            q = q.where(messages.c.id.in_(
                select(message_addresses.c.message_id)
                .where(func.lower(message_addresses.c.address).in_(lookup_forms(address)))))
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.order_by(messages.c.id)
                                                           .limit(limit))]
            recipients: dict[str, list[str]] = {r["id"]: [] for r in rows}
            if rows:
                for a in conn.execute(select(message_addresses.c.message_id,
                                             message_addresses.c.address)
                                      .where(message_addresses.c.message_id.in_(
                                          list(recipients)),
                                          message_addresses.c.role == "rcpt_to")
                                      .order_by(message_addresses.c.id)):
                    recipients[a.message_id].append(a.address)
        for r in rows:
            r["recipients"] = recipients[r["id"]]
        return rows

    def record_export(self, export_id: str, tenant: str, subject: str | None) -> None:
        with self.store.writing() as conn:
            take_turn(conn, _exports_turn(tenant))  # see _remove_exports
            conn.execute(insert(api_exports).values(
                id=export_id, tenant_id=tenant, subject=subject, status=EXPORT_RUNNING,
                created_at=utcnow()))

    def finish_export(self, export_id: str, path: str | None, size: int,
                      error: str | None) -> bool:
        """Record the end of an export; False when it was removed while it ran (by an
        erasure, or with its tenant): then its archive must go too."""
        with self.store.writing() as conn:
            finished = conn.execute(
                update(api_exports)
                .where(api_exports.c.id == export_id, api_exports.c.status == EXPORT_RUNNING)
                .values(status="failed" if error else EXPORT_DONE, finished_at=utcnow(),
                        path=path, size=size, error=error)).rowcount
        return bool(finished)

    def stored_exports(self, tenant: str) -> list[str]:
        """The tenant's exports that are running or done (an erasure would remove them)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return _stored_exports(conn, tenant)

    def expire_exports(self, before: datetime) -> list[str]:
        """Mark the exports finished before ``before`` removed (their archives go with
        the next ``export.tidy`` on the instance that holds them); their ids."""
        with self.store.writing() as conn:
            ids = list(conn.execute(select(api_exports.c.id).where(
                api_exports.c.status == EXPORT_DONE,
                api_exports.c.finished_at < before)).scalars())
            if ids:
                conn.execute(update(api_exports).where(api_exports.c.id.in_(ids)).values(
                    status=EXPORT_REMOVED, error="expired (admin_api.export_expiry)"))
        return ids

    def kept_exports(self, ids: Sequence[str]) -> set[str]:
        """Those of these exports whose archives stay: running or done."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return {i for chunk in _chunks(ids) for i in conn.execute(
                select(api_exports.c.id).where(api_exports.c.id.in_(chunk),
                                               api_exports.c.status.in_(_KEPT))).scalars()}

    def get_export(self, export_id: str, tenant: str) -> dict[str, Any] | None:
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(select(api_exports).where(
                api_exports.c.id == export_id, api_exports.c.tenant_id == tenant)).first()
        return dict(row._mapping) if row else None

    # ------------------------------------------------------------ notices
    def queue_notice(self, message: NewMessage, actor: str, action: str,
                     detail: dict[str, Any]) -> None:
        """Store an outbound notice and its audit event in one transaction."""
        with self.store.writing() as conn:
            _insert_messages(conn, [message], self.store.keystore)
            audit.append(conn, self.store.audit_key, actor=actor, action=action,
                         tenant_id=message.tenant_id, message_id=message.id, detail=detail)

    # ------------------------------------------------------------ tenants
    def tenant_row(self, tenant: str) -> dict[str, Any] | None:
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(select(tenants).where(tenants.c.id == tenant)).first()
        return dict(row._mapping) if row else None

    def count_messages(self, tenant: str) -> int:
        with self.engine.connect().execution_options(readonly=True) as conn:
            return int(conn.execute(select(func.count()).select_from(messages)
                                    .where(messages.c.tenant_id == tenant)).scalar_one())

    def inactive_tenants(self) -> set[str]:
        with self.engine.connect().execution_options(readonly=True) as conn:
            return set(conn.execute(
                select(tenants.c.id).where(tenants.c.active.is_(False))).scalars())

    def deactivate(self, tenant: str, actor: str) -> datetime:
        """Mark the tenant inactive (its mail is refused from now on); when it was."""
        now = utcnow()
        with self.store.writing() as conn:
            conn.execute(update(tenants).where(tenants.c.id == tenant)
                         .values(active=False, deactivated_at=now))
            audit.append(conn, self.store.audit_key, actor=actor, action="tenant.deactivate",
                         tenant_id=tenant, at=now, detail={"step": "mail refused"})
        return now

    def purge_tenant(self, tenant: str, actor: str,
                     progress: Progress | None = None) -> Removed:
        """Delete every message and every record of an (inactive) tenant."""
        total = Removed()
        while True:
            with self.engine.connect().execution_options(readonly=True) as conn:
                ids = list(conn.execute(select(messages.c.id)
                                        .where(messages.c.tenant_id == tenant)
                                        .limit(BATCH)).scalars())
            if not ids:
                break
            self.delete(ids, progress, total)
        with self.store.writing() as conn:
            # copies whose message is gone already, import state, consent records
            total.deliveries += conn.execute(
                delete(deliveries).where(deliveries.c.tenant_id == tenant)).rowcount
            total.imports += conn.execute(
                delete(imap_imports).where(imap_imports.c.tenant_id == tenant)).rowcount
            total.exports = list(conn.execute(select(api_exports.c.id).where(
                api_exports.c.tenant_id == tenant)).scalars())
            for table in (imap_folders, subprocessor_notices, subprocessor_objections,
                          api_tokens, api_exports, subject_requests, legal_holds,
                          console_sessions, console_users):
                conn.execute(delete(table).where(table.c.tenant_id == tenant))
            if total.messages or total.deliveries or total.imports or total.exports:
                audit.append(conn, self.store.audit_key, actor=actor, action="tenant.purge",
                             tenant_id=tenant, detail=total.as_dict())
        return total


def _exports_turn(tenant: str) -> str:
    return f"mailflowr exports of {tenant}"


def _remove_exports(conn: Any, tenant: str) -> list[str]:
    """Mark every running or finished export of ``tenant`` removed, in the caller's
    transaction (an erasure's last); their ids.  The archives themselves are deleted
    by whoever can reach them (``privacy.export.tidy``); an export still running
    learns it when it finishes (``finish_export``) and deletes its own.

    Exports start in turns with this (``record_export``): an export started before
    is marked here, one started after reads only what is left after the erasure
    (PostgreSQL: else one could start between this UPDATE and the commit, and read
    the erased messages, not yet deleted for it)."""
    take_turn(conn, _exports_turn(tenant))
    ids = _stored_exports(conn, tenant)
    if ids:
        conn.execute(update(api_exports).where(api_exports.c.id.in_(ids)).values(
            status=EXPORT_REMOVED, error="removed by an erasure that came after it"))
    return ids


def _stored_exports(conn: Any, tenant: str) -> list[str]:
    return list(conn.execute(select(api_exports.c.id).where(
        api_exports.c.tenant_id == tenant, api_exports.c.status.in_(_KEPT))).scalars())


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), BATCH):
        yield list(ids[start:start + BATCH])


# ---------------------------------------------------------------- export reads
class ExportReader:
    """A tenant's data, read page by page (keyset pagination): an export of any size
    holds one page in memory, and no transaction stays open for its whole length."""

    PAGE = 200
    BLOB_BYTES = 8 << 20

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def _read(self) -> Any:
        return self.engine.connect().execution_options(readonly=True)

    def messages(self, tenant: str, ids: Sequence[str] | None = None
                 ) -> Iterable[list[dict[str, Any]]]:
        """Message rows in id order, each with ``data`` (the original) and
        ``addresses`` [(role, address)]; only ``ids`` (sorted) when given.  Yielded in
        groups whose originals add up to at most BLOB_BYTES (or one message)."""
        after = ""
        while True:
            with self._read() as conn:
                q = (select(messages)
                     .where(messages.c.tenant_id == tenant, messages.c.id > after)
                     .order_by(messages.c.id).limit(self.PAGE))
                if ids is not None:
                    chunk = [i for i in ids if i > after][:self.PAGE]
                    if not chunk:
                        return
                    q = q.where(messages.c.id.in_(chunk))
                page = [dict(r._mapping) for r in conn.execute(q)]
                if not page:
                    return
                by_id = {r["id"]: r for r in page}
                for r in page:
                    r["addresses"] = []
                for a in conn.execute(select(message_addresses.c.message_id,
                                             message_addresses.c.role,
                                             message_addresses.c.address)
                                      .where(message_addresses.c.message_id.in_(list(by_id)))
                                      .order_by(message_addresses.c.id)):
                    by_id[a.message_id]["addresses"].append((a.role, a.address))
            after = page[-1]["id"]
            for group in _by_size(page, self.BLOB_BYTES):
                with self._read() as conn:
                    data = {b.message_id: self.store.plain(b.message_id, b.key_id, b.data)
                            for b in conn.execute(
                                select(message_blobs.c.message_id, message_blobs.c.data,
                                       message_blobs.c.key_id)
                                .where(message_blobs.c.message_id.in_(
                                    [r["id"] for r in group])))}
                # Copies: the page's own rows must not keep the originals alive (a page
                # of large messages would be held whole until its last group is written).
                yield [{**r, "data": data.pop(r["id"])} for r in group
                       if r["id"] in data]  # else deleted meanwhile

    def deliveries(self, tenant: str, message_ids: Sequence[str] | None = None
                   ) -> Iterable[dict[str, Any]]:
        after = 0
        while True:
            with self._read() as conn:
                q = (select(deliveries).where(deliveries.c.tenant_id == tenant,
                                              deliveries.c.id > after)
                     .order_by(deliveries.c.id).limit(self.PAGE * 5))
                if message_ids is not None:
                    q = q.where(deliveries.c.message_id.in_(list(message_ids)))
                rows = [dict(r._mapping) for r in conn.execute(q)]
            if not rows:
                return
            yield from rows
            after = rows[-1]["id"]

    def contacts(self, tenant: str) -> Iterable[dict[str, Any]]:
        """Every address seen in the tenant's mail: in which roles, how often, when."""
        address = func.lower(message_addresses.c.address)
        with self._read() as conn:
            result = conn.execution_options(yield_per=1000).execute(
                select(address.label("address"), message_addresses.c.role,
                       func.count().label("messages"),
                       func.min(messages.c.received_at).label("first_seen"),
                       func.max(messages.c.received_at).label("last_seen"))
                .join(messages, messages.c.id == message_addresses.c.message_id)
                .where(messages.c.tenant_id == tenant, message_addresses.c.address != "")
                .group_by(address, message_addresses.c.role)
                .order_by(address, message_addresses.c.role))
            try:
                for r in result:
                    yield dict(r._mapping)
            finally:
                result.close()

    def rows(self, table: Any, tenant: str) -> list[dict[str, Any]]:
        """The tenant's rows of a small table (import state, notices, objections)."""
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(table).where(table.c.tenant_id == tenant))]


def _by_size(rows: list[dict[str, Any]], limit: int) -> Iterable[list[dict[str, Any]]]:
    """Consecutive groups of rows whose sizes add up to at most ``limit`` (or one row)."""
    group: list[dict[str, Any]] = []
    total = 0
    for r in rows:
        if group and total + r["size"] > limit:
            yield group
            group, total = [], 0
        group.append(r)
        total += r["size"]
    if group:
        yield group
