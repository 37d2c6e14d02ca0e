"""Every read and write of the database goes through ``Store``.

Acceptance is group-committed: SMTP sessions hand their messages to
``accept()``, one committer thread writes everything that arrived meanwhile in
one transaction (one fsync), and each session's future resolves only after
that commit returned.  So throughput is not capped by the disk's fsync rate and
250 still means "on disk".  The pipeline's calls (claim, finish_many, quarantine)
and the command line's reads are plain synchronous methods, run off the event
loop by their callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from gateway.clock import aware, utcnow
from gateway.errors import TempFailure, one_line
from gateway.privacy.keys import PrivacyKey
from gateway.records import (
    AttemptResult,
    ConsentRows,
    DeliveryJob,
    NewMessage,
    Notice,
    Outcome,
    ParsedFields,
    PipelineInput,
    QueueStats,
    Removed,
    RetentionGroup,
)
from gateway.store import audit as audit_chain
from gateway.store import database
from gateway.store.keystore import KeyStore, KeyUnavailable
from gateway.store.models import (
    FAILED,
    HELD,
    PENDING,
    PROCESSED,
    QUARANTINED,
    RECEIVED,
    audit_events,
    deliveries,
    imap_imports,
    message_addresses,
    message_blobs,
    messages,
    subprocessor_notices,
    subprocessor_objections,
    subprocessor_registry,
    tenants,
)

log = logging.getLogger(__name__)

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


_ATTEMPT = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("b_id"), deliveries.c.lease_owner == bindparam("b_owner"))
    .values(
        status=bindparam("b_status"), attempts=deliveries.c.attempts + 1,
        last_attempt_at=bindparam("b_now"), last_error=bindparam("b_error"),
        next_attempt_at=bindparam("b_next"), lease_owner=None, lease_until=None,
        uncertain=bindparam("b_uncertain"),
    )
)
_CONTENT = (
    select(messages.c.trace_header, messages.c.auth_header, message_blobs.c.data,
           message_blobs.c.key_id)
    .join(message_blobs, message_blobs.c.message_id == messages.c.id)
    .where(messages.c.id == bindparam("b_id"))
)


def tag_key(tags: Iterable[str]) -> str:
    """Tags in their canonical form for ``messages.tag_key``: sorted, comma-joined."""
    return ",".join(sorted(set(tags)))


@dataclass(slots=True)
class _Pending:
    messages: Sequence[NewMessage]
    future: asyncio.Future[None]
    digests: dict[int, str]  # see _digests
    queued_at: float = field(default_factory=time.monotonic)


HASH_ON_LOOP_MAX = 1 << 20  # bytes of originals hashed on the event loop at once


class Store:
    """The gateway's database, behind one object passed to every part."""

    def __init__(
        self,
        engine: Engine,
        *,
        commit_batch_max: int = 512,
        sqlite_path: Path | None = None,
        min_free_space: int = 0,
        on_commit: Callable[[int, float], None] | None = None,
        privacy_key: PrivacyKey | None = None,
        keystore: KeyStore | None = None,
        keystore_problem: str | None = None,
    ) -> None:
        self.engine = engine
        self.keystore = keystore  # None: originals are stored in clear
        self.keystore_problem = keystore_problem  # why there is none, when one is configured
        self.privacy_key = privacy_key  # privacy.key_file: subject hashes, the audit chain
        self.audit_key = privacy_key.chain if privacy_key is not None else b""
        self.commit_batch_max = commit_batch_max
        self.sqlite_path = sqlite_path
        self.min_free_space = min_free_space
        self._on_commit = on_commit  # (messages, seconds) of each group commit, for metrics
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._listeners: list[asyncio.Event] = []
        self.last_commit = float("-inf")  # time.monotonic() of the last commit of new mail
        self._space_checked = 0.0
        self._space_ok = True
        # SQLite has one writer at a time.  This process's writers (the group
        # committer, the pipeline, deliveries, the sweeper) take turns through a lock
        # that hands the turn over at once: SQLite's own busy handler sleeps in steps
        # of up to 100 ms, and a commit with clients waiting must not sleep behind a
        # pipeline update that ended a millisecond later.
        self._sqlite = engine.dialect.name == "sqlite"
        self._write_turn = threading.RLock() if self._sqlite else contextlib.nullcontext()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """A write transaction, committed at the end of the block (every write of the
        gateway goes through here: on SQLite, they take turns at once)."""
        with self._write_turn, self.engine.begin() as conn:
            yield conn

    # ------------------------------------------------------------ acceptance
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._committer = asyncio.create_task(self._commit_loop(), name="group-commit")

    async def close(self) -> None:
        """Commit whatever is queued, then stop the committer."""
        if self._queue is not None and self._committer is not None:
            await self._queue.put(None)
            await self._committer
        self._executor.shutdown(wait=True)

    def notify_on_commit(self, event: asyncio.Event) -> None:
        """Set ``event`` after every commit of new messages (wakes the pipeline)."""
        self._listeners.append(event)

    async def accept(self, batch: Sequence[NewMessage]) -> None:
        """Store ``batch`` atomically; returns once it is committed durably.

        Raises TempFailure when the database cannot take it (the caller answers 451).
        """
        assert self._queue is not None, "Store.start() was not awaited"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # Hashed before the committer's turn: in its thread each hash gave the GIL
        # away and waited to get it back, and every session waits for the committer.
        # Up to a megabyte on the event loop (60 us per 100 KB), beyond in a thread.
        if sum(len(m.data) for m in batch) <= HASH_ON_LOOP_MAX:
            digests = _digests(batch)
        else:
            digests = await loop.run_in_executor(None, _digests, batch)
        await self._queue.put(_Pending(batch, future, digests))
        # shield: a client that hangs up must not cancel a commit that is under way
        await asyncio.shield(future)

    async def _commit_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            group = [first]
            count = len(first.messages)
            while count < self.commit_batch_max and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
                count += len(item.messages)
            first = item = None
            await self._commit(loop, group, count)
            # the wait for the next group must not keep this one's originals alive
            group = []

    async def _commit(self, loop: asyncio.AbstractEventLoop, group: list[_Pending],
                      count: int) -> None:
        started = time.monotonic()
        try:
            await loop.run_in_executor(self._executor, self._write_group, group)
        except (IntegrityError, DBAPIError) as exc:
            if len(group) > 1 and not _is_connection_error(exc):
                # One bad item must not fail the others: write them one by one.
                for item in group:
                    await self._commit_single(loop, item)
            else:
                log.error("commit of %d messages failed: %s", count, one_line(exc))
                _fail(group, exc)
            return
        except (SQLAlchemyError, OSError) as exc:
            log.error("commit of %d messages failed: %s", count, one_line(exc))
            _fail(group, exc)
            return
        except Exception as exc:  # a bug must fail this group (451), not stop the loop
            log.exception("commit of %d messages failed", count)
            _fail(group, exc)
            return
        if self._on_commit is not None:
            self._on_commit(count, time.monotonic() - started)
        self.last_commit = time.monotonic()
        for item in group:
            if not item.future.done():
                item.future.set_result(None)
        for event in self._listeners:
            event.set()

    async def _commit_single(self, loop: asyncio.AbstractEventLoop, item: _Pending) -> None:
        try:
            await loop.run_in_executor(self._executor, self._write_group, [item])
        except Exception as exc:
            log.error("commit of message %s failed: %s", item.messages[0].id, one_line(exc))
            _fail([item], exc)
        else:
            if not item.future.done():
                item.future.set_result(None)

    def _write_group(self, group: Sequence[_Pending]) -> None:
        batch = [m for item in group for m in item.messages]
        digests = {k: v for item in group for k, v in item.digests.items()}
        blobs = _blobs(batch, self.keystore)  # sealed before the write lock is taken
        with self.writing() as conn:
            _insert_messages(conn, batch, blobs=blobs, digests=digests)

    def has_free_space(self) -> bool:
        """False when the disk holding the SQLite database is below min_free_space.

        Looked up at most once a second: statvfs per MAIL FROM would be wasted work.
        """
        if self.sqlite_path is None or self.min_free_space <= 0:
            return True
        now = time.monotonic()
        if now - self._space_checked >= 1.0:
            self._space_checked = now
            try:
                st = os.statvfs(self.sqlite_path.parent)
            except OSError:
                self._space_ok = False
            else:
                self._space_ok = st.f_bavail * st.f_frsize >= self.min_free_space
        return self._space_ok

    # ------------------------------------------------------------ tenants
    def sync_tenants(self, configured: Mapping[str, str]) -> None:
        """Make a row for every configured tenant (id -> display name)."""
        with self.writing() as conn:
            database.take_turn(conn, "tenants")  # instances that start together
            known = {r.id: r.name for r in conn.execute(select(tenants.c.id, tenants.c.name))}
            for tid, name in configured.items():
                if tid not in known:
                    conn.execute(
                        insert(tenants).values(id=tid, name=name, active=True, created_at=utcnow())
                    )
                elif known[tid] != name:
                    conn.execute(update(tenants).where(tenants.c.id == tid).values(name=name))

    # ------------------------------------------------------------ pipeline
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
                    or_(messages.c.lease_until.is_(None), messages.c.lease_until < now),
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
                        or_(messages.c.lease_until.is_(None), messages.c.lease_until < now,
                            messages.c.lease_owner == owner),
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

    def release_dead_leases(self, host: str, alive: Callable[[int], bool]) -> int:
        """Free the leases of this host's processes that no longer run.

        A daemon killed with -9 leaves its claimed messages and deliveries
        leased; after a restart on the same host they are taken up at once
        instead of after the lease time.  Other hosts' leases expire on their own.
        """
        freed = 0
        with self.writing() as conn:
            for table, status in ((messages, RECEIVED), (deliveries, PENDING)):
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
                if dead:
                    freed += int(conn.execute(
                        update(table)
                        .where(table.c.status == status, table.c.lease_owner.in_(dead))
                        .values(lease_owner=None, lease_until=None)
                    ).rowcount)
        return freed

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

    def plain(self, message_id: str, key_id: str | None, data: bytes) -> bytes:
        """A stored original as it was received: opened with its tenant's key when it
        was sealed (KeyUnavailable when that key is gone or not configured here)."""
        if key_id is None:
            return data
        if self.keystore is None:
            why = self.keystore_problem or ("no master key is configured "
                                            "(privacy.master_key_file or master_key_env)")
            raise KeyUnavailable(f"message {message_id} is encrypted (key {key_id}): {why}")
        return self.keystore.open(message_id, key_id, data)

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
        return [message_id in held for message_id, _, _ in items]

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
        ``lease`` seconds from now; returns how many it still held."""
        rows = {"messages": messages, "deliveries": deliveries}[table]
        with self.writing() as conn:
            return conn.execute(
                update(rows)
                .where(rows.c.id.in_(list(ids)), rows.c.lease_owner == owner)
                .values(lease_until=utcnow() + timedelta(seconds=lease))
            ).rowcount

    # ------------------------------------------------------------ reading
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

    # ------------------------------------------------------------ deliveries
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
                    or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now),
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

    def delivery_content(self, message_id: str) -> tuple[str, bytes] | None:
        """Our header fields (Received, Authentication-Results) and the original of a
        message, for composing what we send."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(_CONTENT, {"b_id": message_id}).first()
        return None if row is None else (row.trace_header + (row.auth_header or ""),
                                         self.plain(message_id, row.key_id, row.data))

    def delivery_results(self, owner: str, results: Sequence[AttemptResult]) -> list[bool]:
        """Record attempts, in one transaction.

        A ``bounce`` (the DSN for a failed delivery) is stored in the same
        transaction as the failure, so a failure is never recorded without its
        DSN, nor its DSN twice.
        """
        now = utcnow()
        out = []
        with self.writing() as conn:
            for r in results:
                done = conn.execute(_ATTEMPT, {
                    "b_id": r.delivery_id, "b_owner": owner, "b_status": r.status,
                    "b_now": now, "b_error": r.error[:1000] if r.error else None,
                    "b_next": r.retry_at or now, "b_uncertain": r.uncertain,
                }).rowcount
                if done == 1 and r.bounce is not None:
                    _insert_messages(conn, [r.bounce], self.keystore)
                out.append(done == 1)
        return out

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

    def ping(self) -> None:
        """Raise unless the database answers a query that reads it (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(select(tenants.c.id).limit(1)).all()

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

    # ------------------------------------------------------------ retention
    def retention_groups(self) -> list[RetentionGroup]:
        """Stored messages by (tenant, tags): how many, and the oldest.

        Messages still waiting for the pipeline (status received) have no tags
        yet and are left out: they are not the sweeper's to judge.
        """
        with self.engine.connect().execution_options(readonly=True) as conn:
            rows = conn.execute(
                select(messages.c.tenant_id, messages.c.tag_key, func.count(),
                       func.min(messages.c.received_at))
                .where(messages.c.status != RECEIVED)
                .group_by(messages.c.tenant_id, messages.c.tag_key)
                .order_by(messages.c.tenant_id, messages.c.tag_key)
            ).all()
        return [RetentionGroup(r[0], r[1], r[2], aware(r[3])) for r in rows]

    @staticmethod
    def _expired(tenant: str, key: str, cutoff: datetime, held_addresses: Sequence[str]) -> Any:
        where = [messages.c.tenant_id == tenant, messages.c.tag_key == key,
                 messages.c.received_at < cutoff, messages.c.status != RECEIVED]
        if held_addresses:
            where.append(~exists().where(
                message_addresses.c.message_id == messages.c.id,
                func.lower(message_addresses.c.address).in_(list(held_addresses)),
            ))
        return where

    def count_expired(self, tenant: str, key: str, cutoff: datetime,
                      held_addresses: Sequence[str] = ()) -> int:
        """How many messages of a group were received before ``cutoff`` (and not held)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return int(conn.execute(
                select(func.count()).select_from(messages)
                .where(*self._expired(tenant, key, cutoff, held_addresses))
            ).scalar_one())

    def delete_expired(self, tenant: str, key: str, cutoff: datetime,
                       held_addresses: Sequence[str], limit: int) -> list[tuple[str, str | None]]:
        """Delete up to ``limit`` expired messages of a group, completely, in one transaction.

        Everything the gateway keeps of a message goes with it: the raw original,
        its addresses and its deliveries (pending ones included), then the row.
        Returns (queue id, Message-ID field) of each message deleted.
        """
        with self.writing() as conn:
            rows = [(r.id, r.message_id) for r in conn.execute(
                select(messages.c.id, messages.c.message_id)
                .where(*self._expired(tenant, key, cutoff, held_addresses))
                .order_by(messages.c.received_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )]
            if rows:
                _delete_messages(conn, [queue_id for queue_id, _ in rows])
        if rows and self._sqlite:
            self._checkpoint()
        return rows

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database now, without waiting for anyone.

        The commit that grows the WAL past its limit does this otherwise, and
        after a bulk delete that would be an acceptance commit, with a client
        waiting for its 250.
        """
        raw = self.engine.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
        finally:
            raw.close()

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Run something on one instance at a time: True if this one got the turn.

        PostgreSQL: a session advisory lock, so when several instances share
        the database only one sweeps; it is freed if the holder dies.  SQLite
        serves a single host, where the caller's own loop is the only one.
        """
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        key = database.lock_key(name)
        with self.engine.connect() as conn:
            got = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar_one())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(select(func.pg_advisory_unlock(key)))
                    conn.commit()

    # ------------------------------------------------------------ subprocessors
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

    # ------------------------------------------------------------ audit
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


def _blobs(batch: Sequence[NewMessage], keystore: KeyStore | None) -> list[dict[str, Any]]:
    """The message_blobs rows of new messages: with a keystore, each original sealed
    under its tenant's data key."""
    if keystore is None:
        return [{"message_id": m.id, "data": m.data, "key_id": None} for m in batch]
    out = []
    for m in batch:
        key_id, sealed = keystore.seal(m.tenant_id, m.id, m.data)
        out.append({"message_id": m.id, "data": sealed, "key_id": key_id})
    return out


def _digests(batch: Sequence[NewMessage]) -> dict[int, str]:
    """SHA-256 of each original, once per original (a message for two tenants is two
    NewMessages on one bytes object), by id() of its bytes."""
    return {id(m.data): hashlib.sha256(m.data).hexdigest()
            for m in {id(m.data): m for m in batch}.values()}


def _insert_messages(conn: Any, batch: Sequence[NewMessage],
                     keystore: KeyStore | None = None, *,
                     blobs: list[dict[str, Any]] | None = None,
                     digests: dict[int, str] | None = None) -> None:
    """Rows, originals and envelope addresses of new messages, in the caller's transaction;
    ``blobs`` and ``digests`` when they were prepared already (``_blobs``, ``_digests``)."""
    rows, addresses = [], []
    if digests is None:
        digests = _digests(batch)
    for m in batch:
        rows.append(
            {
                "id": m.id, "tenant_id": m.tenant_id, "status": RECEIVED,
                "received_at": m.received_at, "mail_from": m.mail_from, "size": len(m.data),
                "sha256": digests[id(m.data)], "client_address": m.client_address,
                "helo": m.helo, "protocol": m.protocol, "trace_header": m.trace_header,
                "smtputf8": m.smtputf8, "direction": m.direction,
                "submitted_by": m.submitted_by, "tags": [], "parse_failed": False,
                "attempts": 0,
            }
        )
        addresses.append({"message_id": m.id, "role": "mail_from", "address": m.mail_from})
        addresses.extend(
            {"message_id": m.id, "role": "rcpt_to", "address": r} for r in m.recipients
        )
    database.insert_rows(conn, messages, rows)
    database.insert_rows(conn, message_blobs,
                         blobs if blobs is not None else _blobs(batch, keystore), bulky=True)
    database.insert_rows(conn, message_addresses, addresses)


def _delete_messages(conn: Any, ids: Sequence[str]) -> Removed:
    """Delete messages with everything the gateway keeps of them, in the caller's
    transaction: deliveries (pending copies and keep-original jobs are cancelled with
    them), address rows, originals, the record of the mailbox they were imported from;
    a subprocessor notice that was one of them forgets which.  Retention and erasure
    both delete through here."""
    if not ids:
        return Removed()
    ids = list(ids)
    pending = conn.execute(select(func.count()).select_from(deliveries).where(
        deliveries.c.message_id.in_(ids), deliveries.c.status == PENDING)).scalar_one()
    removed = Removed(pending=pending)
    removed.deliveries = conn.execute(
        delete(deliveries).where(deliveries.c.message_id.in_(ids))).rowcount
    removed.imports = conn.execute(
        delete(imap_imports).where(imap_imports.c.message_id.in_(ids))).rowcount
    conn.execute(update(subprocessor_notices).where(subprocessor_notices.c.message_id.in_(ids))
                 .values(message_id=None))
    for table in (message_addresses, message_blobs):
        conn.execute(delete(table).where(table.c.message_id.in_(ids)))
    removed.messages = conn.execute(delete(messages).where(messages.c.id.in_(ids))).rowcount
    return removed


def _is_connection_error(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or exc.__class__.__name__ == "OperationalError"


def _fail(group: Sequence[_Pending], exc: BaseException) -> None:
    for item in group:
        if not item.future.done():
            item.future.set_exception(TempFailure(one_line(exc)))
