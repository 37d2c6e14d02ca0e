"""The audit log: events appended to the HMAC chain, listed, and the chain verified."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    or_,
    select,
)

from gateway.store import audit as audit_chain
from gateway.store.base import StoreBase
from gateway.store.models import (
    audit_events,
)


class AuditStore(StoreBase):
    """The audit log."""

    def audit(
        self,
        actor: str,
        action: str,
        *,
        tenant_id: str | None = None,
        message_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an audit event (who did what to which data, never content)."""
        with self.writing() as conn:
            audit_chain.append(conn, self.audit_key, actor=actor, action=action,
                               tenant_id=tenant_id, message_id=message_id, detail=detail)

    def audit_events(self, tenant_id: str | None = None, *, action: str | None = None,
                     subject_hash: str | None = None, since: datetime | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """Audit events, oldest first (the newest ``limit`` of them)."""
        q = select(audit_events).order_by(audit_events.c.id.desc())
        if tenant_id is not None:
            q = q.where(audit_events.c.tenant_id == tenant_id)
        if action is not None:
            q = q.where(or_(audit_events.c.action == action,
                            audit_events.c.action.startswith(action + ".", autoescape=True)))
        if since is not None:
            q = q.where(audit_events.c.at >= since)
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = []
            result = conn.execution_options(yield_per=1000).execute(q)
            for r in result:
                row = dict(r._mapping)
                if subject_hash is not None and (row["detail"] or {}).get("subject") \
                        != subject_hash:
                    continue
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
            result.close()
        rows.reverse()
        return rows

    def verify_audit(self, anchor: str | None = None) -> audit_chain.Verdict:
        """Walk the whole audit chain (streamed, in id order)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execution_options(yield_per=2000).execute(
                select(audit_events).order_by(audit_events.c.id))
            try:
                return audit_chain.verify(iter(rows), self.audit_key, anchor)
            finally:
                rows.close()  # it may stop at the first problem
