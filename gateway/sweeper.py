"""The retention sweeper: deletes what the retention policy says has expired.

One sweep asks the store for its (tenant, tags) groups, asks the policy how
long each group is kept, and deletes the messages received before that, in
transactions of at most ``batch_size`` messages, resting after each as long
as it took, so that acceptance (which needs the same write lock on SQLite)
keeps its turn.

Never deleted: messages under an active legal hold, and messages carrying a
tag the policy does not define (a removed tag must not shorten anything;
the sweep reports them instead).  Each sweep that deletes anything records
one audit event per tenant with the counts per tag set.  ``dry_run`` counts
instead of deleting: that is ``retention sweep --dry-run`` and, with a policy
read from elsewhere, ``retention preview``.  In the daemon, ``SweepLoop`` runs
one sweep every ``retention.sweep_interval``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from gateway import logs
from gateway.clock import utcnow
from gateway.metrics import Metrics
from gateway.policy.retention import RetentionPolicy
from gateway.policyset import PolicyHolder, retention_in_force
from gateway.records import RetentionGroup
from gateway.runner import Runner
from gateway.store.repository import Store

log = logging.getLogger(__name__)

LOCK_NAME = "mailflowr-retention-sweep"


@dataclass(frozen=True, slots=True)
class GroupResult:
    tenant: str
    tags: tuple[str, ...]
    rule: str
    cutoff: datetime | None  # None: nothing in the group may be deleted
    expired: int  # deleted, or (dry run) to be deleted
    held: int  # expired but kept by a legal hold
    note: str = ""


@dataclass
class SweepReport:
    dry_run: bool
    started: datetime
    groups: list[GroupResult] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""  # why nothing ran (another instance is sweeping)

    @property
    def expired(self) -> int:
        return sum(g.expired for g in self.groups)

    @property
    def held(self) -> int:
        return sum(g.held for g in self.groups)

    def per_tenant(self) -> dict[str, dict[str, int]]:
        """tenant -> {tags ('(untagged)' for none): count}, only where something expired."""
        out: dict[str, dict[str, int]] = {}
        for g in self.groups:
            if g.expired:
                name = ",".join(g.tags) or "(untagged)"
                counts = out.setdefault(g.tenant, {})
                counts[name] = counts.get(name, 0) + g.expired
        return out


class Sweeper:
    def __init__(self, store: Store, *, batch_size: int = 200, pause: float = 0.02,
                 clock: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.batch_size = batch_size
        self.pause = pause
        self.clock = clock or utcnow
        self.sleep = sleep
        self.stopping = False  # set from another thread to end a sweep between batches
        self.progress: Callable[[int], None] | None = None  # told the deletions so far
        self._deleted = 0

    def sweep(self, policy: RetentionPolicy, *, dry_run: bool = False,
              actor: str = "retention-sweeper") -> SweepReport:
        now = self.clock()
        policy = retention_in_force(policy, self.store)  # with the tenants' own holds
        report = SweepReport(dry_run=dry_run, started=now)
        began = time.monotonic()
        self._deleted = 0
        with self.store.exclusive(LOCK_NAME) as ours:
            if not ours:
                report.skipped = "another instance is sweeping"
                return report
            for group in self.store.retention_groups():
                if self.stopping:
                    break
                report.groups.append(self._group(policy, group, now, dry_run))
        report.seconds = time.monotonic() - began
        if not dry_run:
            for tenant, counts in report.per_tenant().items():
                self.store.audit(actor, "retention.sweep", tenant_id=tenant,
                                 detail={"deleted": sum(counts.values()), "per_tags": counts})
        return report

    def _group(self, policy: RetentionPolicy, group: RetentionGroup, now: datetime,
               dry_run: bool) -> GroupResult:
        tenant, tags = group.tenant_id, group.tags
        unknown = policy.unknown_tags(tags)
        decision = policy.decide(tenant, tags)
        if unknown:
            return GroupResult(tenant, tags, decision.rule, None, 0, 0,
                               f"kept: tag {', '.join(unknown)} is not in the policy")
        cutoff = decision.keep.before(now)
        if group.oldest >= cutoff:
            return GroupResult(tenant, tags, decision.rule, cutoff, 0, 0)
        holds = [h for h in policy.active_holds(now) if h.covers(tenant, tags)]
        whole = next((h for h in holds if h.address is None), None)
        if whole is not None:
            held = self.store.count_expired(tenant, group.tag_key, cutoff)
            return GroupResult(tenant, tags, decision.rule, cutoff, 0, held,
                               f"held: {whole.name}")
        addresses = sorted({h.address for h in holds if h.address})
        held = 0
        if addresses:
            held = (self.store.count_expired(tenant, group.tag_key, cutoff)
                    - self.store.count_expired(tenant, group.tag_key, cutoff, addresses))
        if dry_run:
            expired = self.store.count_expired(tenant, group.tag_key, cutoff, addresses)
            return GroupResult(tenant, tags, decision.rule, cutoff, expired, held)
        deleted = 0
        while not self.stopping:
            began = time.monotonic()
            gone = self.store.delete_expired(tenant, group.tag_key, cutoff, addresses,
                                             self.batch_size)
            for queue_id, message_id in gone:
                logs.event(log, "deleted", queue_id=queue_id, tenant=tenant,
                           msgid=logs.msgid_hash(message_id), reason="retention",
                           rule=decision.rule)
            n = len(gone)
            deleted += n
            self._deleted += n
            if self.progress is not None:
                self.progress(self._deleted)
            if n < self.batch_size:
                break
            # Rest as long as the batch took (at least `pause`): the sweep then holds
            # the database (SQLite's write lock, PostgreSQL's CPU) at most half the
            # time, and accepting mail keeps the other half.
            self.sleep(max(self.pause, time.monotonic() - began))
        if deleted:
            log.info("retention: deleted %d messages of tenant %s tagged %s (%s)", deleted,
                     tenant, ",".join(tags) or "-", decision.rule)
        return GroupResult(tenant, tags, decision.rule, cutoff, deleted, held)


class SweepLoop(Runner):
    """One sweep every ``interval`` seconds, each under the policy in force at its
    start, until stopped; a failed sweep waits for the next interval.  Its own runner
    of the one skeleton (``gateway.runner``): no rows to claim, no leases; the pass is
    exclusive across instances through ``Store.exclusive`` inside ``Sweeper.sweep``."""

    def __init__(self, sweeper: Sweeper, interval: float, policies: PolicyHolder,
                 metrics: Metrics) -> None:
        super().__init__("retention", log)
        self.sweeper = sweeper
        self.interval = interval
        self.policies = policies
        self.metrics = metrics
        self.last_sweep: float | None = None  # time.time() of the last sweep that ran

    async def stop(self) -> None:
        self.sweeper.stopping = True  # ends the sweep between two batches
        await super().stop()

    async def begin(self) -> None:
        await self.rest(self.interval)  # the first sweep one interval after the start

    async def turn(self) -> float:
        sweeper, metrics = self.sweeper, self.metrics
        policy = self.policies.current  # one version for the whole sweep
        log.info("retention sweep started (policy %s)", policy.version)
        report = await asyncio.to_thread(sweeper.sweep, policy.retention)
        if report.skipped:
            metrics.retention_sweeps.labels("skipped").inc()
            log.info("retention sweep skipped: %s", report.skipped)
        else:
            metrics.retention_sweeps.labels("success").inc()
            for tenant, counts in report.per_tenant().items():
                metrics.retention_deleted.labels(
                    metrics.tenant(tenant)).inc(sum(counts.values()))
            metrics.retention_held.set(report.held)
            self.last_sweep = time.time()
            metrics.retention_last_sweep.set(self.last_sweep)
            log.info("retention sweep (policy %s): deleted %d messages, %d kept by holds, "
                     "in %.1f s", policy.version, report.expired, report.held,
                     report.seconds)
        return self.interval

    async def failed(self, exc: Exception) -> float:
        # the database may be away: the next interval tries again
        self.metrics.retention_sweeps.labels("failure").inc()
        log.exception("retention sweep failed")
        return self.interval
