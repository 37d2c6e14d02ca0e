"""Personal-data incidents as records: opened with the time of discovery and the tenants
affected, a notice to each tenant's privacy contact (stored with its audit event in one
transaction, delivered through the queue), closed with a note.  Each tenant's notice is
due ``PROMISE_HOURS`` after discovery; its delivery (a 250 from the server that took it)
is what keeps the promise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from gateway.clock import aware, utcnow
from gateway.records import NewMessage
from gateway.store import audit
from gateway.store.deliveries import notice_deliveries
from gateway.store.intake import _insert_messages
from gateway.store.models import INCIDENT_CLOSED, INCIDENT_OPEN, incident_tenants, incidents
from gateway.store.repository import Store

PROMISE_HOURS = 48


@dataclass(frozen=True)
class Due:
    """Notices of open incidents not delivered yet."""

    undelivered: int
    nearest: float | None  # seconds to the nearest deadline among them (< 0: passed)


class IncidentStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def open(self, discovered_at: datetime, tenants: Sequence[str], description: str,
             actor: str) -> int:
        now = utcnow()
        with self.store.writing() as conn:
            key = conn.execute(insert(incidents).values(
                discovered_at=discovered_at, opened_at=now, opened_by=actor,
                description=description, status=INCIDENT_OPEN)).inserted_primary_key
            assert key is not None, "an insert has a key"
            incident_id = int(key[0])
            conn.execute(insert(incident_tenants), [
                {"incident_id": incident_id, "tenant_id": t} for t in tenants])
            for t in tenants:
                audit.append(conn, self.store.audit_key, actor=actor, action="incident.open",
                             tenant_id=t, at=now,
                             detail={"incident": incident_id,
                                     "discovered_at": discovered_at.isoformat()})
        return incident_id

    def notify(self, incident_id: int, message: NewMessage, actor: str,
               detail: dict[str, Any]) -> bool:
        """Store the notice to one affected tenant, link it to the incident and write
        its audit event, in one transaction; False when the tenant is not affected (or
        the incident is closed)."""
        tenant = message.tenant_id
        with self.store.writing() as conn:
            row = conn.execute(select(incidents.c.status).join(
                incident_tenants, incident_tenants.c.incident_id == incidents.c.id).where(
                incidents.c.id == incident_id, incident_tenants.c.tenant_id == tenant)).first()
            if row is None or row.status != INCIDENT_OPEN:
                return False
            _insert_messages(conn, [message], self.store.keystore)
            conn.execute(update(incident_tenants).where(
                incident_tenants.c.incident_id == incident_id,
                incident_tenants.c.tenant_id == tenant).values(
                message_id=message.id, notified_at=message.received_at))
            audit.append(conn, self.store.audit_key, actor=actor, action="incident.notify",
                         tenant_id=tenant, message_id=message.id,
                         detail={"incident": incident_id, **detail})
        return True

    def close(self, incident_id: int, note: str, actor: str) -> bool:
        now = utcnow()
        with self.store.writing() as conn:
            done = conn.execute(update(incidents).where(
                incidents.c.id == incident_id, incidents.c.status == INCIDENT_OPEN).values(
                status=INCIDENT_CLOSED, closed_at=now, closing_note=note)).rowcount
            if done != 1:
                return False
            for t in conn.execute(select(incident_tenants.c.tenant_id).where(
                    incident_tenants.c.incident_id == incident_id)).scalars():
                audit.append(conn, self.store.audit_key, actor=actor, action="incident.close",
                             tenant_id=t, at=now, detail={"incident": incident_id})
        return True

    def list(self, tenant: str | None = None, *, open_only: bool = False,
             ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Incidents (newest first) with, per affected tenant, its notice: queued,
        delivered or not (and why), the deadline, and whether it was kept.  With
        ``tenant``: only incidents affecting it, and only its own notice."""
        now = utcnow()
        q = select(incidents).order_by(incidents.c.id.desc())
        if open_only:
            q = q.where(incidents.c.status == INCIDENT_OPEN)
        if ids is not None:
            q = q.where(incidents.c.id.in_(list(ids)))
        if tenant is not None:
            q = q.where(incidents.c.id.in_(select(incident_tenants.c.incident_id).where(
                incident_tenants.c.tenant_id == tenant)))
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            affected = conn.execute(select(incident_tenants).where(
                incident_tenants.c.incident_id.in_([r["id"] for r in rows]))
                .order_by(incident_tenants.c.tenant_id)).all() if rows else []
            if tenant is not None:
                affected = [a for a in affected if a.tenant_id == tenant]
            sent = notice_deliveries(conn, [a.message_id for a in affected if a.message_id])
        by_incident: dict[int, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
        for a in affected:
            by_incident[a.incident_id].append(_tenant_state(a, sent, now, rows))
        for r in rows:
            for key in ("discovered_at", "opened_at", "closed_at"):
                r[key] = aware(r[key]) if r[key] else None
            r["deadline"] = r["discovered_at"] + timedelta(hours=PROMISE_HOURS)
            r["tenants"] = by_incident[r["id"]]
        return rows

    def due(self, now: datetime) -> Due:
        """Open incidents' notices not delivered: how many, and the nearest deadline."""
        pending = [t for r in self.list(open_only=True) for t in r["tenants"]
                   if t["delivered_at"] is None]
        nearest = min(((t["deadline"] - now).total_seconds() for t in pending), default=None)
        return Due(len(pending), nearest)


def _tenant_state(a: Any, sent: dict[str, Any], now: datetime,
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    incident = next(r for r in rows if r["id"] == a.incident_id)
    deadline = aware(incident["discovered_at"]) + timedelta(hours=PROMISE_HOURS)
    delivery = sent.get(a.message_id or "")
    delivered = delivery.delivered_at if delivery else None
    why: str | None
    if a.message_id is None:
        state, why = "not notified", "no notice queued yet (incident notify)"
    else:
        state = delivery.state if delivery else "pending"
        why = delivery.reason if delivery and delivery.reason else None
    return {"tenant": a.tenant_id, "message_id": a.message_id,
            "notified_at": aware(a.notified_at) if a.notified_at else None,
            "delivered_at": delivered, "state": state, "why": why, "deadline": deadline,
            "in_time": delivered <= deadline if delivered else
            (None if now <= deadline else False)}
