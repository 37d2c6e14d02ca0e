"""Data-subject requests that reached the processor, as records: recorded together with
their forward to the tenant's privacy contact (and its audit event) in one transaction,
due a month after they arrived, fulfilled by the export or erasure of the person that
answers them (or closed by hand with a note).

A request by mail to ``privacy.request_address`` is written by the pipeline in the
transaction that saves the message (``arrived``: status ``received``); it is read from
there (``mail_requests``) and forwarded when it names its tenant, or waits
``unassigned`` for an operator to say which tenant it concerns (``assign``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update

from gateway.clock import aware, utcnow
from gateway.records import NewMessage
from gateway.store import audit
from gateway.store.deliveries import notice_deliveries
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    CLOSED,
    FULFILLED,
    OPEN,
    REQUEST_RECEIVED,
    UNASSIGNED,
    message_addresses,
    subject_requests,
)
from gateway.store.repository import Store

KINDS = ("access", "erasure", "portability", "other")
PENDING = (REQUEST_RECEIVED, UNASSIGNED, OPEN)  # not answered yet


@dataclass(frozen=True)
class Due:
    open: int
    nearest: float | None  # seconds to the nearest deadline (< 0: passed)


class RequestStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def record(self, tenant: str, kind: str, subject: str, received_at: datetime,
               due_at: datetime, forward: NewMessage | None, actor: str,
               detail: dict[str, Any]) -> int:
        """Record a request, store its forward to the privacy contact and write the audit
        event (``detail``: never the address), in one transaction; its id."""
        with self.store.writing() as conn:
            if forward is not None:
                _insert_messages(conn, [forward], self.store.keystore)
            key = conn.execute(insert(subject_requests).values(
                tenant_id=tenant, kind=kind, subject=subject, received_at=received_at,
                due_at=due_at, message_id=forward.id if forward else None,
                status=OPEN)).inserted_primary_key
            assert key is not None, "an insert has a key"
            request_id = int(key[0])
            audit.append(conn, self.store.audit_key, actor=actor, action="request.record",
                         tenant_id=tenant, message_id=forward.id if forward else None,
                         detail={"request": request_id, "kind": kind, **detail})
        return request_id

    def fulfil(self, tenant: str, subject: str, kinds: Sequence[str], by: str, actor: str,
               ) -> list[int]:
        """Mark the open requests of ``tenant`` about ``subject`` (any case) of these
        kinds fulfilled by ``by`` (an export, an erasure); their ids."""
        now = utcnow()
        with self.store.writing() as conn:
            ids = list(conn.execute(select(subject_requests.c.id).where(
                subject_requests.c.tenant_id == tenant,
                func.lower(subject_requests.c.subject) == subject.strip().lower(),
                subject_requests.c.kind.in_(list(kinds)),
                subject_requests.c.status == OPEN)).scalars())
            if ids:
                conn.execute(update(subject_requests).where(subject_requests.c.id.in_(ids))
                             .values(status=FULFILLED, fulfilled_at=now, fulfilled_by=by))
                for request_id in ids:
                    audit.append(conn, self.store.audit_key, actor=actor,
                                 action="request.fulfil", tenant_id=tenant, at=now,
                                 detail={"request": request_id, "by": by})
        return ids

    def mail_requests(self, status: str = REQUEST_RECEIVED, ids: Sequence[int] | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        """Requests that came by mail in ``status`` (by default: not read yet), oldest
        first, each with the envelope recipients of its message (``recipients``)."""
        q = select(subject_requests).where(subject_requests.c.status == status,
                                           subject_requests.c.source_id.is_not(None))
        if ids is not None:
            q = q.where(subject_requests.c.id.in_(list(ids)))
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                q.order_by(subject_requests.c.id).limit(limit))]
            sources = [r["source_id"] for r in rows]
            to: dict[str, list[str]] = {}
            for message_id, address in conn.execute(
                    select(message_addresses.c.message_id, message_addresses.c.address)
                    .where(message_addresses.c.message_id.in_(sources),
                           message_addresses.c.role == "rcpt_to")):
                to.setdefault(message_id, []).append(address)
        for r in rows:
            r["recipients"] = to.get(r["source_id"], [])
        return rows

    def assign(self, request_id: int, from_status: str, *, tenant: str, kind: str,
               subject: str, forward: NewMessage | None, actor: str,
               detail: dict[str, Any]) -> bool:
        """A request by mail read: forwarded (``forward``) to ``tenant`` as ``kind`` and
        open, or, without a tenant, unassigned; False when it is no longer in
        ``from_status`` (another instance or command got there first)."""
        with self.store.writing() as conn:
            changed = conn.execute(update(subject_requests).where(
                subject_requests.c.id == request_id,
                subject_requests.c.status == from_status).values(
                tenant_id=tenant, kind=kind, subject=subject,
                message_id=forward.id if forward else None,
                status=OPEN if tenant else UNASSIGNED)).rowcount
            if not changed:
                return False
            if forward is not None:
                _insert_messages(conn, [forward], self.store.keystore)
            audit.append(conn, self.store.audit_key, actor=actor,
                         action="request.record" if tenant else "request.unassigned",
                         tenant_id=tenant or None,
                         message_id=forward.id if forward else None,
                         detail={"request": request_id, "kind": kind, **detail})
        return True

    def close(self, request_id: int, note: str, actor: str) -> bool:
        now = utcnow()
        with self.store.writing() as conn:
            row = conn.execute(select(subject_requests.c.tenant_id).where(
                subject_requests.c.id == request_id,
                subject_requests.c.status.in_((OPEN, UNASSIGNED)))).first()
            if row is None:
                return False
            conn.execute(update(subject_requests).where(subject_requests.c.id == request_id)
                         .values(status=CLOSED, fulfilled_at=now, fulfilled_by=note))
            audit.append(conn, self.store.audit_key, actor=actor, action="request.close",
                         tenant_id=row.tenant_id or None, at=now,
                         detail={"request": request_id})
        return True

    def list(self, tenant: str | None = None, *, open_only: bool = False,
             ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Requests, newest first, with the state of their forward's delivery (``tenant``
        "": those by mail that name none yet)."""
        q = select(subject_requests).order_by(subject_requests.c.id.desc())
        if tenant is not None:
            q = q.where(subject_requests.c.tenant_id == tenant)
        if open_only:
            q = q.where(subject_requests.c.status.in_(PENDING))
        if ids is not None:
            q = q.where(subject_requests.c.id.in_(list(ids)))
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            sent = notice_deliveries(conn, [r["message_id"] for r in rows if r["message_id"]])
        for r in rows:
            for key in ("received_at", "due_at", "fulfilled_at"):
                r[key] = aware(r[key]) if r[key] else None
            delivery = sent.get(r["message_id"] or "")
            r["forward"] = delivery.state if delivery else "not forwarded"
            r["forwarded_at"] = delivery.delivered_at if delivery else None
        return rows

    def due(self, now: datetime) -> Due:
        with self.engine.connect().execution_options(readonly=True) as conn:
            count, nearest = conn.execute(
                select(func.count(), func.min(subject_requests.c.due_at))
                .where(subject_requests.c.status.in_(PENDING))).one()
        return Due(int(count), (aware(nearest) - now).total_seconds() if nearest else None)


def request_record(r: dict[str, Any]) -> dict[str, Any]:
    """A request as ``request list --json`` and the admin API show it."""
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {"id": r["id"], "tenant": r["tenant_id"], "kind": r["kind"],
            "subject": r["subject"], "status": r["status"],
            "received_at": iso(r["received_at"]), "due_at": iso(r["due_at"]),
            "forward": r["forward"], "forwarded_at": iso(r["forwarded_at"]),
            "fulfilled_at": iso(r["fulfilled_at"]), "fulfilled_by": r["fulfilled_by"]}
