"""What every family of tables shares: the engine, the write turn (SQLite has one
writer at a time), the disk-space check, tenants, and named exclusive sections."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from gateway.clock import utcnow
from gateway.records import NewMessage
from gateway.store import database
from gateway.store.keystore import KeyStore, KeyUnavailable
from gateway.store.models import (
    tenants,
)

log = logging.getLogger(__name__)


def lease_free(table: Table, now: object) -> ColumnElement[bool]:
    """A row of ``table`` nobody holds: never leased, or its lease run out."""
    return or_(table.c.lease_until.is_(None), table.c.lease_until < now)


def _is_connection_error(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or exc.__class__.__name__ == "OperationalError"


@dataclass(slots=True)
class _Pending:
    """Messages of one session waiting for the group committer (see intake)."""

    messages: Sequence[NewMessage]
    future: asyncio.Future[None]
    digests: dict[int, str]  # see _digests
    queued_at: float = field(default_factory=time.monotonic)


class StoreBase:
    """The database connection the table families below share."""

    def __init__(
        self,
        engine: Engine,
        *,
        commit_batch_max: int = 512,
        sqlite_path: Path | None = None,
        min_free_space: int = 0,
        on_commit: Callable[[int, float], None] | None = None,
        audit_key: bytes = b"",
        keystore: KeyStore | None = None,
        keystore_problem: str | None = None,
    ) -> None:
        self.engine = engine
        self.keystore = keystore  # None: originals are stored in clear
        self.keystore_problem = keystore_problem  # why there is none, when one is configured
        self.audit_key = audit_key  # keys the audit chain's HMACs (the privacy key's chain)
        self.commit_batch_max = commit_batch_max
        self.sqlite_path = sqlite_path
        self.min_free_space = min_free_space
        self._on_commit = on_commit  # (messages, seconds) of each group commit, for metrics
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="commit")
        self._listeners: list[Callable[[], None]] = []
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

    def ping(self) -> None:
        """Raise unless the database answers a query that reads it (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(select(tenants.c.id).limit(1)).all()

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
