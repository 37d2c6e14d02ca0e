"""Legal holds a tenant placed through the admin API: placed and released with their
audit events in one transaction; the holds in force are read by everything that deletes
(``policyset.retention_in_force`` adds them to those of retention.yaml)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import insert, select, update

from gateway.clock import aware, utcnow
from gateway.store import audit
from gateway.store.models import legal_holds
from gateway.store.repository import Store


class HoldStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def place(self, tenant: str, *, name: str, reason: str, address: str | None,
              tag: str | None, until: date | None, actor: str) -> int | None:
        """A new hold on the tenant's mail; None when one in force has that name."""
        now = utcnow()
        with self.store.writing() as conn:
            taken = conn.execute(select(legal_holds.c.id).where(
                legal_holds.c.tenant_id == tenant, legal_holds.c.name == name,
                legal_holds.c.released_at.is_(None))).first()
            if taken is not None:
                return None
            key = conn.execute(insert(legal_holds).values(
                tenant_id=tenant, name=name, reason=reason, address=address, tag=tag,
                until=datetime(until.year, until.month, until.day, tzinfo=UTC)
                if until else None, created_at=now, created_by=actor)).inserted_primary_key
            assert key is not None, "an insert has a key"
            hold_id = int(key[0])
            audit.append(conn, self.store.audit_key, actor=actor, action="hold.place",
                         tenant_id=tenant, at=now,
                         detail={"hold": hold_id, "name": name, "tag": tag,
                                 "address": address is not None,
                                 "until": until.isoformat() if until else None})
        return hold_id

    def release(self, tenant: str, hold_id: int, actor: str) -> bool:
        now = utcnow()
        with self.store.writing() as conn:
            done = conn.execute(update(legal_holds).where(
                legal_holds.c.id == hold_id, legal_holds.c.tenant_id == tenant,
                legal_holds.c.released_at.is_(None)).values(
                released_at=now, released_by=actor)).rowcount
            if done != 1:
                return False
            audit.append(conn, self.store.audit_key, actor=actor, action="hold.release",
                         tenant_id=tenant, at=now, detail={"hold": hold_id})
        return True

    def in_force(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Holds not released (of ``tenant``, or all); ``until`` is their last day."""
        q = select(legal_holds).where(legal_holds.c.released_at.is_(None))
        if tenant is not None:
            q = q.where(legal_holds.c.tenant_id == tenant)
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = [dict(r._mapping) for r in conn.execute(q.order_by(legal_holds.c.id))]
        for r in rows:
            r["until"] = aware(r["until"]).date() if r["until"] else None
        return rows
