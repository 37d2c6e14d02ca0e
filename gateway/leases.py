"""Keep the leases of work in hand alive for as long as this instance works on it.

Claimed rows (messages in the pipeline, deliveries) carry a lease: while it
runs, no other instance takes the row; once it has run out, any instance may.
An attempt has no fixed length (a delivery tries several MX hosts, each reply
with its own timeout), so a lease set once at the claim could run out while
the work still goes on and another instance would do it a second time.  A
``LeaseKeeper`` extends the leases of every row its owner still holds, in one
UPDATE every third of the lease time.  When the instance dies the renewals
stop, and the others take its work over once the lease time has passed; on
its own host, a process that starts takes back at once what dead processes of
that host held (``release_dead``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from gateway.store.repository import Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: Store, table: Literal["messages", "deliveries"], owner: str,
                 lease_time: float) -> None:
        self.store = store
        self.table = table
        self.owner = owner
        self.lease_time = lease_time
        self.held: set[str | int] = set()
        self._task: asyncio.Task[None] | None = None

    def hold(self, ids: Iterable[str | int]) -> None:
        """Rows just claimed: renew their leases until ``drop``."""
        self.held.update(ids)

    def drop(self, ids: Iterable[str | int]) -> None:
        """Rows whose result is saved or given back (or left to expire)."""
        self.held.difference_update(ids)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"leases-{self.table}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease_time / 3)
            if not self.held:
                continue
            ids = list(self.held)
            try:
                kept = await asyncio.to_thread(self.store.renew_leases, self.table, self.owner,
                                               ids, self.lease_time)
            except Exception:  # loop boundary: the database may be away; next round
                log.exception("%s: renewing %d leases failed", self.table, len(ids))
                continue
            if kept < len(ids):
                # finished meanwhile (fine), or expired and taken by another instance
                log.debug("%s: %d of %d leases renewed", self.table, kept, len(ids))


async def release_dead(store: Store, table: Literal["messages", "deliveries"], host: str,
                       what: str) -> None:
    """Free the leases that processes of this host which no longer run still hold:
    the work of a process killed with -9 is taken up at once, not after the lease."""
    try:
        freed = await asyncio.to_thread(store.release_dead_leases, table, host, alive)
    except Exception:  # loop boundary: the claim loop retries the database anyway
        log.exception("%s: could not release leases of dead processes", what)
    else:
        if freed:
            log.info("%s: took back %d pieces of work claimed by a process that died",
                     what, freed)


def alive(pid: int) -> bool:
    """Whether a process of this host runs under ``pid``.  A zombie does not: a
    process killed with its parent stays one until init reaps it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (or it went meanwhile): the signal said it runs
        return True
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])
