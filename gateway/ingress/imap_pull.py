"""Import mail from a tenant's own mailbox (IMAP), into the same pipeline as SMTP mail.

One ``FolderImport`` per configured folder of each ``tenants.ID.imap_pull``
source holds the folder's lease in the database (so that with several
instances each folder is read by one), and then, round after round:

1. selects the folder (EXAMINE, read-only, when ``after_import: keep``: then
   not even \\Seen changes) and compares its UIDVALIDITY with the stored one: a
   different one means the server renumbered the folder, and the import starts
   over from UID 1, recognising what it already has by content hash (nothing is
   imported twice, nothing skipped);
2. finishes the ``after_import`` handling of messages an earlier round
   imported but did not get to (a crash between the commit and the handling);
3. fetches the messages above the last imported UID in batches (sizes first;
   one larger than ``smtp.max_message_size`` is left on the server and logged;
   bodies with BODY.PEEK and a byte limit, so a server cannot push more),
   stores each batch and advances the last UID in one transaction, and only
   then marks, moves or deletes those messages on the server;
4. waits for the next round: IDLE where the server offers it (new mail is
   fetched at once), otherwise ``interval``.

A failure (the server away, a connection dropped mid-FETCH, a NO or BAD) is
logged with its reason and recorded for ``imap status``; the round is tried
again after a pause that doubles up to ``interval``.  Nothing half-fetched is
stored.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Sequence
from datetime import datetime

from gateway import logs
from gateway.clock import utcnow
from gateway.config import GatewayConfig, ImapAccountConfig, ImapPullConfig
from gateway.headers import field_values
from gateway.imap import Fetched, ImapConnection, ImapError, encode_folder
from gateway.metrics import Metrics
from gateway.records import NewMessage
from gateway.runner import Runner
from gateway.store.ids import new_id
from gateway.store.mailboxes import FolderKey, FolderState, Imported, MailboxState
from gateway.store.repository import Store
from gateway.tenancy import has_unsafe_chars

log = logging.getLogger(__name__)

FETCH_BYTES = 16 * 1024 * 1024  # most message bytes asked for in one FETCH
LEASE_MARGIN = 300.0  # seconds a folder's lease outlasts the longest wait between rounds
_ADDRESS = re.compile(rb"<([^<>\s]*)>")


class LeaseLost(Exception):
    """Another instance holds the folder now (our lease expired)."""


def return_path(raw: bytes) -> str:
    """The envelope sender the delivering server recorded (Return-Path), or ''."""
    for value in field_values(raw, b"return-path"):
        match = _ADDRESS.search(value)
        if match is not None:
            address = match.group(1).decode("utf-8", "replace")
            return "" if has_unsafe_chars(address) else address
    return ""


def msgid_hash(raw: bytes) -> str | None:
    values = field_values(raw, b"message-id")
    if not values:
        return None
    return hashlib.sha256(b" ".join(values[0].split())).hexdigest()


def _comment(text: str) -> str:
    """Safe inside a header comment: printable ASCII, no parentheses or backslashes."""
    return "".join(c if 32 <= ord(c) < 127 and c not in "()\\" else "_"
                   for c in text)[:200]


class FolderImport(Runner):
    """Imports one folder, round after round, until stopped (a stop cancels the round
    in hand: nothing half-fetched is stored)."""

    cancel_on_stop = True

    def __init__(self, key: FolderKey, settings: ImapPullConfig, account: ImapAccountConfig,
                 state: MailboxState, *, hostname: str, max_size: int,
                 metrics: Metrics | None = None,
                 imported: Callable[[], None] = lambda: None) -> None:
        super().__init__(f"imap-pull {key}", log)
        self.key = key
        self.settings = settings
        self.account = account
        self.state = state
        self.hostname = hostname
        self.max_size = max_size or 2**31 - 2  # 0: no limit of our own
        self.metrics = metrics
        self.imported = imported  # called after each committed batch (wakes the pipeline)
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}"
        self.lease = settings.interval + LEASE_MARGIN
        self.conn: ImapConnection | None = None
        self.failures = 0  # rounds in a row that failed

    # ------------------------------------------------------------ the runner's hooks
    async def close(self) -> None:
        await self._disconnect()
        try:
            await asyncio.to_thread(self.state.release, self.key, self.owner)
        except Exception:  # shutting down: the lease expires on its own
            log.warning("imap %s: could not give up the folder's lease", self.key)

    async def turn(self) -> float | None:
        await self.round()
        self.failures = 0
        return self.settings.interval

    async def failed(self, exc: Exception) -> float | None:
        """The one catch-all of this loop: log, pause (doubling up to ``interval``), retry."""
        if isinstance(exc, LeaseLost):
            await self._disconnect()
            return self.settings.interval
        self.failures += 1
        wait = min(self.settings.interval, 2.0 ** self.failures)
        if isinstance(exc, ImapError):
            await self._failed(str(exc), wait)
            if exc.broken:
                await self._disconnect()
        else:
            log.error("imap %s: import round failed", self.key, exc_info=exc)
            await self._failed(f"{exc.__class__.__name__}: {exc}", wait)
            await self._disconnect()
        return wait

    async def rest(self, seconds: float) -> bool:
        await self._wait(seconds, idle=self.failures == 0)
        return False

    async def _wait(self, seconds: float, idle: bool) -> None:
        conn = self.conn
        if idle and conn is not None and not conn.broken and conn.new_mail:
            return  # mail came in during the round: another round at once
        if (idle and conn is not None and not conn.broken and self.settings.idle
                and "IDLE" in conn.capabilities and seconds >= 1):
            try:
                await conn.idle(seconds)
                return
            except ImapError as exc:
                log.info("imap %s: IDLE ended: %s", self.key, exc)
                await self._disconnect()
        await asyncio.sleep(seconds)

    async def _failed(self, reason: str, wait: float) -> None:
        logs.event(log, "imap_failed", logging.WARNING, source=str(self.key),
                   reason=reason, retry_in=f"{wait:.0f}s")
        if self.metrics is not None:
            self.metrics.imap_errors.labels(self.metrics.tenant(self.key.tenant_id),
                                            self.key.source).inc()
        try:
            await asyncio.to_thread(self.state.failed, self.key, self.owner, reason)
        except Exception:  # the database may be away too; the log has it
            log.warning("imap %s: could not record the error", self.key)

    async def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> ImapConnection:
        if self.conn is None or self.conn.broken:
            await self._disconnect()
            try:
                password = self.account.password()
            except ValueError as exc:
                raise ImapError(f"{self.settings.account}: {exc}", broken=True) from None
            self.conn = await ImapConnection.open(self.account, password)
        return self.conn

    # ------------------------------------------------------------ one round
    async def round(self) -> None:
        state = await asyncio.to_thread(self.state.claim, self.key, self.owner, self.lease)
        if state is None:
            log.debug("imap %s: another instance holds it", self.key)
            raise LeaseLost
        conn = await self._connection()
        # keep: EXAMINE, so that nothing changes on the server, not even \\Seen
        selected = await conn.select(self.key.folder,
                                     readonly=self.settings.after_import == "keep")
        if state.uidvalidity != selected.uidvalidity:
            if state.uidvalidity is not None:
                logs.event(log, "imap_resync", logging.WARNING, source=str(self.key),
                           old=state.uidvalidity, new=selected.uidvalidity,
                           reason="UIDVALIDITY changed: known messages are recognised by "
                                  "their content")
            state = self._held(await asyncio.to_thread(
                self.state.restart, self.key, self.owner, state, selected.uidvalidity))
        if state.done_uid < state.last_uid:
            state = await self._after_import(conn, state, state.last_uid)
        conn.new_mail = False  # from here on, an EXISTS means mail this round may miss
        uids = [u for u in await conn.uid_search(f"UID {state.last_uid + 1}:*")
                if u > state.last_uid]
        uids.sort()
        backlog = len(uids)
        self._gauge(backlog)
        if not uids:
            await asyncio.to_thread(self.state.looked, self.key, self.owner)
            return
        size = self.settings.batch_size
        for start in range(0, len(uids), size):
            if self.stopping:
                return
            chunk = uids[start:start + size]
            backlog -= len(chunk)
            if start:  # a long import keeps the folder's lease
                renewed = await asyncio.to_thread(self.state.claim, self.key, self.owner,
                                                  self.lease)
                if renewed != state:
                    raise LeaseLost
            state = await self._import(conn, state, chunk, backlog)
            state = await self._after_import(conn, state, state.last_uid)
            self._gauge(backlog)

    @staticmethod
    def _held(state: FolderState | None) -> FolderState:
        if state is None:
            raise LeaseLost
        return state

    def _gauge(self, backlog: int) -> None:
        if self.metrics is not None:
            self.metrics.imap_backlog.labels(self.metrics.tenant(self.key.tenant_id),
                                             self.key.source).set(backlog)

    async def _import(self, conn: ImapConnection, state: FolderState, chunk: Sequence[int],
                      backlog: int) -> FolderState:
        """Fetch ``chunk`` and store it with the advance of last_uid, in one transaction."""
        sizes = {f.uid: f.size or 0 for f in await conn.fetch(chunk, "(UID RFC822.SIZE)")}
        wanted = []
        for uid in chunk:
            if uid not in sizes:
                continue  # expunged since the search
            if sizes[uid] > self.max_size:
                self._too_large(uid, sizes[uid])
            else:
                wanted.append(uid)
        fetched: list[Fetched] = []
        group: list[int] = []
        group_bytes = 0
        for uid in wanted:
            if group and group_bytes + sizes[uid] > FETCH_BYTES:
                fetched += await self._bodies(conn, group)
                group, group_bytes = [], 0
            group.append(uid)
            group_bytes += sizes[uid]
        if group:
            fetched += await self._bodies(conn, group)
        now = utcnow()
        found: list[tuple[int, bytes, str]] = []
        for item in sorted(fetched, key=lambda f: f.uid):
            body = item.part("BODY[]")
            if body is None:
                continue
            if len(body) > self.max_size:  # the server sent more than it announced
                self._too_large(item.uid, len(body))
                continue
            found.append((item.uid, body, hashlib.sha256(body).hexdigest()))
        known = await asyncio.to_thread(self.state.known_hashes, self.key,
                                        [sha for _, _, sha in found])
        batch = []
        for uid, body, sha in found:
            if sha in known:
                batch.append(Imported(uid, sha, msgid_hash(body), known=known[sha]))
            else:
                batch.append(Imported(uid, sha, msgid_hash(body),
                                      message=self._message(uid, body, now)))
        done = self._held(await asyncio.to_thread(
            self.state.import_batch, self.key, self.owner, state, max(chunk), batch, backlog))
        new = [i for i in batch if i.message is not None]
        for entry in new:
            assert entry.message is not None
            logs.event(log, "imported", queue_id=entry.message.id, tenant=self.key.tenant_id,
                       source=str(self.key), uid=entry.uid, size=len(entry.message.data))
        if self.metrics is not None:
            tenant = self.metrics.tenant(self.key.tenant_id)
            self.metrics.imap_imports.labels(tenant, self.key.source, "imported").inc(len(new))
            self.metrics.imap_imports.labels(tenant, self.key.source, "duplicate").inc(
                len(batch) - len(new))
        if new:
            self.imported()
        return done

    async def _bodies(self, conn: ImapConnection, uids: Sequence[int]) -> list[Fetched]:
        # BODY.PEEK: \Seen is not set; <0.N>: the server sends at most N bytes
        return await conn.fetch(uids, f"(UID BODY.PEEK[]<0.{self.max_size + 1}>)")

    def _too_large(self, uid: int, size: int) -> None:
        logs.event(log, "imap_skipped", logging.WARNING, source=str(self.key), uid=uid,
                   size=size, reason=f"larger than smtp.max_message_size ({self.max_size}); "
                                     "left on the server")
        if self.metrics is not None:
            self.metrics.imap_imports.labels(self.metrics.tenant(self.key.tenant_id),
                                             self.key.source, "too_large").inc()

    def _message(self, uid: int, body: bytes, now: datetime) -> NewMessage:
        queue_id = new_id()
        recipient = self.settings.recipient
        trace = (f"Received: from {_comment(self.account.host)} (IMAP "
                 f"{_comment(encode_folder(self.key.folder))} UID {uid})\r\n"
                 f"\tby {self.hostname} (MailFlowr Gateway) with IMAP id {queue_id}\r\n"
                 f"\tfor <{recipient}>; {email.utils.format_datetime(now)}\r\n")
        return NewMessage(
            id=queue_id, tenant_id=self.key.tenant_id, mail_from=return_path(body),
            recipients=(recipient,), data=body, received_at=now,
            client_address="", helo=_comment(self.account.host), protocol="IMAP",
            trace_header=trace, smtputf8=False)

    async def _after_import(self, conn: ImapConnection, state: FolderState,
                            upto: int) -> FolderState:
        """Mark, move or delete on the server what is committed up to ``upto``."""
        mode = self.settings.after_import
        if upto == state.done_uid:
            return state
        # keep records its (empty) handling too: a later switch to delete or move
        # applies to what is imported from then on, never to the mail kept so far
        assert state.uidvalidity is not None
        uids = [] if mode == "keep" else await asyncio.to_thread(
            self.state.imported_uids, self.key, state.uidvalidity, state.done_uid, upto)
        for start in range(0, len(uids), 200):
            part = uids[start:start + 200]
            if mode == "mark_seen":
                await conn.add_flags(part, ["\\Seen"])
            elif mode == "delete":
                await conn.add_flags(part, ["\\Deleted"])
                await conn.expunge(part)
            else:
                assert self.settings.move_to is not None
                await self._move(conn, part, self.settings.move_to)
        return self._held(await asyncio.to_thread(self.state.handled, self.key, self.owner,
                                                  state, upto))

    async def _move(self, conn: ImapConnection, uids: list[int], folder: str) -> None:
        try:
            await conn.move(uids, folder)
        except ImapError as exc:
            if exc.broken or exc.code != "TRYCREATE":
                raise
            await conn.create(folder)
            await conn.move(uids, folder)


class ImapPull:
    """Every configured folder of every tenant's mailbox sources."""

    def __init__(self, config: GatewayConfig, store: Store, metrics: Metrics | None,
                 imported: Callable[[], None]) -> None:
        state = MailboxState(store)
        self.folders = [
            FolderImport(FolderKey(tid, name, folder), source,
                         config.imap_accounts[source.account], state,
                         hostname=config.smtp.hostname, max_size=config.smtp.max_message_size,
                         metrics=metrics, imported=imported)
            for tid, tenant in config.tenants.items()
            for name, source in tenant.imap_pull.items()
            for folder in source.folders
        ]

    def start(self) -> None:
        for folder in self.folders:
            folder.start()
        if self.folders:
            log.info("imap: importing from %d folders", len(self.folders))

    async def stop(self) -> None:
        await asyncio.gather(*(folder.stop() for folder in self.folders))
