"""Data-subject requests that reached the processor, as records: recorded together with
their forward to the tenant's privacy contact (and its audit event) in one transaction,
due a month after they arrived, fulfilled by the export or erasure of the person that
answers them (or closed by hand with a note)."""

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
from gateway.store.models import subject_requests
from gateway.store.repository import Store

KINDS = ("access", "erasure", "portability", "other")
OPEN, FULFILLED, CLOSED = "open", "fulfilled", "closed"


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

    def close(self, request_id: int, note: str, actor: str) -> bool:
        now = utcnow()
        with self.store.writing() as conn:
            row = conn.execute(select(subject_requests.c.tenant_id).where(
                subject_requests.c.id == request_id,
                subject_requests.c.status == OPEN)).first()
            if row is None:
                return False
            conn.execute(update(subject_requests).where(subject_requests.c.id == request_id)
                         .values(status=CLOSED, fulfilled_at=now, fulfilled_by=note))
            audit.append(conn, self.store.audit_key, actor=actor, action="request.close",
                         tenant_id=row.tenant_id, at=now, detail={"request": request_id})
        return True

    def list(self, tenant: str | None = None, *, open_only: bool = False,
             ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Requests, newest first, with the state of their forward's delivery."""
        q = select(subject_requests).order_by(subject_requests.c.id.desc())
        if tenant is not None:
            q = q.where(subject_requests.c.tenant_id == tenant)
        if open_only:
            q = q.where(subject_requests.c.status == OPEN)
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
                .where(subject_requests.c.status == OPEN)).one()
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
