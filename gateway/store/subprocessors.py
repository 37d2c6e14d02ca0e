"""The subprocessor registry, change notices and objections, as policy reloads
record them and delivery reads them."""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

from sqlalchemy import (
    insert,
    select,
    update,
)

from gateway.clock import aware, utcnow
from gateway.records import (
    ConsentRows,
    Notice,
)
from gateway.store import audit as audit_chain
from gateway.store import database
from gateway.store.base import StoreBase
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    subprocessor_notices,
    subprocessor_objections,
    subprocessor_registry,
)


class SubprocessorStore(StoreBase):
    """The subprocessor registry, change notices and objections, as policy reloads."""

    def sync_subprocessors(
        self, current: Collection[str], now: datetime,
        notices: Callable[[list[str], list[str]], list[Notice]],
    ) -> tuple[list[str], list[str]]:
        """Compare the registry in force with the one remembered, in one transaction.

        The first time, everything present is the baseline (covered by the
        agreement).  After that, each subprocessor added or removed gets the
        notices ``notices(added, removed)`` returns, with their emails, written
        together with the registry change: a change is never remembered without
        its notices, nor notified twice.
        """
        with self.writing() as conn:
            # Instances that start (or reload) together: one notices the change.
            database.take_turn(conn, "subprocessor registry")
            known = {r.name: r for r in conn.execute(select(subprocessor_registry))}
            if not known:
                if current:
                    conn.execute(insert(subprocessor_registry), [
                        {"name": n, "first_seen_at": now, "baseline": True} for n in current])
                return [], []
            added = sorted(n for n in current
                           if n not in known or known[n].removed_at is not None)
            removed = sorted(n for n, r in known.items()
                             if n not in current and r.removed_at is None)
            for name in added:
                if name in known:
                    conn.execute(update(subprocessor_registry)
                                 .where(subprocessor_registry.c.name == name)
                                 .values(first_seen_at=now, removed_at=None, baseline=False))
                else:
                    conn.execute(insert(subprocessor_registry).values(
                        name=name, first_seen_at=now, baseline=False))
            if removed:
                conn.execute(update(subprocessor_registry)
                             .where(subprocessor_registry.c.name.in_(removed))
                             .values(removed_at=now))
            if added or removed:
                made = notices(added, removed)
                emails = [n.message for n in made if n.message is not None]
                if emails:
                    _insert_messages(conn, emails, self.keystore)
                if made:
                    conn.execute(insert(subprocessor_notices), [
                        {"tenant_id": n.tenant_id, "subprocessor": n.subprocessor,
                         "change": n.change, "created_at": now, "effective_at": n.effective_at,
                         "message_id": n.message.id if n.message else None} for n in made])
                for n in made:
                    audit_chain.append(conn, self.audit_key, actor="daemon",
                                       action="subprocessor.notice", tenant_id=n.tenant_id,
                                       message_id=n.message.id if n.message else None, at=now,
                                       detail={"subprocessor": n.subprocessor,
                                               "change": n.change,
                                               "effective_at": n.effective_at.isoformat(),
                                               "emailed": n.message is not None})
        return added, removed

    def consent_rows(self) -> ConsentRows:
        with self.engine.connect().execution_options(readonly=True) as conn:
            baseline = frozenset(conn.execute(
                select(subprocessor_registry.c.name)
                .where(subprocessor_registry.c.baseline.is_(True),
                       subprocessor_registry.c.removed_at.is_(None))).scalars())
            effective = {}
            for r in conn.execute(select(subprocessor_notices)
                                  .where(subprocessor_notices.c.change == "added")
                                  .order_by(subprocessor_notices.c.id)):
                effective[(r.tenant_id, r.subprocessor)] = aware(r.effective_at)
            objections = frozenset(
                (r.tenant_id, r.subprocessor)
                for r in conn.execute(select(subprocessor_objections)))
        return ConsentRows(baseline, effective, objections)

    def list_notices(self, tenant: str | None = None) -> list[dict[str, Any]]:
        q = select(subprocessor_notices).order_by(subprocessor_notices.c.id)
        if tenant is not None:
            q = q.where(subprocessor_notices.c.tenant_id == tenant)
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def record_objection(self, tenant: str, subprocessor: str, actor: str, note: str) -> None:
        with self.writing() as conn:
            conn.execute(insert(subprocessor_objections).values(
                tenant_id=tenant, subprocessor=subprocessor, recorded_at=utcnow(),
                actor=actor, note=note))
            audit_chain.append(conn, self.audit_key, actor=actor,
                               action="subprocessor.objection", tenant_id=tenant,
                               detail={"subprocessor": subprocessor, "note": note[:500]})
