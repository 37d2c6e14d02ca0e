"""The deliveries table: copies claimed with a lease, their results recorded, the
queue listed, retried, dropped and measured."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    bindparam,
    func,
    insert,
    select,
    update,
)

from gateway.clock import aware, utcnow
from gateway.records import (
    AttemptResult,
    DeliveryJob,
    QueueStats,
)
from gateway.store.base import StoreBase, lease_free
from gateway.store.intake import _insert_messages
from gateway.store.keystore import KeyUnavailable
from gateway.store.models import (
    FAILED,
    HELD,
    PENDING,
    RECEIVED,
    SENT,
    deliveries,
    delivery_attempts,
    message_blobs,
    messages,
)

_ATTEMPT = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"), attempts=deliveries.c.attempts + 1,
        last_attempt_at=bindparam("b_now"), last_error=bindparam("b_error"),
        next_attempt_at=bindparam("b_next"), lease_owner=None, lease_until=None,
        uncertain=bindparam("b_uncertain"),
    )
)


def _attempt(r: AttemptResult, now: datetime) -> dict[str, Any]:
    """The values an attempt result writes in its row (both statements below)."""
    return {"b_id": r.delivery_id, "b_status": r.status,
            "b_error": r.error[:1000] if r.error else None,
            "b_next": r.retry_at or now, "b_uncertain": r.uncertain}


def _unsent(results: Sequence[AttemptResult], now: datetime) -> list[dict[str, Any]]:
    """The history rows of the attempts that did not deliver (delivery_attempts)."""
    return [{"delivery_id": r.delivery_id, "at": now, "status": r.status,
             "error": r.error[:1000] if r.error else None}
            for r in results if r.status != SENT]


# delivery_results on PostgreSQL in one statement (see _results_in_one_round_trip); the
# attempts that did not deliver go to delivery_attempts in the same statement
_RESULTS = f"""
WITH done AS (
    UPDATE deliveries AS d
    SET status = v.status, attempts = d.attempts + 1, last_attempt_at = %(now)s,
        last_error = v.error, next_attempt_at = v.next, lease_owner = NULL,
        lease_until = NULL, uncertain = v.uncertain
    FROM unnest(%(id)s::int[], %(status)s::text[], %(error)s::text[],
                %(next)s::timestamptz[], %(uncertain)s::bool[])
         AS v(id, status, error, next, uncertain)
    WHERE d.id = v.id AND d.lease_owner = %(owner)s
    RETURNING d.id, v.status, v.error
), tried AS (
    INSERT INTO delivery_attempts (delivery_id, at, status, error)
    SELECT id, %(now)s, status, error FROM done WHERE status <> '{SENT}'
)
SELECT id FROM done
"""

_CONTENT = (
    select(messages.c.id, messages.c.trace_header, messages.c.auth_header,
           message_blobs.c.data, message_blobs.c.key_id)
    .join(message_blobs, message_blobs.c.message_id == messages.c.id)
    .where(messages.c.id.in_(bindparam("b_ids", expanding=True)))
)
CONTENT_CHUNK = 500  # messages read in one statement at most


class DeliveryStore(StoreBase):
    """The deliveries table."""

    def claim_deliveries(self, owner: str, limit: int, lease: float) -> list[DeliveryJob]:
        """Take due pending deliveries (SKIP LOCKED on PostgreSQL, like ``claim``)."""
        now = utcnow()
        with self.writing() as conn:
            rows = conn.execute(
                select(deliveries.c.id, deliveries.c.message_id, deliveries.c.tenant_id,
                       deliveries.c.kind, deliveries.c.recipient, deliveries.c.destination,
                       deliveries.c.attempts, deliveries.c.created_at, deliveries.c.lease_owner,
                       deliveries.c.uncertain,
                       messages.c.mail_from,
                       messages.c.direction, messages.c.tags, messages.c.message_id.label("mid"))
                .join(messages, messages.c.id == deliveries.c.message_id)
                .where(
                    deliveries.c.status == PENDING,
                    deliveries.c.next_attempt_at <= now,
                    lease_free(deliveries, now),
                )
                .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=deliveries)
            ).all()
            if rows:
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id.in_([r.id for r in rows]))
                    .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease))
                )
        return [
            DeliveryJob(r.id, r.message_id, r.tenant_id, r.kind, r.recipient, r.destination,
                        r.mail_from, r.attempts, aware(r.created_at), r.direction,
                        tuple(r.tags or ()), r.mid, r.lease_owner is not None or r.uncertain)
            for r in rows
        ]

    def delivery_contents(self, message_ids: Iterable[str]
                          ) -> dict[str, tuple[str, bytes] | KeyUnavailable]:
        """For composing what is sent, by message: our header fields (Received,
        Authentication-Results) and the original; KeyUnavailable for an original
        sealed with a key that is not here.  Messages that are gone are left out."""
        wanted = sorted(set(message_ids))
        out: dict[str, tuple[str, bytes] | KeyUnavailable] = {}
        with self.engine.connect().execution_options(readonly=True) as conn:
            for start in range(0, len(wanted), CONTENT_CHUNK):
                rows = conn.execute(_CONTENT, {"b_ids": wanted[start:start + CONTENT_CHUNK]})
                for row in rows:
                    try:
                        raw = self.plain(row.id, row.key_id, row.data)
                    except KeyUnavailable as exc:
                        out[row.id] = exc
                    else:
                        out[row.id] = (row.trace_header + (row.auth_header or ""), raw)
        return out

    def delivery_results(self, owner: str, results: Sequence[AttemptResult]) -> list[bool]:
        """Record attempts, in one transaction.

        A ``bounce`` (the DSN for a failed delivery) is stored in the same
        transaction as the failure, so a failure is never recorded without its
        DSN, nor its DSN twice.
        """
        now = utcnow()
        if self.engine.dialect.driver == "psycopg" and all(r.bounce is None for r in results):
            held = self._results_in_one_round_trip(owner, results, now)
            return [r.delivery_id in held for r in results]
        with self.writing() as conn:
            # The rows still ours, locked in order of id as every writer of claimed rows
            # locks them (no deadlock), then one statement for all: two round trips to
            # the server whatever the group's size (SQLite: the write lock is held).
            held = set(conn.execute(
                select(deliveries.c.id)
                .where(deliveries.c.id.in_([r.delivery_id for r in results]),
                       deliveries.c.lease_owner == owner)
                .order_by(deliveries.c.id)
                .with_for_update()
            ).scalars())
            mine = [r for r in results if r.delivery_id in held]
            if mine:
                conn.execute(_ATTEMPT, [{"b_now": now, **_attempt(r, now)} for r in mine])
                tried = _unsent(mine, now)
                if tried:
                    conn.execute(insert(delivery_attempts), tried)
            bounces = [r.bounce for r in mine if r.bounce is not None]
            if bounces:
                _insert_messages(conn, bounces, self.keystore)
        return [r.delivery_id in held for r in results]

    def _results_in_one_round_trip(self, owner: str, results: Sequence[AttemptResult],
                                   now: datetime) -> set[int]:
        """PostgreSQL, no DSN to store: BEGIN, one UPDATE for the group and COMMIT sent
        together in psycopg's pipeline mode, one round trip to the server where the
        statements above take four.  Every round trip counts: a copy sent and not yet
        recorded is sent again if this process dies meanwhile, and on a loaded server
        each costs milliseconds.  A row no longer leased to ``owner`` is left alone.
        No deadlock: the rows are leased to this process, and the others that touch
        them (lease renewal, claims) skip locked rows rather than wait; the values come
        in order of id all the same."""
        rows = [_attempt(r, now) for r in sorted(results, key=lambda r: r.delivery_id)]
        params: dict[str, Any] = {column: [row[f"b_{column}"] for row in rows]
                                  for column in ("id", "status", "error", "next", "uncertain")}
        params.update(now=now, owner=owner)
        with self.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.pipeline(), raw.cursor() as cursor:
                cursor.execute(_RESULTS, params)
                raw.commit()
                return {row[0] for row in cursor.fetchall()}

    def list_deliveries(self, status: str | None = None,
                        tenant: str | None = None) -> list[dict[str, Any]]:
        q = select(deliveries).order_by(deliveries.c.id)
        if status is not None:
            q = q.where(deliveries.c.status == status)
        if tenant is not None:
            q = q.where(deliveries.c.tenant_id == tenant)
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def retry_deliveries(self, delivery_id: int | None = None) -> int:
        """Make deferred, held or failed deliveries due now (all, or one)."""
        q = update(deliveries).where(deliveries.c.status.in_((PENDING, HELD, FAILED)))
        if delivery_id is not None:
            q = q.where(deliveries.c.id == delivery_id)
        with self.writing() as conn:
            return int(conn.execute(
                q.values(status=PENDING, next_attempt_at=utcnow(), lease_owner=None,
                         lease_until=None)
            ).rowcount)

    def queue_stats(self) -> QueueStats:
        """The backlog: messages waiting for the pipeline, deliveries waiting by
        tenant and state, and the age of the oldest of each (for the metrics)."""
        now = utcnow()
        with self.engine.connect().execution_options(readonly=True) as conn:
            waiting, oldest = conn.execute(
                select(func.count(), func.min(messages.c.received_at))
                .where(messages.c.status == RECEIVED)
            ).one()
            rows = conn.execute(
                select(deliveries.c.tenant_id, deliveries.c.status, func.count(),
                       func.min(deliveries.c.created_at))
                .where(deliveries.c.status.in_((PENDING, HELD)))
                .group_by(deliveries.c.tenant_id, deliveries.c.status)
            ).all()

        def age(when: datetime | None) -> float:
            return max((now - aware(when)).total_seconds(), 0.0) if when is not None else 0.0

        return QueueStats(int(waiting), age(oldest),
                          [(r[0], r[1], int(r[2]), age(r[3])) for r in rows])

    def release_held(self, reason_prefix: str) -> int:
        """Make held deliveries whose reason starts with ``reason_prefix`` due now
        (after a policy change that may have removed the reason)."""
        with self.writing() as conn:
            return int(conn.execute(
                update(deliveries)
                .where(deliveries.c.status == HELD,
                       deliveries.c.last_error.startswith(reason_prefix, autoescape=True))
                .values(status=PENDING, next_attempt_at=utcnow(), lease_owner=None,
                        lease_until=None)
            ).rowcount)

    def drop_delivery(self, delivery_id: int, reason: str) -> bool:
        with self.writing() as conn:
            done = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.status != "sent")
                .values(status=FAILED, last_error=f"dropped: {reason}"[:1000],
                        lease_owner=None, lease_until=None)
            ).rowcount
        return done == 1


@dataclass(frozen=True)
class NoticeDelivery:
    """How a notice the gateway wrote (to a privacy contact) stands: ``state`` is sent,
    pending, held or failed; ``reason`` the last attempt's error or the hold's."""

    state: str
    delivered_at: datetime | None = None
    reason: str | None = None


def notice_deliveries(conn: Any, message_ids: Sequence[str]) -> dict[str, NoticeDelivery]:
    """The delivery of each of these notices to its recipient (not a rule's copies of
    it); a notice the pipeline has not processed yet is pending."""
    copies: dict[str, list[Any]] = {}
    ids = list(message_ids)
    for chunk in range(0, len(ids), 500):
        for d in conn.execute(select(deliveries.c.message_id, deliveries.c.status,
                                     deliveries.c.last_attempt_at, deliveries.c.last_error)
                              .where(deliveries.c.message_id.in_(ids[chunk:chunk + 500]),
                                     deliveries.c.kind == "rcpt")):
            copies.setdefault(d.message_id, []).append(d)
    out = {}
    for message_id in ids:
        rows = copies.get(message_id, [])
        sent = [aware(d.last_attempt_at) for d in rows
                if d.status == SENT and d.last_attempt_at is not None]
        if sent:
            out[message_id] = NoticeDelivery(SENT, min(sent))
        elif rows:
            out[message_id] = NoticeDelivery(rows[0].status, None, rows[0].last_error)
        else:
            out[message_id] = NoticeDelivery(PENDING)
    return out

