"""Keep the original on the customer's server: IMAP APPEND, exactly once.

A keep-original job is a delivery of kind ``append`` (recipient: the folder,
destination: the ``imap_accounts`` entry), so it is claimed, retried with
backoff and listed by ``queue list`` like any other delivery.  What is
appended is the stored original, byte for byte: none of the gateway's own
header fields.

Exactly once: an attempt can reach the server and still go unrecorded (the
daemon dies between the server's OK and the database write, or the answer is
lost with the connection).  A job whose earlier claim ended without a result,
or whose earlier attempt broke off after its APPEND went out, therefore first
looks in the folder for the message (by Message-ID, or by size when it has
none, each candidate confirmed by its SHA-256) and appends only when it is not
there.

Connections are kept open per account between jobs (at most
``connections`` per account at once); one the server has closed meanwhile is
replaced transparently, and the job then looks before appending, since the
lost connection may have carried an APPEND.  Jobs for one folder that wait for
a connection go together in one APPEND (MULTIAPPEND, RFC 3502: all or none),
with the messages sent as non-synchronizing literals (LITERAL+) where offered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import ImapAccountConfig, KeepOriginalConfig
from gateway.delivery.smtp import PERMANENT, SENT, TEMPORARY, Result
from gateway.imap import ImapConnection, ImapError, quoted

log = logging.getLogger(__name__)

IDLE_TIME = 60.0  # seconds an unused connection stays open
MAX_CANDIDATES = 50  # messages compared by content when looking for an earlier append
_SEARCHABLE = re.compile(r"^[\x21-\x7e]{1,500}$")  # a Message-ID we can send in a SEARCH


@dataclass(frozen=True, slots=True)
class AppendJob:
    account: str
    folder: str
    data: bytes
    message_id: str | None  # the Message-ID field, to find an earlier append
    look_first: bool  # an earlier attempt may have arrived


class Appender:
    def __init__(self, accounts: Mapping[str, ImapAccountConfig],
                 keep: Callable[[str], KeepOriginalConfig | None]) -> None:
        self.accounts = accounts
        self.keep = keep  # the tenant's keep_original setting (flags, create_folder)
        self._idle: dict[str, list[tuple[float, ImapConnection]]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        # jobs waiting for a connection, by (account, folder, flags, create)
        self._gathering: dict[tuple[str, str, tuple[str, ...], bool],
                              list[tuple[AppendJob, asyncio.Future[Result]]]] = {}

    def held(self, account: str) -> str | None:
        """Why a job for ``account`` cannot be tried (held), or None."""
        if account not in self.accounts:
            return f"IMAP account {account!r} is not configured (imap_accounts)"
        return None

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                await conn.close()

    async def _connection(self, name: str) -> tuple[ImapConnection, bool]:
        """An idle connection (True: reused) or a new one."""
        now = time.monotonic()
        pool = self._idle.get(name, [])
        while pool:
            since, conn = pool.pop()
            if now - since < IDLE_TIME and not conn.broken:
                return conn, True
            await conn.close()
        settings = self.accounts[name]
        try:
            password = settings.password()
        except ValueError as exc:
            raise ImapError(f"{name}: {exc}", broken=True) from None
        return await ImapConnection.open(settings, password), False

    def _release(self, name: str, conn: ImapConnection) -> None:
        if not conn.broken:
            self._idle.setdefault(name, []).append((time.monotonic(), conn))

    async def append(self, tenant: str, job: AppendJob) -> Result:
        """One attempt; the Result says sent, temporary or permanent, with the reason.

        Jobs for the same folder that arrive while every connection of the account is
        busy wait together and go in one APPEND (MULTIAPPEND, where the server has it):
        a group commit for the customer's server, which saves each APPEND to disk."""
        keep = self.keep(tenant)
        flags = tuple(keep.flags) if keep is not None else ()
        create = keep.create_folder if keep is not None else False
        if job.look_first:  # alone: it may have to look in the folder first
            async with self._slot(job.account):
                return (await self._send(job.account, [job], flags, create, True))[0]
        key = (job.account, job.folder, flags, create)
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        gathering = self._gathering.get(key)
        if gathering is not None:
            gathering.append((job, done))
            return await done
        group = self._gathering[key] = [(job, done)]
        try:
            async with self._slot(job.account):
                del self._gathering[key]  # from here on, new jobs gather anew
                results = await self._send(job.account, [j for j, _ in group], flags, create,
                                           False)
            for (_, future), result in zip(group, results, strict=True):
                future.set_result(result)
        finally:
            if self._gathering.get(key) is group:
                del self._gathering[key]
            for _, future in group:
                if not future.done():
                    future.set_result(Result(TEMPORARY, "the append was interrupted",
                                             connected=True))
        return await done

    def _slot(self, account: str) -> asyncio.Semaphore:
        return self._slots.setdefault(
            account, asyncio.Semaphore(self.accounts[account].connections))

    async def _send(self, account: str, jobs: list[AppendJob], flags: tuple[str, ...],
                    create: bool, look_first: bool) -> list[Result]:
        """Append ``jobs`` on one connection (the caller holds a slot of the account)."""
        results: list[Result] = []
        for _ in range(2):  # a second time only on a fresh connection
            try:
                conn, reused = await self._connection(account)
            except ImapError as exc:
                return results + [Result(TEMPORARY, str(exc), connected=False)] * (
                    len(jobs) - len(results))
            try:
                while len(results) < len(jobs):
                    rest = jobs[len(results):]
                    if look_first:
                        results.append(await self._attempt(conn, rest[0], flags, create, True))
                    else:
                        results += await self._append_group(conn, rest[:conn.batch_limit],
                                                            flags, create)
                return results
            except ImapError as exc:
                if exc.broken and reused:
                    look_first = True  # the lost connection may have carried the APPEND
                    continue
                permanent = exc.code in ("TOOBIG",) and not exc.broken
                # connected: the message may have reached the server (the connection broke
                # after the APPEND went out); a NO or BAD appended nothing
                failed = Result(PERMANENT if permanent else TEMPORARY, str(exc),
                                connected=exc.broken)
                return results + [failed] * (len(jobs) - len(results))
            finally:
                if conn.broken:
                    await conn.close()
                else:
                    self._release(account, conn)
        return results + [Result(TEMPORARY, f"{account}: the connection failed twice",
                                 connected=True)] * (len(jobs) - len(results))

    async def _append_group(self, conn: ImapConnection, jobs: list[AppendJob],
                            flags: tuple[str, ...], create: bool) -> list[Result]:
        """Append ``jobs`` in one command; all or none are appended (RFC 3502)."""
        folder = jobs[0].folder
        datas = [j.data for j in jobs]
        try:
            uids = await conn.append_many(folder, datas, flags)
        except ImapError as exc:
            if not exc.broken and exc.code == "TRYCREATE" and create:
                await conn.create(folder)
                log.info("%s: created folder %r for kept originals", jobs[0].account, folder)
                uids = await conn.append_many(folder, datas, flags)
            elif not exc.broken and len(jobs) > 1:  # which one was refused: each alone
                return [await self._alone(conn, j, flags, create) for j in jobs]
            else:
                raise
        return [Result(SENT, f"appended to {folder!r}"
                             + (f" as UID {uid}" if uid is not None else "")) for uid in uids]

    async def _alone(self, conn: ImapConnection, job: AppendJob, flags: tuple[str, ...],
                     create: bool) -> Result:
        try:
            return await self._attempt(conn, job, flags, create, False)
        except ImapError as exc:
            if exc.broken:
                raise
            return Result(PERMANENT if exc.code == "TOOBIG" else TEMPORARY, str(exc),
                          connected=False)

    async def _attempt(self, conn: ImapConnection, job: AppendJob, flags: tuple[str, ...],
                       create: bool, look_first: bool) -> Result:
        if look_first:
            uid = await self.find(conn, job.folder, job.data, job.message_id)
            if uid is not None:
                return Result(SENT, f"already in {job.folder!r} as UID {uid}; "
                                    "not appended again")
        return (await self._append_group(conn, [job], flags, create))[0]

    async def find(self, conn: ImapConnection, folder: str, data: bytes,
                   message_id: str | None) -> int | None:
        """The UID of a message in ``folder`` with exactly these bytes, if there is one."""
        try:
            await conn.select(folder, readonly=True)
        except ImapError as exc:
            if exc.broken:
                raise
            return None  # no such folder (yet): nothing appended there
        size = [f"LARGER {len(data) - 1}", f"SMALLER {len(data) + 1}"]
        criteria = size
        if message_id and _SEARCHABLE.match(message_id):
            criteria = ["HEADER", "Message-ID", quoted(message_id), *size]
        uids = sorted(await conn.uid_search(*criteria))[-MAX_CANDIDATES:]
        if not uids:
            return None
        digest = hashlib.sha256(data).digest()
        for fetched in await conn.fetch(uids, "(UID BODY.PEEK[])"):
            body = fetched.part("BODY[]")
            if body is not None and hashlib.sha256(body).digest() == digest:
                return fetched.uid
        return None
