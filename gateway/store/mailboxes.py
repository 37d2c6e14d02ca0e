"""Where each imported mailbox folder stands, and the transaction that imports a batch.

The import of a batch and the advance of ``last_uid`` are one transaction: a
message is either stored and counted as imported, or neither, so a crash or a
lost connection never imports a message twice nor skips one.  Each write checks
that this process still holds the folder's lease and that the folder's state is
what it read (compare and set): an instance that lost its lease to another
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update

from gateway.clock import aware, utcnow
from gateway.records import NewMessage
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    FAILED,
    HELD,
    PENDING,
    SENT,
    deliveries,
    imap_folders,
    imap_imports,
    tenants,
)
from gateway.store.repository import Store


@dataclass(frozen=True, slots=True)
class FolderKey:
    tenant_id: str
    source: str
    folder: str

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.source}/{self.folder}"

    def where(self) -> Any:
        return (imap_folders.c.tenant_id == self.tenant_id,
                imap_folders.c.source == self.source, imap_folders.c.folder == self.folder)


@dataclass(frozen=True, slots=True)
class FolderState:
    uidvalidity: int | None
    last_uid: int
    done_uid: int


@dataclass(frozen=True, slots=True)
class Imported:
    """One message of a batch: new (``message`` to store) or already here (``known``:
    the id of the stored message it is a copy of, found on a resync)."""

    uid: int
    sha256: str
    msgid_hash: str | None
    message: NewMessage | None = None
    known: str | None = None

    @property
    def message_id(self) -> str:
        if self.message is not None:
            return self.message.id
        assert self.known is not None
        return self.known


class MailboxState:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def claim(self, key: FolderKey, owner: str, lease: float) -> FolderState | None:
        """Take (or keep) the folder's lease; None while another instance holds it."""
        now = utcnow()
        with self.store.writing() as conn:
            if conn.execute(select(tenants.c.id).where(tenants.c.id == key.tenant_id,
                                                       tenants.c.active.is_(False))).first():
                return None  # deactivated: nothing more is imported for it
            found = conn.execute(select(imap_folders.c.folder).where(*key.where())).first()
            if found is None:
                conn.execute(insert(imap_folders).values(
                    tenant_id=key.tenant_id, source=key.source, folder=key.folder,
                    last_uid=0, done_uid=0, imported=0, backlog=0))
            taken = conn.execute(
                update(imap_folders).where(
                    *key.where(),
                    or_(imap_folders.c.lease_owner.is_(None), imap_folders.c.lease_until < now,
                        imap_folders.c.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease))
            ).rowcount
            if taken != 1:
                return None
            row = conn.execute(select(imap_folders.c.uidvalidity, imap_folders.c.last_uid,
                                      imap_folders.c.done_uid).where(*key.where())).one()
        return FolderState(row.uidvalidity, row.last_uid, row.done_uid)

    def release(self, key: FolderKey, owner: str) -> None:
        with self.store.writing() as conn:
            conn.execute(update(imap_folders)
                         .where(*key.where(), imap_folders.c.lease_owner == owner)
                         .values(lease_owner=None, lease_until=None))

    def _update(self, conn: Any, key: FolderKey, owner: str, state: FolderState,
                **values: Any) -> bool:
        """Compare and set: only if we hold the lease and the state is as we read it."""
        return bool(conn.execute(
            update(imap_folders).where(
                *key.where(), imap_folders.c.lease_owner == owner,
                (imap_folders.c.uidvalidity.is_(None) if state.uidvalidity is None
                 else imap_folders.c.uidvalidity == state.uidvalidity),
                imap_folders.c.last_uid == state.last_uid,
                imap_folders.c.done_uid == state.done_uid)
            .values(**values)).rowcount == 1)

    def restart(self, key: FolderKey, owner: str, state: FolderState,
                uidvalidity: int) -> FolderState | None:
        """Start over under a new UIDVALIDITY (the first look, or the server renumbered)."""
        with self.store.writing() as conn:
            if not self._update(conn, key, owner, state, uidvalidity=uidvalidity, last_uid=0,
                                done_uid=0):
                return None
        return FolderState(uidvalidity, 0, 0)

    def import_batch(self, key: FolderKey, owner: str, state: FolderState, last_uid: int,
                     batch: Sequence[Imported], backlog: int) -> FolderState | None:
        """Store the new messages, record every one, advance last_uid: one transaction.
        None when the lease or the state changed meanwhile (nothing is written)."""
        now = utcnow()
        new = [i.message for i in batch if i.message is not None]
        with self.store.writing() as conn:
            if not self._update(conn, key, owner, state, last_uid=last_uid, backlog=backlog,
                                imported=imap_folders.c.imported + len(new),
                                last_success_at=now, last_error=None):
                return None
            if new:  # hashed already, to find copies of what is here
                _insert_messages(conn, new, self.store.keystore, digests={
                    id(i.message.data): i.sha256 for i in batch if i.message is not None})
            if batch:
                conn.execute(insert(imap_imports), [
                    {"tenant_id": key.tenant_id, "source": key.source, "folder": key.folder,
                     "uidvalidity": state.uidvalidity, "uid": i.uid,
                     "message_id": i.message_id, "sha256": i.sha256,
                     "msgid_hash": i.msgid_hash} for i in batch])
        return FolderState(state.uidvalidity, last_uid, state.done_uid)

    def handled(self, key: FolderKey, owner: str, state: FolderState,
                done_uid: int) -> FolderState | None:
        """The after_import handling is done up to done_uid."""
        with self.store.writing() as conn:
            if not self._update(conn, key, owner, state, done_uid=done_uid):
                return None
        return FolderState(state.uidvalidity, state.last_uid, done_uid)

    def looked(self, key: FolderKey, owner: str) -> None:
        """A look that found nothing new: a success, with no backlog."""
        with self.store.writing() as conn:
            conn.execute(update(imap_folders)
                         .where(*key.where(), imap_folders.c.lease_owner == owner)
                         .values(last_success_at=utcnow(), last_error=None, backlog=0))

    def failed(self, key: FolderKey, owner: str, error: str) -> None:
        with self.store.writing() as conn:
            conn.execute(update(imap_folders)
                         .where(*key.where(), imap_folders.c.lease_owner == owner)
                         .values(last_error=error[:1000], last_error_at=utcnow()))

    def imported_uids(self, key: FolderKey, uidvalidity: int, above: int,
                      upto: int) -> list[int]:
        """UIDs imported (or recognised) in (above, upto]: what after_import applies to."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(imap_imports.c.uid).where(
                    imap_imports.c.tenant_id == key.tenant_id,
                    imap_imports.c.source == key.source, imap_imports.c.folder == key.folder,
                    imap_imports.c.uidvalidity == uidvalidity, imap_imports.c.uid > above,
                    imap_imports.c.uid <= upto).order_by(imap_imports.c.uid))
            return [r.uid for r in rows]

    def known_hashes(self, key: FolderKey, sha256s: Sequence[str]) -> dict[str, str]:
        """Of these content hashes, those imported from this source before (any folder,
        any UIDVALIDITY): hash -> our message id."""
        if not sha256s:
            return {}
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(imap_imports.c.sha256, func.min(imap_imports.c.message_id).label("m"))
                .where(imap_imports.c.tenant_id == key.tenant_id,
                       imap_imports.c.source == key.source,
                       imap_imports.c.sha256.in_(list(sha256s)))
                .group_by(imap_imports.c.sha256))
            return {r.sha256: r.m for r in rows}

    def status(self) -> list[dict[str, Any]]:
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(select(imap_folders).order_by(
                imap_folders.c.tenant_id, imap_folders.c.source, imap_folders.c.folder))
            out = []
            for r in rows:
                row = dict(r._mapping)
                for name in ("last_success_at", "last_error_at", "lease_until"):
                    if row[name] is not None:
                        row[name] = aware(row[name])
                out.append(row)
            return out

    def keep_targets(self) -> list[dict[str, Any]]:
        """Per tenant, IMAP account and folder of kept originals: jobs by state, the
        last append, and the reason of the latest failed attempt still waiting."""
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(deliveries.c.tenant_id, deliveries.c.destination, deliveries.c.recipient,
                       deliveries.c.status, func.count().label("n"),
                       func.max(deliveries.c.last_attempt_at).label("last"))
                .where(deliveries.c.kind == "append")
                .group_by(deliveries.c.tenant_id, deliveries.c.destination,
                          deliveries.c.recipient, deliveries.c.status))
            for r in rows:
                entry = out.setdefault((r.tenant_id, r.destination or "", r.recipient), {
                    "tenant": r.tenant_id, "account": r.destination, "folder": r.recipient,
                    "pending": 0, "held": 0, "sent": 0, "failed": 0, "last_success_at": None,
                    "last_error": None, "last_error_at": None})
                entry[r.status] = r.n
                if r.status == SENT and r.last is not None:
                    entry["last_success_at"] = aware(r.last)
            for (tenant, account, folder), entry in out.items():
                latest = conn.execute(
                    select(deliveries.c.last_error, deliveries.c.last_attempt_at)
                    .where(deliveries.c.kind == "append", deliveries.c.tenant_id == tenant,
                           deliveries.c.destination == account,
                           deliveries.c.recipient == folder,
                           deliveries.c.status.in_([PENDING, HELD, FAILED]),
                           deliveries.c.last_error.is_not(None))
                    .order_by(deliveries.c.last_attempt_at.desc()).limit(1)).first()
                if latest is not None:
                    entry["last_error"] = latest.last_error
                    entry["last_error_at"] = (aware(latest.last_attempt_at)
                                              if latest.last_attempt_at else None)
        return list(out.values())
