"""Acceptance, group-committed: SMTP sessions hand their messages to ``accept()``,
one committer thread writes everything that arrived meanwhile in one transaction (one
fsync), and each session's future resolves only after that commit returned.  So
throughput is not capped by the disk's fsync rate and 250 still means "on disk"."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from gateway.errors import TempFailure, one_line
from gateway.records import (
    NewMessage,
)
from gateway.store import database
from gateway.store.base import StoreBase, _is_connection_error, _Pending
from gateway.store.keystore import KeyStore
from gateway.store.models import (
    RECEIVED,
    message_addresses,
    message_blobs,
    messages,
)

HASH_ON_LOOP_MAX = 1 << 20  # bytes of originals hashed on the event loop at once

log = logging.getLogger(__name__)


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


def _fail(group: Sequence[_Pending], exc: BaseException) -> None:
    for item in group:
        if not item.future.done():
            item.future.set_exception(TempFailure(one_line(exc)))


class IntakeStore(StoreBase):
    """Acceptance, group-committed."""

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._committer = asyncio.create_task(self._commit_loop(), name="group-commit")

    async def close(self) -> None:
        """Commit whatever is queued, then stop the committer."""
        if self._queue is not None and self._committer is not None:
            await self._queue.put(None)
            await self._committer
        self._executor.shutdown(wait=True)

    def notify_on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every commit of new messages (wakes the pipeline)."""
        self._listeners.append(listener)

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
        for item in group:
            if not item.future.done():
                item.future.set_result(None)
        for listener in self._listeners:
            listener()

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
