"""Deactivated tenants, seen by a running daemon: refuse their mail, delete what came.

`tenant deactivate` (on this or another instance) marks the tenant in the
database and purges it once.  Every daemon looks every few seconds: it tells
its listeners which tenants are off, so their mail is refused from then on, and
purges each newly deactivated tenant again for whatever it stored meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig
from gateway.errors import one_line
from gateway.privacy.erasure import purge_tenant
from gateway.store.privacy import PrivacyStore

log = logging.getLogger(__name__)

TENANTS_INTERVAL = 2.0  # seconds between looks for tenants deactivated meanwhile

Audit = Callable[[str, dict[str, Any], str | None], Awaitable[None]]


async def watch_deactivated(privacy: PrivacyStore, config: GatewayConfig, inactive: set[str],
                            publish: Callable[[frozenset[str]], None], audit: Audit) -> None:
    """Every few seconds: which tenants are deactivated (``inactive`` as read at the
    start, then from the database); ``publish`` hands the set to whoever refuses their
    mail, and whatever of theirs was stored meanwhile is deleted."""
    purged: set[str] = set()
    while True:
        publish(frozenset(inactive))
        try:
            for tid in sorted(inactive - purged):
                done = await asyncio.to_thread(purge_tenant, privacy, config, tid, "daemon")
                if done.shredded:  # made again by mail stored meanwhile
                    await audit("tenant.shred", {"data_key_destroyed": True}, tid)
                removed = done.removed
                if removed.messages or removed.deliveries:
                    log.info("tenant %s is deactivated: deleted %d messages and %d "
                             "deliveries stored meanwhile", tid, removed.messages,
                             removed.deliveries)
                purged.add(tid)
            await asyncio.sleep(TENANTS_INTERVAL)
            inactive = await asyncio.to_thread(privacy.inactive_tenants)
        except SQLAlchemyError as exc:  # the database may be away; the stats watch says so
            log.debug("tenant states not read: %s", one_line(exc))
            await asyncio.sleep(TENANTS_INTERVAL)
