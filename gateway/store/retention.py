"""What retention deletes: stored mail grouped by tenant and tags, counted and
deleted past a cutoff, with everything kept of each message."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    delete,
    exists,
    func,
    select,
    update,
)

from gateway.clock import aware
from gateway.records import (
    Removed,
    RetentionGroup,
)
from gateway.store import search
from gateway.store.base import StoreBase
from gateway.store.models import (
    PENDING,
    RECEIVED,
    deliveries,
    imap_imports,
    message_addresses,
    message_blobs,
    messages,
    subprocessor_notices,
)


def _delete_messages(conn: Any, ids: Sequence[str]) -> Removed:
    """Delete messages with everything the gateway keeps of them, in the caller's
    transaction: deliveries (pending copies and keep-original jobs are cancelled with
    them), address rows, originals, search index entries, the record of the mailbox
    they were imported from; a subprocessor notice that was one of them forgets which.
    Retention and erasure both delete through here."""
    if not ids:
        return Removed()
    ids = list(ids)
    pending = conn.execute(select(func.count()).select_from(deliveries).where(
        deliveries.c.message_id.in_(ids), deliveries.c.status == PENDING)).scalar_one()
    removed = Removed(pending=pending)
    removed.deliveries = conn.execute(
        delete(deliveries).where(deliveries.c.message_id.in_(ids))).rowcount
    removed.imports = conn.execute(
        delete(imap_imports).where(imap_imports.c.message_id.in_(ids))).rowcount
    conn.execute(update(subprocessor_notices).where(subprocessor_notices.c.message_id.in_(ids))
                 .values(message_id=None))
    search.unindex(conn, ids)
    for table in (message_addresses, message_blobs):
        conn.execute(delete(table).where(table.c.message_id.in_(ids)))
    removed.messages = conn.execute(delete(messages).where(messages.c.id.in_(ids))).rowcount
    return removed


class RetentionStore(StoreBase):
    """What retention deletes."""

    def retention_groups(self) -> list[RetentionGroup]:
        """Stored messages by (tenant, tags): how many, and the oldest.

        Messages still waiting for the pipeline (status received) have no tags
        yet and are left out: they are not the sweeper's to judge.
        """
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(messages.c.tenant_id, messages.c.tag_key, func.count(),
                       func.min(messages.c.received_at))
                .where(messages.c.status != RECEIVED)
                .group_by(messages.c.tenant_id, messages.c.tag_key)
                .order_by(messages.c.tenant_id, messages.c.tag_key)
            ).all()
        return [RetentionGroup(r[0], r[1], r[2], aware(r[3])) for r in rows]

    @staticmethod
    def _expired(tenant: str, key: str, cutoff: datetime, held_addresses: Sequence[str]) -> Any:
        where = [messages.c.tenant_id == tenant, messages.c.tag_key == key,
                 messages.c.received_at < cutoff, messages.c.status != RECEIVED]
        if held_addresses:
            where.append(~exists().where(
                message_addresses.c.message_id == messages.c.id,
                func.lower(message_addresses.c.address).in_(list(held_addresses)),
            ))
        return where

    def count_expired(self, tenant: str, key: str, cutoff: datetime,
                      held_addresses: Sequence[str] = ()) -> int:
        """How many messages of a group were received before ``cutoff`` (and not held)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return int(conn.execute(
                select(func.count()).select_from(messages)
                .where(*self._expired(tenant, key, cutoff, held_addresses))
            ).scalar_one())

    def delete_expired(self, tenant: str, key: str, cutoff: datetime,
                       held_addresses: Sequence[str], limit: int) -> list[tuple[str, str | None]]:
        """Delete up to ``limit`` expired messages of a group, completely, in one transaction.

        Everything the gateway keeps of a message goes with it: the raw original,
        its addresses and its deliveries (pending ones included), then the row.
        Returns (queue id, Message-ID field) of each message deleted.
        """
        with self.writing() as conn:
            rows = [(r.id, r.message_id) for r in conn.execute(
                select(messages.c.id, messages.c.message_id)
                .where(*self._expired(tenant, key, cutoff, held_addresses))
                .order_by(messages.c.received_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )]
            if rows:
                _delete_messages(conn, [queue_id for queue_id, _ in rows])
        if rows and self._sqlite:
            self._checkpoint()
        return rows
