"""The audit log: append-only events, each chained to the one before by a keyed hash.

An event's ``hash`` is HMAC-SHA256 (the privacy key's chain key) over the
previous event's hash and the event's own fields (id, time, tenant, actor,
action, message, detail) in a canonical form.  ``verify`` walks the events in
order and finds the first one that was edited (its hash no longer matches), or
the place where one was removed or slipped in (the next event's ``prev_hash``
no longer matches).  Removing events from the end leaves a shorter, valid
chain: ``verify(anchor=HASH)`` checks that a head recorded elsewhere earlier
is still in the chain.

Appending takes the chain's lock (an advisory transaction lock on PostgreSQL;
on SQLite every write transaction holds the database's write lock), reads the
head and writes the next event, all in the caller's transaction: an event is
only ever recorded together with what it records.

Events written before the chain existed (hash NULL) may only precede it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, or_, select

from gateway.store.base import StoreBase
from gateway.store.database import take_turn
from gateway.store.models import audit_events

GENESIS = ""


def _canonical(event: dict[str, Any]) -> bytes:
    at = event["at"]
    at = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    fields = [event["id"], at.isoformat(timespec="microseconds"), event["tenant_id"],
              event["actor"], event["action"], event["message_id"], event["detail"]]
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogateescape")


def digest(key: bytes, prev_hash: str, event: dict[str, Any]) -> str:
    return hmac.new(key, prev_hash.encode() + b"\n" + _canonical(event),
                    hashlib.sha256).hexdigest()


def append(conn: Any, key: bytes, *, actor: str, action: str, tenant_id: str | None = None,
           message_id: str | None = None, detail: dict[str, Any] | None = None,
           at: datetime | None = None) -> str:
    """Write one event at the head of the chain, in ``conn``'s transaction; its hash."""
    take_turn(conn, "mailflowr audit chain")
    head = conn.execute(
        select(audit_events.c.id, audit_events.c.hash)
        .order_by(audit_events.c.id.desc()).limit(1)
    ).first()
    event = {
        "id": (head.id + 1) if head else 1,
        "at": at or datetime.now(UTC), "tenant_id": tenant_id, "actor": actor[:200],
        "action": action, "message_id": message_id,
        # through JSON once, so the hash covers exactly what the database gives back
        "detail": json.loads(json.dumps(detail or {}, default=str)),
    }
    prev = (head.hash or GENESIS) if head else GENESIS
    event["prev_hash"] = prev
    event["hash"] = digest(key, prev, event)
    conn.execute(insert(audit_events).values(**event))
    hash_: str = event["hash"]
    return hash_


@dataclass
class Verdict:
    events: int = 0
    unchained: int = 0  # from before the chain began
    head: str | None = None
    problem: str | None = None  # the first thing found wrong
    anchor_found: bool | None = None  # None: no anchor asked for

    @property
    def ok(self) -> bool:
        return self.problem is None and self.anchor_found is not False


def verify(rows: Iterator[Any], key: bytes, anchor: str | None = None) -> Verdict:
    """Check the chain over ``rows`` (every event, in id order)."""
    v = Verdict(anchor_found=None if anchor is None else False)
    prev: str | None = None  # None: no chained event seen yet
    for row in rows:
        r = dict(row._mapping) if hasattr(row, "_mapping") else dict(row)
        v.events += 1
        if r["hash"] is None:
            if prev is not None:
                v.problem = f"event {r['id']} has no hash: it was written around the chain"
                return v
            v.unchained += 1
            continue
        expected_prev = prev if prev is not None else GENESIS
        if r["prev_hash"] != expected_prev:
            v.problem = (f"event {r['id']} does not follow the event before it: an event was "
                         "removed or inserted before it")
            return v
        if not hmac.compare_digest(digest(key, r["prev_hash"], r), r["hash"]):
            v.problem = f"event {r['id']} was changed after it was written"
            return v
        prev = r["hash"]
        if anchor is not None and r["hash"] == anchor:
            v.anchor_found = True
    v.head = prev
    return v


class AuditStore(StoreBase):
    """The audit log as the Store writes and reads it."""

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
            append(conn, self.audit_key, actor=actor, action=action,
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

    def verify_audit(self, anchor: str | None = None) -> Verdict:
        """Walk the whole audit chain (streamed, in id order)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execution_options(yield_per=2000).execute(
                select(audit_events).order_by(audit_events.c.id))
            try:
                return verify(iter(rows), self.audit_key, anchor)
            finally:
                rows.close()  # it may stop at the first problem
