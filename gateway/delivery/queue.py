"""The delivery worker: claims due deliveries, sends them, records each attempt.

Each planned copy or route is a row in ``deliveries``.  The worker claims due
rows with a lease (SKIP LOCKED on PostgreSQL, so several instances share the
queue), composes the bytes, sends, and records the result: sent; failed for a
5xx or once ``delivery.max_age`` has passed; otherwise pending again with an
exponential backoff.  A row whose destination cannot be resolved (no relay
configured, a destination removed from the configuration) is held with the
reason, visible in ``queue list``, until an operator retries it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta

from gateway.config import GatewayConfig, parse_hostport
from gateway.delivery import dsn
from gateway.delivery.compose import compose
from gateway.delivery.smtp import PERMANENT, SENT, Result, Target, send
from gateway.metrics import Metrics
from gateway.store.models import FAILED, HELD, PENDING
from gateway.store.models import SENT as SENT_STATUS
from gateway.store.repository import DeliveryJob, Store, utcnow

log = logging.getLogger(__name__)


def backoff(attempts: int, base: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failure: base, 2*base, 4*base, ... max."""
    return float(min(base * (2 ** max(attempts - 1, 0)), maximum))


class DeliveryWorker:
    def __init__(self, store: Store, config: GatewayConfig, metrics: Metrics,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.config = config
        self.settings = config.delivery
        self.metrics = metrics
        self.clock = clock
        self.host = socket.gethostname()[:40]
        self.owner = f"{self.host}:{os.getpid()}"
        self.wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery")

    async def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._task is not None:
            await self._task

    def target_for(self, job: DeliveryJob) -> Target | str:
        """Where a delivery goes, or why it cannot go anywhere yet."""
        if job.destination is not None:
            dest = self.config.destinations.get(job.destination)
            if dest is None:
                return f"destination {job.destination!r} is not configured"
            return Target(dest.host, dest.port, dest.tls)
        if self.settings.relay is None:
            return "no relay configured (delivery.relay) for copies to other domains"
        host, port = parse_hostport(self.settings.relay)
        return Target(host, port, self.settings.relay_tls)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                jobs = await asyncio.to_thread(
                    self.store.claim_deliveries, self.owner, self.settings.concurrency * 2,
                    self.settings.lease_time,
                )
            except Exception:  # loop boundary: the database may be away; try again later
                log.exception("delivery: claiming work failed")
                jobs = []
            if jobs:
                await asyncio.gather(*(self._guarded(job) for job in jobs))
                continue
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.settings.poll_interval)
            except TimeoutError:
                pass

    async def _guarded(self, job: DeliveryJob) -> None:
        async with self._slots:
            try:
                await self.deliver(job)
            except Exception:  # the one catch-all per delivery: its lease will expire
                log.exception("delivery %d of %s failed unexpectedly", job.id, job.message_id)

    async def deliver(self, job: DeliveryJob) -> str:
        target = self.target_for(job)
        if isinstance(target, str):
            await asyncio.to_thread(self.store.delivery_result, job.id, self.owner, HELD,
                                    error=target)
            self.metrics.deliveries.labels(job.kind, "held").inc()
            log.warning("delivery %d of %s held: %s", job.id, job.message_id, target)
            return HELD
        content = await asyncio.to_thread(self.store.delivery_content, job.message_id)
        if content is None:
            await asyncio.to_thread(self.store.delivery_result, job.id, self.owner, FAILED,
                                    error="the stored message is gone")
            return FAILED
        data = compose(content[0], content[1], kind=job.kind, recipient=job.recipient)
        result = await send(target, helo=self.config.smtp.hostname, sender=job.mail_from,
                            recipient=job.recipient, data=data,
                            reply_timeout=self.settings.timeout)
        status, retry_at = self._next(job, result)
        bounce = None
        if status == FAILED and dsn.wants_dsn(kind=job.kind, direction=job.direction,
                                              mail_from=job.mail_from):
            now = self.clock()
            bounce = dsn.build(
                hostname=self.config.smtp.hostname, tenant_id=job.tenant_id,
                sender=job.mail_from, recipient=job.recipient, diagnostic=result.detail,
                expired=result.outcome != PERMANENT, original_id=job.message_id,
                original=content[1], arrival=job.created_at, now=now,
            )
        await asyncio.to_thread(self.store.delivery_result, job.id, self.owner, status,
                                error=None if status == SENT_STATUS else result.detail,
                                retry_at=retry_at, bounce=bounce)
        if bounce is not None:
            log.info("delivery %d of %s failed: DSN %s for the sender", job.id,
                     job.message_id, bounce.id)
        self.metrics.deliveries.labels(job.kind, status if status != PENDING else "deferred").inc()
        log.info("delivery %d of %s to %s:%d: %s (%s)", job.id, job.message_id, target.host,
                 target.port, status if status != PENDING else "deferred", result.detail)
        return status

    def _next(self, job: DeliveryJob, result: Result) -> tuple[str, datetime | None]:
        if result.outcome == SENT:
            return SENT_STATUS, None
        if result.outcome == PERMANENT:
            return FAILED, None
        now = self.clock()
        if now - job.created_at >= timedelta(seconds=self.settings.max_age):
            return FAILED, None
        wait = backoff(job.attempts + 1, self.settings.retry_base, self.settings.retry_max)
        return PENDING, now + timedelta(seconds=wait)
