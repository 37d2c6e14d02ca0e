"""The pipeline worker: runs the post-acceptance stages on the messages it claims.

It claims stored messages (status=received) from the database, runs the
stages on each in the order gateway.pipeline.stages lists them (parse,
authenticate, classify, rules, plan), and saves the outcomes of a claim in
one transaction (the last stage).  The loop, the leases and the stop are
gateway.runner's.  Each message is processed under one policy set, taken when its
processing begins: a reload in the middle changes the next message, never
half of this one.  It keeps no
state of its own: after a crash, leases expire and the work is claimed again,
so every stage must be idempotent.  An unexpected error in one message
quarantines that message (kept for a human; only retention deletes it) and
the loop carries on.

Accepting comes first.  This loop runs in a process of its own
(gateway.processor), at a lower priority than the daemon's main process, where
the SMTP sessions are; on a machine whose cores are all busy, every message
processed here is still CPU and database time the sessions wait for.  While
sessions are committing and keep their loop busy (``acceptance``, as the main
process says), the next claim waits for a pause, but never past ``burst_delay``
after the backlog began: a burst is taken at the listener's own rate and
processed right after it; under load that goes on, the pipeline takes its share
again once the oldest work has waited that long, and if it still falls behind,
new mail comes at its pace (gateway.pipeline.flow).  Mail that comes at a pace
the sessions' loop keeps up with is processed as it comes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from gateway import logs
from gateway.auth.work import AuthCalls
from gateway.config import KeepOriginalConfig
from gateway.leases import LeaseKeeper, release_dead
from gateway.metrics import Metrics
from gateway.pipeline.flow import Acceptance
from gateway.pipeline.parse import ParserPool
from gateway.pipeline.stages import BATCHED, PER_MESSAGE, SAVE, Work
from gateway.policyset import PolicySet
from gateway.records import PipelineInput
from gateway.runner import BatchRunner
from gateway.store.repository import Store

log = logging.getLogger(__name__)

LINGER = 0.2  # seconds to wait after a partial batch
HELD_SLICE = 0.25  # seconds: a wait for a burst to end is counted in the metrics this often
CALLS_PER_PARSER = 3  # batches of messages in the worker processes at once, per parser
BATCH_MESSAGES = 25  # messages in one call to a worker process at most
BATCH_BYTES = 1 << 20  # and their originals' bytes (a larger message goes alone)


class PipelineWorker(BatchRunner[str, list[Work]]):
    """Claims batches of stored messages, runs ``STAGES`` on them and saves the
    outcomes; on stop, finishes the messages in hand and gives the rest of the
    claim back."""

    def __init__(
        self,
        store: Store,
        parser: ParserPool,
        *,
        batch_size: int,
        poll_interval: float,
        lease_time: float,
        burst_delay: float = 0.0,
        acceptance: Acceptance | None = None,
        policies: Callable[[], PolicySet] = PolicySet,
        deliveries_planned: Callable[[], None] | None = None,
        finished: Callable[[int], None] | None = None,
        metrics: Metrics | None = None,
        auth: AuthCalls | None = None,
        authserv_id: str = "localhost",
        srs: bool = False,
        keep_original: Mapping[str, KeepOriginalConfig] | None = None,
        request_address: str = "",
        unindexed: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.host = socket.gethostname()[:40]
        self.owner = f"{self.host}:{os.getpid()}"
        super().__init__("pipeline", log, LeaseKeeper(store, "messages", self.owner, lease_time),
                         poll_interval, batch_size)
        self.parser = parser
        self.policies = policies  # the policy set in force, read once per message
        self.deliveries_planned = deliveries_planned
        self.finished = finished  # told how many messages each saved batch finished
        self.lease_time = lease_time
        self.burst_delay = burst_delay  # the longest wait for acceptance to pause
        self.acceptance = acceptance or Acceptance()  # what the SMTP sessions are doing
        self.metrics = metrics
        self.auth = auth  # DKIM/SPF/ARC/DMARC of inbound mail; None: not checked
        self.authserv_id = authserv_id
        self.srs = srs  # recipients that are our SRS addresses get the message back
        self.keep_original = keep_original or {}  # by tenant: where originals are kept
        self.request_address = request_address  # mail to it is a data-subject request
        self.unindexed = unindexed  # tenants whose mail is not put in the search index
        self.backlog_since: float | None = None  # the oldest work in hand arrived since
        self._claimed = 0.0  # when the batch in hand was claimed

    # ------------------------------------------------------------ the runner's hooks
    async def begin(self) -> None:
        await release_dead(self.store, "messages", self.host, "pipeline")

    async def before_claim(self) -> None:
        await self._after_acceptance()

    async def claim(self, limit: int) -> list[str]:
        return await asyncio.to_thread(self.store.claim, self.owner, limit, self.lease_time)

    def key(self, item: str) -> str:
        return item

    def count_failure(self, step: str) -> None:
        self._failed(step)

    async def after(self, batch: list[str]) -> float | None:
        if len(batch) < self.batch_size:
            # That claim took all there was: what is left arrived since.  Under a
            # stream of mail, let a batch gather instead of waking for each commit:
            # fewer, larger transactions, and more CPU left for accepting.
            self.backlog_since = self._claimed
            if not self.stopping:
                await asyncio.sleep(LINGER)
        return None

    async def rest(self, seconds: float) -> bool:
        self.backlog_since = None
        woken = await super().rest(seconds)
        if woken:  # woken by a commit: its message is the oldest of the next work
            self.backlog_since = time.monotonic()
        return woken

    async def _after_acceptance(self) -> None:
        """Wait while the SMTP sessions accept a burst, up to ``burst_delay`` after the
        work in hand began to arrive."""
        acceptance = self.acceptance
        while not self.stopping and acceptance.bursting:
            pause = holdback(time.monotonic(), self.backlog_since, self.burst_delay)
            if pause <= 0:
                return
            started = time.monotonic()
            await acceptance.changed(min(pause, HELD_SLICE))
            if self.metrics is not None:
                self.metrics.pipeline_held_back.inc(time.monotonic() - started)

    # ------------------------------------------------------------ a claimed batch
    async def process(self, batch: list[str]) -> list[Work]:
        """Run the stages on a claimed batch; what stopping left undone is given back."""
        self._claimed = claimed = time.monotonic()
        if self.backlog_since is None:
            self.backlog_since = claimed
        ids = batch
        try:
            inputs = await asyncio.to_thread(self.store.pipeline_inputs, ids)
        except Exception:  # loop boundary: the claim is ours and is taken again next round
            log.exception("pipeline: reading %d claimed messages failed", len(ids))
            self._failed("read")
            return []
        # Messages go to the worker processes a few at a time, in one call for their
        # parses and one for their checks: a call per message cost this process more
        # than the message's own stages.  A few calls per parser are in flight, so that
        # one is parsed while the results of another are taken in here.
        slots = asyncio.Semaphore(self.parser.size * CALLS_PER_PARSER)
        chunks = await asyncio.gather(*(self._prepare_guarded(chunk, inputs, slots)
                                        for chunk in _chunks(ids, inputs)))
        prepared = [p for chunk in chunks for p in chunk]
        ready = [p for p in prepared if p is not None]
        skipped = [i for i, p in zip(ids, prepared, strict=True) if p is None and self.stopping]
        if skipped:
            await asyncio.to_thread(self.store.release, skipped, self.owner)
        return ready

    async def record(self, results: list[Work]) -> None:
        """Save the outcomes of a batch in one transaction; log and count each."""
        ready = results
        if not ready:
            return
        try:
            saved = await SAVE.save(self, ready)
        except Exception:  # loop boundary: the database may be away; leases will expire
            log.exception("pipeline: saving %d results failed; they will be redone", len(ready))
            self._failed("save")
            return
        if self.finished is not None:
            self.finished(sum(saved))
        planned = False
        for p, ok in zip(ready, saved, strict=True):
            item, parsed, outcome = p.item, p.parsed, p.outcome
            if not ok:
                log.warning("%s: lease lost before the result was saved; left to its new owner",
                            item.id)
                continue
            planned = planned or bool(outcome.deliveries)
            result = "unparseable" if parsed.parse_failed else "processed"
            logs.event(log, "processed", queue_id=item.id, tenant=item.tenant_id,
                       msgid=logs.msgid_hash(parsed.message_id),
                       result=result, rules=",".join(p.rules) or "-",
                       tags=",".join(outcome.tags) or "-",
                       deliveries=len(outcome.deliveries), policy=outcome.policy_version,
                       subject=parsed.subject)
            if self.metrics is not None:
                self.metrics.pipeline_outcome(item.tenant_id, result, p.rules)
        if planned and self.deliveries_planned is not None:
            self.deliveries_planned()

    async def _prepare_guarded(self, ids: list[str], inputs: Mapping[str, PipelineInput],
                               slots: asyncio.Semaphore) -> list[Work | None]:
        """Every stage on a few claimed messages; None for those not done (quarantined,
        or left for later because the pipeline is stopping)."""
        async with slots:
            if self.stopping:
                return [None] * len(ids)
            policy = self.policies()
            works = {i: Work(inputs[i], policy) for i in ids if i in inputs}
            together = True
            try:
                await self._examine(list(works.values()))
            except Exception as exc:  # a batch that failed as a whole
                if len(works) > 1:
                    log.exception("pipeline: %d messages failed together; taking them one "
                                  "by one", len(works))
                    together = False
                else:
                    for work in works.values():
                        work.error = exc
        if not together:
            return [p for i in ids for p in await self._prepare_guarded([i], inputs, slots)]
        return [await self._guarded(i, works.get(i)) for i in ids]

    async def _guarded(self, message_id: str, work: Work | None) -> Work | None:
        try:
            if work is None:
                raise LookupError("message or its raw original missing")
            if work.error is not None:
                raise work.error
            for stage in PER_MESSAGE:
                stage.run(self, work)
            return work
        except Exception as exc:  # the one catch-all per message
            item = work.item if work is not None else None
            logs.event(log, "quarantined", logging.ERROR, exc_info=True,
                       queue_id=message_id, tenant=item.tenant_id if item else "-",
                       reason=exc.__class__.__name__)
            self._failed("prepare")
            try:
                await asyncio.to_thread(self.store.quarantine, message_id, self.owner,
                                        f"{exc.__class__.__name__}: {exc}")
            except Exception:
                log.exception("%s: could not record quarantine", message_id)
            if self.metrics is not None and item is not None:
                self.metrics.pipeline_outcome(item.tenant_id, "quarantined", [])
            return None

    async def _examine(self, works: list[Work]) -> None:
        """The batched stages on a few messages: the first here, the others beside it."""
        if not works:
            return
        first, *others = BATCHED
        beside = [asyncio.create_task(stage.run_many(self, chosen))
                  for stage in others if (chosen := stage.applies(self, works))]
        started = time.monotonic()
        try:
            await first.run_many(self, works)
        finally:
            for task in beside:
                await task
        wall = (time.monotonic() - started) / len(works)
        for stage in BATCHED:
            stage.observe_many(self, works, wall)

    # ------------------------------------------------------------ metrics
    def timed(self, stage: str, started: float) -> None:
        self.observe(stage, time.monotonic() - started)

    def observe(self, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.series(self.metrics.pipeline_stage, stage).observe(seconds)

    def _failed(self, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.series(self.metrics.pipeline_failures, stage).inc()


def holdback(now: float, backlog_since: float | None, burst_delay: float) -> float:
    """Seconds the next claim may still wait for a burst to end: until ``burst_delay``
    after ``backlog_since`` (None: work left from before, taken at once)."""
    if backlog_since is None:
        return 0.0
    return max(0.0, backlog_since + burst_delay - now)


def _chunks(ids: list[str], inputs: Mapping[str, PipelineInput]) -> list[list[str]]:
    """The claimed messages in batches for the worker processes, in claim order."""
    chunks: list[list[str]] = []
    size = BATCH_BYTES
    for message_id in ids:
        item = inputs.get(message_id)
        length = len(item.raw) if item is not None else 0
        if not chunks or len(chunks[-1]) >= BATCH_MESSAGES or size + length > BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(message_id)
        size += length
    return chunks


