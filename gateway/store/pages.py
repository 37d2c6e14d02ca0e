"""A tenant's records page by page, for the admin API: deliveries, the addresses its mail
holds, audit events; and the changes a tenant's token may make to its deliveries.

Every query is limited to one tenant in the query itself (what is another tenant's is
not fetched at all).  Pages are keyset pages: ``after`` (and for audit events also
``before``) is the last id of the page before, so a page costs the same wherever it is.
Changes are audited in their own transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, update

from gateway.clock import utcnow
from gateway.records import tags_of
from gateway.store import audit
from gateway.store.models import (
    FAILED,
    HELD,
    PENDING,
    audit_events,
    deliveries,
    delivery_attempts,
    message_addresses,
    messages,
)
from gateway.store.privacy import lookup_forms
from gateway.store.repository import Store

HISTORY = 100  # a delivery's attempts shown at most (the newest)
COPIES = 1000  # a message's deliveries shown with it, at most

@dataclass(frozen=True)
class DeliveryFilter:
    status: str | None = None
    message_id: str | None = None
    recipient: str | None = None


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None  # the action, or a family of them ("api" for "api.get")
    subject: str | None = None  # the keyed hash of a person's address
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class AuditPage:
    events: list[dict[str, Any]]  # oldest first
    older: bool  # events before the first one match too
    newer: bool  # events after the last one match too


class Pages:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def _read(self) -> Any:
        return self.engine.connect().execution_options(readonly=True)

    # ------------------------------------------------------------ deliveries
    def deliveries(self, tenant: str, *, after: int, limit: int,
                   where: DeliveryFilter) -> list[dict[str, Any]]:
        q = select(deliveries).where(deliveries.c.tenant_id == tenant,
                                     deliveries.c.id > after)
        if where.status is not None:
            q = q.where(deliveries.c.status == where.status)
        if where.message_id is not None:
            q = q.where(deliveries.c.message_id == where.message_id)
        if where.recipient is not None:
            q = q.where(func.lower(deliveries.c.recipient).in_(lookup_forms(where.recipient)))
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                q.order_by(deliveries.c.id).limit(limit))]

    def copies(self, tenant: str, message_id: str) -> list[dict[str, Any]]:
        """The deliveries of one message of the tenant (at most COPIES), oldest first."""
        return self.deliveries(tenant, after=0, limit=COPIES,
                               where=DeliveryFilter(message_id=message_id))

    def delivery(self, tenant: str, delivery_id: int) -> dict[str, Any] | None:
        """One delivery of the tenant, with ``tried``: its newest attempts that did not
        deliver it (at most HISTORY), oldest first."""
        with self._read() as conn:
            row = conn.execute(select(deliveries).where(
                deliveries.c.id == delivery_id, deliveries.c.tenant_id == tenant)).first()
            if row is None:
                return None
            tried = [dict(r._mapping) for r in conn.execute(
                select(delivery_attempts.c.at, delivery_attempts.c.status,
                       delivery_attempts.c.error)
                .where(delivery_attempts.c.delivery_id == delivery_id)
                .order_by(delivery_attempts.c.id.desc()).limit(HISTORY))]
        return {**row._mapping, "tried": tried[::-1]}

    def retry_delivery(self, tenant: str, delivery_id: int, actor: str) -> bool:
        """Make a deferred, held or failed delivery due now (as ``queue retry``)."""
        return self._change(tenant, delivery_id, actor, "delivery.retry",
                            deliveries.c.status.in_((PENDING, HELD, FAILED)),
                            {"status": PENDING, "next_attempt_at": utcnow()}, {})

    def drop_delivery(self, tenant: str, delivery_id: int, actor: str, reason: str) -> bool:
        """Give a delivery up, kept as failed (as ``queue drop``)."""
        return self._change(tenant, delivery_id, actor, "delivery.drop",
                            deliveries.c.status.in_((PENDING, HELD)),
                            {"status": FAILED, "last_error": f"dropped: {reason}"[:1000]},
                            {"reason": reason[:500]})

    def _change(self, tenant: str, delivery_id: int, actor: str, action: str, state: Any,
                values: dict[str, Any], detail: dict[str, Any]) -> bool:
        with self.store.writing() as conn:
            row = conn.execute(select(deliveries.c.message_id).where(
                deliveries.c.id == delivery_id, deliveries.c.tenant_id == tenant,
                state)).first()
            if row is None:
                return False
            conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(
                **values, lease_owner=None, lease_until=None))
            audit.append(conn, self.store.audit_key, actor=actor, action=action,
                         tenant_id=tenant, message_id=row.message_id,
                         detail={"delivery": delivery_id, **detail})
        return True

    # ------------------------------------------------------------ contacts
    def contacts(self, tenant: str, *, after: str, limit: int) -> list[dict[str, Any]]:
        """The addresses the tenant's mail holds (lower case, in order after ``after``):
        in which roles, in how many messages, first and last seen."""
        address = func.lower(message_addresses.c.address)
        with self._read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                select(address.label("address"),
                       func.count(func.distinct(messages.c.id)).label("messages"),
                       func.min(messages.c.received_at).label("first_seen"),
                       func.max(messages.c.received_at).label("last_seen"))
                .join(messages, messages.c.id == message_addresses.c.message_id)
                .where(messages.c.tenant_id == tenant, message_addresses.c.address != "",
                       address > after)
                .group_by(address).order_by(address).limit(limit))]
            roles: dict[str, set[str]] = {r["address"]: set() for r in rows}
            if rows:
                for r in conn.execute(
                        select(address.label("address"), message_addresses.c.role)
                        .join(messages, messages.c.id == message_addresses.c.message_id)
                        .where(messages.c.tenant_id == tenant, address.in_(list(roles)))
                        .distinct()):
                    roles[r.address].add(r.role)
        for r in rows:
            r["roles"] = sorted(roles[r["address"]])
        return rows

    # ------------------------------------------------------------ register
    def holdings(self, tenant: str) -> dict[str, Any]:
        """What the tenant's data amounts to: messages by direction and by tag (count,
        bytes), the addresses they hold, the deliveries by state."""
        with self._read() as conn:
            by_tags = conn.execute(
                select(messages.c.tag_key, messages.c.direction, func.count(),
                       func.coalesce(func.sum(messages.c.size), 0))
                .where(messages.c.tenant_id == tenant)
                .group_by(messages.c.tag_key, messages.c.direction)).all()
            contacts = conn.execute(
                select(func.count(func.distinct(func.lower(message_addresses.c.address))))
                .join(messages, messages.c.id == message_addresses.c.message_id)
                .where(messages.c.tenant_id == tenant, message_addresses.c.address != "")
            ).scalar_one()
            states = conn.execute(select(deliveries.c.status, func.count())
                                  .where(deliveries.c.tenant_id == tenant)
                                  .group_by(deliveries.c.status)).all()
        tags: dict[str, list[int]] = {}
        directions: dict[str, list[int]] = {}
        for key, direction, count, size in by_tags:
            for total in (directions.setdefault(direction, [0, 0]),
                          *(tags.setdefault(t, [0, 0]) for t in tags_of(key or ""))):
                total[0] += int(count)
                total[1] += int(size)
        return {"directions": directions, "tags": tags, "contacts": int(contacts),
                "deliveries": {status: int(n) for status, n in states}}

    # ------------------------------------------------------------ audit
    def audit_page(self, tenant: str, *, after: int | None, before: int | None,
                   limit: int, where: AuditFilter) -> AuditPage:
        """``limit`` events: the first after ``after`` (below ``before``, if given too),
        or else the last before ``before``, or else the newest."""
        q = select(audit_events).where(audit_events.c.tenant_id == tenant)
        if where.action is not None:
            q = q.where((audit_events.c.action == where.action)
                        | audit_events.c.action.startswith(where.action + ".",
                                                           autoescape=True))
        if where.subject is not None:
            q = q.where(audit_events.c.detail["subject"].as_string() == where.subject)
        if where.since is not None:
            q = q.where(audit_events.c.at >= where.since)
        if where.until is not None:
            q = q.where(audit_events.c.at < where.until)
        with self._read() as conn:
            if after is not None:
                if before is not None:
                    q = q.where(audit_events.c.id < before)
                rows = _rows(conn, q.where(audit_events.c.id > after)
                             .order_by(audit_events.c.id), limit + 1)
                newer = len(rows) > limit
                rows = rows[:limit]
                older = _exists(conn, q.where(audit_events.c.id <= after))
            else:
                page = q if before is None else q.where(audit_events.c.id < before)
                rows = _rows(conn, page.order_by(audit_events.c.id.desc()), limit + 1)
                older = len(rows) > limit
                rows = rows[:limit][::-1]
                newer = before is not None and _exists(
                    conn, q.where(audit_events.c.id >= before))
        return AuditPage(rows, older, newer)


def _rows(conn: Any, q: Select[Any], limit: int) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(q.limit(limit))]


def _exists(conn: Any, q: Select[Any]) -> bool:
    return conn.execute(q.with_only_columns(audit_events.c.id).limit(1)).first() is not None
