"""The messages table as the pipeline works it (claim with a lease, finish,
quarantine, release) and as commands read it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    update,
)

from gateway.clock import aware, utcnow
from gateway.records import (
    Outcome,
    ParsedFields,
    PipelineInput,
    tags_of,
)
from gateway.store import search
from gateway.store.base import StoreBase, lease_free
from gateway.store.models import (
    PENDING,
    PROCESSED,
    QUARANTINED,
    RECEIVED,
    REQUEST_RECEIVED,
    deliveries,
    message_addresses,
    message_blobs,
    messages,
    request_due,
    subject_requests,
)

MAX_ATTEMPTS = 5  # a message that has stopped the worker this often is quarantined


# Statements on the per-message paths, built once: SQLAlchemy then reuses their
# compiled form instead of building and hashing a new expression for every row.
_FINISH = (
    update(messages)
    .where(messages.c.id == bindparam("b_id"), messages.c.status == RECEIVED,
           messages.c.lease_owner == bindparam("b_owner"))
    .values(
        status=PROCESSED, processed_at=bindparam("b_now"),
        message_id=bindparam("b_message_id"), header_from=bindparam("b_header_from"),
        header_to=bindparam("b_header_to"), header_cc=bindparam("b_header_cc"),
        subject=bindparam("b_subject"), date=bindparam("b_date"),
        attachments=bindparam("b_attachments", type_=messages.c.attachments.type),
        defects=bindparam("b_defects", type_=messages.c.defects.type),
        tags=bindparam("b_tags", type_=messages.c.tags.type), tag_key=bindparam("b_tag_key"),
        policy_version=bindparam("b_policy_version"), parse_failed=bindparam("b_parse_failed"),
        auth_results=bindparam("b_auth_results", type_=messages.c.auth_results.type),
        auth_header=bindparam("b_auth_header"),
        lease_owner=None, lease_until=None, last_error=None,
    )
)


def _finish_params(owner: str, now: datetime, message_id: str, parsed: ParsedFields,
                   outcome: Outcome) -> dict[str, Any]:
    return {
        "b_id": message_id, "b_owner": owner, "b_now": now,
        "b_message_id": parsed.message_id, "b_header_from": parsed.header_from,
        "b_header_to": parsed.header_to, "b_header_cc": parsed.header_cc,
        "b_subject": parsed.subject, "b_date": parsed.date,
        "b_attachments": parsed.attachments,
        "b_defects": [*parsed.defects, *outcome.notes], "b_tags": list(outcome.tags),
        "b_tag_key": tag_key(outcome.tags), "b_policy_version": outcome.policy_version,
        "b_parse_failed": parsed.parse_failed,
        "b_auth_results": outcome.auth_results, "b_auth_header": outcome.auth_header,
    }


def tag_key(tags: Iterable[str]) -> str:
    """Tags in their canonical form for ``messages.tag_key``: sorted, comma-joined."""
    return ",".join(sorted(set(tags)))


class MessageStore(StoreBase):
    """The messages table as the pipeline works it (claim with a lease, finish,."""

    def claim(self, owner: str, limit: int, lease: float) -> list[str]:
        """Take up to ``limit`` received messages whose lease is free, expired or ours.

        On PostgreSQL, SKIP LOCKED lets several instances claim side by side;
        SQLite's write lock (BEGIN IMMEDIATE) serialises the same statement.
        """
        now = utcnow()
        with self.writing() as conn:
            conn.execute(
                update(messages)
                .where(
                    messages.c.status == RECEIVED,
                    messages.c.attempts >= MAX_ATTEMPTS,
                    lease_free(messages, now),
                )
                .values(
                    status=QUARANTINED,
                    last_error=f"stopped the worker {MAX_ATTEMPTS} times",
                    lease_owner=None,
                    lease_until=None,
                )
            )
            ids = list(
                conn.execute(
                    select(messages.c.id)
                    .where(
                        messages.c.status == RECEIVED,
                        # our own lease is stale by now: the caller works one claim at a
                        # time, so it is from a claim or save that failed half-way
                        or_(lease_free(messages, now), messages.c.lease_owner == owner),
                    )
                    .order_by(messages.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if ids:
                conn.execute(
                    update(messages)
                    .where(messages.c.id.in_(ids))
                    .values(
                        lease_owner=owner,
                        lease_until=now + timedelta(seconds=lease),
                        attempts=messages.c.attempts + 1,
                    )
                )
        return ids

    def claimable(self) -> bool:
        """Whether a received message waits unleased or with its lease run out: what
        ``claim`` would take (a pipeline process that left for want of work is started
        again when one does)."""
        now = utcnow()
        with self.engine.connect().execution_options(readonly=True) as conn:
            return conn.execute(
                select(messages.c.id)
                .where(messages.c.status == RECEIVED, lease_free(messages, now))
                .limit(1)
            ).first() is not None

    def release_dead_leases(self, table_name: Literal["messages", "deliveries"], host: str,
                            alive: Callable[[int], bool]) -> int:
        """Free the leases of this host's processes that no longer run, in one table.

        A daemon killed with -9 leaves its claimed messages and deliveries
        leased; after a restart on the same host they are taken up at once
        instead of after the lease time.  Other hosts' leases expire on their own.
        Each runner frees its own table when it starts: the delivery runner first
        records what its dead predecessor's journal lists as sent.
        """
        table, status = ((messages, RECEIVED) if table_name == "messages"
                         else (deliveries, PENDING))
        with self.writing() as conn:
            owners = conn.execute(
                select(table.c.lease_owner)
                .where(table.c.status == status, table.c.lease_owner.is_not(None))
                .distinct()
            ).scalars().all()
            dead = []
            for owner in owners:
                owner_host, _, pid = owner.rpartition(":")
                if owner_host == host and (not pid.isdigit() or not alive(int(pid))):
                    dead.append(owner)
            if not dead:
                return 0
            return int(conn.execute(
                update(table)
                .where(table.c.status == status, table.c.lease_owner.in_(dead))
                .values(lease_owner=None, lease_until=None)
            ).rowcount)

    def pipeline_inputs(self, message_ids: Sequence[str]) -> dict[str, PipelineInput]:
        """What the pipeline needs of each claimed message, in two queries."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(messages.c.id, messages.c.tenant_id, messages.c.mail_from,
                       messages.c.size, messages.c.tags, messages.c.direction,
                       messages.c.client_address, messages.c.helo, messages.c.protocol,
                       message_blobs.c.data, message_blobs.c.key_id)
                .join(message_blobs, message_blobs.c.message_id == messages.c.id)
                .where(messages.c.id.in_(list(message_ids)))
            ).all()
            recipients = self._recipients(conn, [r.id for r in rows])
        return {
            r.id: PipelineInput(r.id, r.tenant_id, r.mail_from,
                                tuple(recipients.get(r.id, [])), r.size, tuple(r.tags or ()),
                                self.plain(r.id, r.key_id, r.data), r.direction,
                                r.client_address, r.helo, r.protocol)
            for r in rows
        }

    def raw(self, message_id: str) -> bytes | None:
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(
                select(message_blobs.c.data, message_blobs.c.key_id)
                .where(message_blobs.c.message_id == message_id)
            ).first()
        return None if row is None else self.plain(message_id, row.key_id, row.data)

    def finish_many(self, owner: str,
                    items: Sequence[tuple[str, ParsedFields, Outcome]]) -> list[bool]:
        """Record what the stages found and planned, and mark each message processed.

        One transaction for the whole batch (one fsync): per message, the parse
        result, tags, planned deliveries and status change land together or not
        at all.  An entry is False (nothing changed) where the lease was lost.
        """
        now = utcnow()
        with self.writing() as conn:
            # The rows still ours, locked until the commit (SQLite: the write lock is).
            held = {r.id: r.tenant_id for r in conn.execute(
                select(messages.c.id, messages.c.tenant_id)
                .where(messages.c.id.in_([message_id for message_id, _, _ in items]),
                       messages.c.status == RECEIVED, messages.c.lease_owner == owner)
                .order_by(messages.c.id)  # one lock order for every writer: no deadlock
                .with_for_update()
            )}
            mine = [item for item in items if item[0] in held]
            if not mine:
                return [False] * len(items)
            conn.execute(_FINISH, [_finish_params(owner, now, *item) for item in mine])
            conn.execute(delete(message_addresses).where(
                message_addresses.c.message_id.in_([message_id for message_id, _, _ in mine]),
                message_addresses.c.role.not_in(("mail_from", "rcpt_to")),
            ))
            addresses = [{"message_id": message_id, "role": role, "address": addr}
                         for message_id, parsed, _ in mine for role, addr in parsed.addresses]
            if addresses:
                conn.execute(insert(message_addresses), addresses)
            planned = [
                {"message_id": message_id, "tenant_id": held[message_id], "kind": d.kind,
                 "recipient": d.recipient, "destination": d.destination, "rule": d.rule,
                 "status": PENDING, "attempts": 0, "created_at": now, "next_attempt_at": now}
                for message_id, _, outcome in mine for d in outcome.deliveries
            ]
            if planned:
                conn.execute(insert(deliveries), planned)
            self._index(conn, held, [(message_id, parsed, outcome.tags)
                                     for message_id, parsed, outcome in mine
                                     if outcome.indexed])
            # mail to privacy.request_address: a data-subject request, read and forwarded
            # from here (gateway.privacy.intake)
            asked = [message_id for message_id, _, outcome in mine if outcome.request]
            if asked:
                conn.execute(insert(subject_requests), [
                    {"tenant_id": "", "kind": "other", "subject": r.mail_from,
                     "received_at": r.received_at, "due_at": request_due(aware(r.received_at)),
                     "status": REQUEST_RECEIVED, "source_id": r.id}
                    for r in conn.execute(select(messages.c.id, messages.c.mail_from,
                                                 messages.c.received_at)
                                          .where(messages.c.id.in_(asked)))])
        return [message_id in held for message_id, _, _ in items]

    @staticmethod
    def _index(conn: Any, tenant_of: dict[str, str],
               items: Sequence[tuple[str, ParsedFields, Sequence[str]]]) -> None:
        """Put messages (id, parse results, tags) into the search index, with their
        envelope addresses."""
        if not items:
            return
        envelope: dict[str, list[tuple[str, str]]] = {}
        for r in conn.execute(select(message_addresses.c.message_id, message_addresses.c.role,
                                     message_addresses.c.address)
                              .where(message_addresses.c.message_id.in_(
                                  [message_id for message_id, _, _ in items]),
                                  message_addresses.c.role.in_(("mail_from", "rcpt_to")))):
            envelope.setdefault(r.message_id, []).append((r.role, r.address))
        search.index(conn, [search.fields(
            tenant_of[message_id], message_id, parsed.header_from, parsed.header_to,
            parsed.header_cc, parsed.subject, parsed.text, parsed.attachments,
            [*envelope.get(message_id, ()), *parsed.addresses], tags)
            for message_id, parsed, tags in items])

    def unindexed(self, after: str, limit: int, tenants: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
        """Processed messages that are not in the search index (stored before it
        existed), by id after ``after``: their id and tenant."""
        q = select(messages.c.id, messages.c.tenant_id) \
            .where(messages.c.status == PROCESSED, messages.c.id > after,
                   ~search.indexed(messages.c.id, self._sqlite)) \
            .order_by(messages.c.id).limit(limit)
        if tenants is not None:
            q = q.where(messages.c.tenant_id.in_(list(tenants)))
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def reindex(self, items: Sequence[tuple[str, str, ParsedFields]]) -> int:
        """Put messages stored before the index into it (id, tenant, parse results), in
        one transaction; those deleted meanwhile (an erasure, retention) are left out,
        so no entry outlives its message.  How many went in."""
        ids = [message_id for message_id, _, _ in items]
        with self.writing() as conn:
            alive = select(messages.c.id, messages.c.tag_key).where(messages.c.id.in_(ids))
            if not self._sqlite:  # a deletion waits for this transaction, then cascades
                alive = alive.with_for_update(key_share=True)
            kept = {r.id: tags_of(r.tag_key) for r in conn.execute(alive)}
            todo = [(i, parsed, kept[i]) for i, _, parsed in items if i in kept]
            self._index(conn, {i: t for i, t, _ in items}, todo)
        return len(todo)

    def quarantine(self, message_id: str, owner: str, error: str) -> None:
        with self.writing() as conn:
            conn.execute(
                update(messages)
                .where(messages.c.id == message_id, messages.c.lease_owner == owner)
                .values(status=QUARANTINED, last_error=error[:2000], lease_owner=None,
                        lease_until=None)
            )

    def release(self, message_ids: Iterable[str], owner: str) -> None:
        """Give back claimed messages unprocessed (shutdown), without using an attempt."""
        ids = list(message_ids)
        if not ids:
            return
        with self.writing() as conn:
            conn.execute(
                update(messages)
                .where(messages.c.id.in_(ids), messages.c.lease_owner == owner,
                       messages.c.status == RECEIVED)
                .values(lease_owner=None, lease_until=None, attempts=messages.c.attempts - 1)
            )

    def renew_leases(self, table: str, owner: str, ids: Sequence[str | int],
                     lease: float) -> int:
        """Extend ``owner``'s leases on these rows of ``messages`` or ``deliveries`` to
        ``lease`` seconds from now; returns how many it renewed.

        The rows are locked in order of id, as every writer of claimed rows locks
        them, and a row another transaction holds is skipped (PostgreSQL): that is
        the recording of its result, which ends the lease anyway.  Renewal never
        waits for a lock, so it cannot be part of a deadlock."""
        rows = {"messages": messages, "deliveries": deliveries}[table]
        with self.writing() as conn:
            mine = conn.execute(
                select(rows.c.id)
                .where(rows.c.id.in_(sorted(ids)), rows.c.lease_owner == owner)
                .order_by(rows.c.id)
                .with_for_update(skip_locked=True)
            ).scalars().all()
            if not mine:
                return 0
            return conn.execute(
                update(rows).where(rows.c.id.in_(mine))
                .values(lease_until=utcnow() + timedelta(seconds=lease))
            ).rowcount

    def list_messages(
        self, tenant: str | None = None, limit: int | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        q = select(messages).order_by(messages.c.id)
        if tenant is not None:
            q = q.where(messages.c.tenant_id == tenant)
        if status is not None:
            q = q.where(messages.c.status == status)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            recipients = self._recipients(conn, [r["id"] for r in rows])
        for r in rows:
            r["recipients"] = recipients.get(r["id"], [])
        return rows

    def get_message(self, message_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """A message with its recipients and header addresses; None when there is none
        of that id (in ``tenant``, when given: another tenant's is not fetched at all, so
        it costs what a missing one does)."""
        query = select(messages).where(messages.c.id == message_id)
        if tenant is not None:
            query = query.where(messages.c.tenant_id == tenant)
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            result = dict(row._mapping)
            result["recipients"] = self._recipients(conn, [message_id]).get(message_id, [])
            result["addresses"] = [
                (r.role, r.address)
                for r in conn.execute(
                    select(message_addresses.c.role, message_addresses.c.address)
                    .where(message_addresses.c.message_id == message_id)
                    .order_by(message_addresses.c.id)
                )
            ]
        return result

    @staticmethod
    def _recipients(conn: Any, ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            for r in conn.execute(
                select(message_addresses.c.message_id, message_addresses.c.address)
                .where(and_(message_addresses.c.message_id.in_(part),
                            message_addresses.c.role == "rcpt_to"))
                .order_by(message_addresses.c.id)
            ):
                out.setdefault(r.message_id, []).append(r.address)
        return out
