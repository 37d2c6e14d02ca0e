"""The pipeline worker: the one place that knows the order of post-acceptance stages.

It claims stored messages (status=received) from the database, runs the
stages on each (parse and classify, tags from the retention policy, workflow
rules; authentication plugs in here), and records the outcome in one
transaction.  Each message is processed under one policy set, taken when its
processing begins: a reload in the middle changes the next message, never
half of this one.  It keeps no
state of its own: after a crash, leases expire and the work is claimed again,
so every stage must be idempotent.  An unexpected error in one message
quarantines that message (kept for a human; only retention deletes it) and
the loop carries on.

Accepting comes first.  The daemon's one process accepts mail and runs this
loop, so during a burst every message processed here is CPU the SMTP sessions
wait for.  While sessions are committing, the next claim waits for a pause,
but never past ``burst_delay`` after the backlog began: a burst is taken at
the listener's own rate and processed right after it; under load that goes on,
the pipeline takes its share again once the oldest work has waited that long,
and if it still falls behind, new mail comes at its pace (``flow``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import logs, srs
from gateway.auth.inbound import AuthResults
from gateway.auth.work import AuthCalls
from gateway.config import KeepOriginalConfig
from gateway.leases import LeaseKeeper
from gateway.metrics import Metrics
from gateway.pipeline.flow import InFlow
from gateway.pipeline.parse import ParserPool, to_fields
from gateway.policyset import PolicySet
from gateway.records import Outcome, ParsedFields, PipelineInput
from gateway.store.repository import Store
from gateway.workers import WorkerError
from gateway.workflow import actions
from gateway.workflow.rules import MessageView, evaluate

log = logging.getLogger(__name__)

LINGER = 0.2  # seconds to wait after a partial batch
CALLS_PER_PARSER = 2  # batches of messages in the worker processes at once, per parser
BATCH_MESSAGES = 10  # messages in one call to a worker process at most
BATCH_BYTES = 1 << 20  # and their originals' bytes (a larger message goes alone)
BUSY = 0.05  # seconds: a commit of new mail this recent means sessions are still sending
GRACE = 1.0  # seconds past burst_delay before the pipeline counts as behind


# A message's parse and, for inbound mail, the results or the error of its checks.
Examined = tuple[dict[str, Any], AuthResults | Exception | None]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message the stages have run on, waiting to be saved."""

    id: str
    tenant_id: str
    parsed: ParsedFields
    outcome: Outcome
    rules: list[str]


class PipelineWorker:
    def __init__(
        self,
        store: Store,
        parser: ParserPool,
        *,
        batch_size: int,
        poll_interval: float,
        lease_time: float,
        burst_delay: float = 0.0,
        in_flow_delay: float = 0.0,
        policies: Callable[[], PolicySet] = PolicySet,
        deliveries_planned: asyncio.Event | None = None,
        metrics: Metrics | None = None,
        auth: AuthCalls | None = None,
        authserv_id: str = "localhost",
        srs: bool = False,
        keep_original: Mapping[str, KeepOriginalConfig] | None = None,
    ) -> None:
        self.store = store
        self.parser = parser
        self.policies = policies  # the policy set in force, read once per message
        self.deliveries_planned = deliveries_planned
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease_time = lease_time
        self.burst_delay = burst_delay  # the longest wait for acceptance to pause
        self.host = socket.gethostname()[:40]
        self.owner = f"{self.host}:{os.getpid()}"
        self.leases = LeaseKeeper(store, "messages", self.owner, lease_time)
        self.wakeup = asyncio.Event()
        self.metrics = metrics
        self.auth = auth  # DKIM/SPF/ARC/DMARC of inbound mail; None: not checked
        self.authserv_id = authserv_id
        self.srs = srs  # recipients that are our SRS addresses get the message back
        self.keep_original = keep_original or {}  # by tenant: where originals are kept
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._backlog_since: float | None = None  # the oldest work in hand arrived since
        self.flow = InFlow(in_flow_delay, self.behind, metrics)  # for the SMTP sessions

    def start(self) -> None:
        self.store.notify_on_commit(self.wakeup)
        self._task = asyncio.create_task(self._run(), name="pipeline")
        self.leases.start()

    async def stop(self) -> None:
        """Finish the message in hand, give the rest of the claim back, and stop."""
        self._stopping = True
        self.wakeup.set()
        if self._task is not None:
            await self._task
        await self.leases.stop()

    async def _run(self) -> None:
        try:
            freed = await asyncio.to_thread(self.store.release_dead_leases, self.host, _pid_alive)
        except Exception:  # loop boundary: the claim loop below retries the database anyway
            log.exception("pipeline: could not release leases of dead processes")
        else:
            if freed:
                log.info("pipeline: took back %d messages claimed by a process that died", freed)
        while not self._stopping:
            await self._after_acceptance()
            try:
                ids = await asyncio.to_thread(
                    self.store.claim, self.owner, self.batch_size, self.lease_time
                )
            except Exception:  # loop boundary: the database may be away; try again later
                log.exception("pipeline: claiming work failed")
                self._failed("claim")
                ids = []
            if ids:
                claimed = time.monotonic()
                if self._backlog_since is None:
                    self._backlog_since = claimed
                self.leases.hold(ids)
                try:
                    await self._process_claim(ids)
                finally:
                    self.leases.drop(ids)
                if len(ids) < self.batch_size:
                    # That claim took all there was: what is left arrived since.  Under a
                    # stream of mail, let a batch gather instead of waking for each commit:
                    # fewer, larger transactions, and more CPU left for accepting.
                    self._backlog_since = claimed
                    if not self._stopping:
                        await asyncio.sleep(LINGER)
                continue
            self._backlog_since = None
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.poll_interval)
            except TimeoutError:
                pass
            else:  # woken by a commit: its message is the oldest of the next work
                self._backlog_since = time.monotonic()

    def behind(self) -> bool:
        """True while the oldest work in hand has waited past ``burst_delay`` (and a
        second's grace): mail arrives faster than the pipeline processes it."""
        since = self._backlog_since
        return since is not None and time.monotonic() - since > self.burst_delay + GRACE

    async def _after_acceptance(self) -> None:
        """Wait while SMTP sessions are committing mail, up to ``burst_delay`` after
        the work in hand began to arrive."""
        while not self._stopping:
            pause = holdback(time.monotonic(), self.store.last_commit, self._backlog_since,
                             self.burst_delay)
            if pause <= 0:
                return
            await asyncio.sleep(pause)
            if self.metrics is not None:
                self.metrics.pipeline_held_back.inc(pause)

    async def _process_claim(self, ids: list[str]) -> None:
        """Run the stages on a claimed batch; save all outcomes in one transaction."""
        try:
            inputs = await asyncio.to_thread(self.store.pipeline_inputs, ids)
        except Exception:  # loop boundary: the claim is ours and is taken again next round
            log.exception("pipeline: reading %d claimed messages failed", len(ids))
            self._failed("read")
            return
        # Messages go to the worker processes a few at a time, in one call for their
        # parses and one for their checks: a call per message cost this process more
        # than the message's own stages.  A few calls per parser are in flight, so that
        # one is parsed while the results of another are taken in here.
        slots = asyncio.Semaphore(self.parser.size * CALLS_PER_PARSER)
        chunks = await asyncio.gather(*(self._prepare_guarded(chunk, inputs, slots)
                                        for chunk in _chunks(ids, inputs)))
        prepared = [p for chunk in chunks for p in chunk]
        ready = [p for p in prepared if p is not None]
        skipped = [i for i, p in zip(ids, prepared, strict=True) if p is None and self._stopping]
        if skipped:
            await asyncio.to_thread(self.store.release, skipped, self.owner)
        if not ready:
            return
        started = time.monotonic()
        try:
            saved = await asyncio.to_thread(
                self.store.finish_many, self.owner, [(p.id, p.parsed, p.outcome) for p in ready]
            )
        except Exception:  # loop boundary: the database may be away; leases will expire
            log.exception("pipeline: saving %d results failed; they will be redone", len(ready))
            self._failed("save")
            return
        self._timed("save", started)
        self.flow.finished(sum(saved))
        planned = False
        for p, ok in zip(ready, saved, strict=True):
            if not ok:
                log.warning("%s: lease lost before the result was saved; left to its new owner",
                            p.id)
                continue
            planned = planned or bool(p.outcome.deliveries)
            outcome = "unparseable" if p.parsed.parse_failed else "processed"
            logs.event(log, "processed", queue_id=p.id, tenant=p.tenant_id,
                       msgid=logs.msgid_hash(p.parsed.message_id),
                       result=outcome, rules=",".join(p.rules) or "-",
                       tags=",".join(p.outcome.tags) or "-",
                       deliveries=len(p.outcome.deliveries), policy=p.outcome.policy_version,
                       subject=p.parsed.subject)
            if self.metrics is not None:
                self.metrics.pipeline_outcome(p.tenant_id, outcome, p.rules)
        if planned and self.deliveries_planned is not None:
            self.deliveries_planned.set()

    async def _prepare_guarded(self, ids: list[str], inputs: Mapping[str, PipelineInput],
                               slots: asyncio.Semaphore) -> list[Prepared | None]:
        """Every stage on a few claimed messages; None for those not done (quarantined,
        or left for later because the pipeline is stopping)."""
        async with slots:
            if self._stopping:
                return [None] * len(ids)
            policy = self.policies()
            items = [inputs[i] for i in ids if i in inputs]
            examined: dict[str, Examined | Exception] = {}
            try:
                examined.update(zip([i.id for i in items], await self._examine(items, policy),
                                    strict=True))
            except Exception as exc:  # a batch that failed as a whole
                if len(items) > 1:
                    log.exception("pipeline: %d messages failed together; taking them one "
                                  "by one", len(items))
                    examined.clear()
                else:
                    examined.update((i.id, exc) for i in items)
        if items and not examined:
            return [p for i in ids for p in await self._prepare_guarded([i], inputs, slots)]
        return [await self._guarded(i, inputs.get(i), policy, examined.get(i)) for i in ids]

    async def _guarded(self, message_id: str, item: PipelineInput | None, policy: PolicySet,
                       examined: Examined | Exception | None) -> Prepared | None:
        try:
            if item is None or examined is None:
                raise LookupError("message or its raw original missing")
            if isinstance(examined, Exception):
                raise examined
            result, auth = examined
            if isinstance(auth, Exception):
                raise auth
            return self._stages(item, policy, result, auth)
        except Exception as exc:  # the one catch-all per message
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

    async def _examine(self, items: list[PipelineInput], policy: PolicySet
                       ) -> list[Examined]:
        """The parse of each message and, for inbound mail, its checks (an error of
        its checks in place of their results)."""
        if not items:
            return []
        retention = policy.retention
        inbound = [i for i in items if i.direction == "inbound"] if self.auth else []
        verifying = asyncio.create_task(self._verify(inbound)) if inbound else None
        started = time.monotonic()
        try:
            results = await self.parser.parse_many(
                [(i.raw, retention.classifier_for(i.tenant_id)) for i in items])
        finally:
            checked = await verifying if verifying is not None else {}
        wall = (time.monotonic() - started) / len(items)
        for result in results:
            self._observe("parse", result.get("seconds", wall))
        return [(result, checked.get(item.id)) for item, result in zip(items, results,
                                                                        strict=True)]

    def _stages(self, item: PipelineInput, policy: PolicySet, result: dict[str, Any],
                auth: AuthResults | None) -> Prepared:
        """The stages after the parse and the checks, on one message."""
        retention = policy.retention
        parsed = to_fields(result)
        if parsed.parse_failed:
            log.warning("%s: stored unparseable (%s)", item.id, "; ".join(parsed.defects))
        # Classification and the tenant's default tags come before the rules,
        # so that rules can match on them (e.g. tagged: [sensitive]).
        tags = tuple(dict.fromkeys(
            (*item.tags, *retention.tags_for(item.tenant_id, result["findings"]))))
        view = MessageView(
            direction=item.direction, sender=item.mail_from, recipients=item.recipients,
            headers=tuple(tuple(h) for h in result["headers"]),
            attachments=tuple((a["filename"] or "", a["content_type"] or "")
                              for a in parsed.attachments),
            size=item.size, tags=frozenset(tags),
            auth=auth.for_rules() if auth is not None else (),
        )
        started = time.monotonic()
        plan = evaluate(policy.workflows.for_tenant(item.tenant_id), view)
        returns = _returns(item) if self.srs else ()
        # Mail imported from the tenant's own mailbox is already kept there.
        keep = None if item.protocol == "IMAP" else self.keep_original.get(item.tenant_id)
        outcome = actions.outcome(plan, item.recipients, tags, item.direction, returns, keep)
        outcome = dataclasses.replace(outcome, policy_version=policy.version)
        if auth is not None:
            outcome = dataclasses.replace(outcome, auth_results=auth.as_dict(),
                                          auth_header=auth.header(self.authserv_id))
        self._timed("rules", started)
        return Prepared(item.id, item.tenant_id, parsed, outcome,
                        [name for name, _ in plan.matched])

    async def _verify(self, items: list[PipelineInput]
                      ) -> dict[str, AuthResults | Exception]:
        """Authentication results of inbound messages (DNS and CPU: in a worker process);
        for a message whose checks raised there, the error."""
        assert self.auth is not None
        out: dict[str, AuthResults | Exception] = {}
        checked = await self.auth.check_many(
            [(i.raw, i.mail_from, i.helo, i.client_address) for i in items])
        for item, (results, seconds) in zip(items, checked, strict=True):
            if isinstance(results, str):
                out[item.id] = WorkerError(f"checks failed: {results}")
                continue
            self._observe("auth", seconds)
            if self.metrics is not None:
                self.metrics.auth_results((r.result for r in results.dkim), results.for_rules())
            out[item.id] = results
        return out

    def _timed(self, stage: str, started: float) -> None:
        self._observe(stage, time.monotonic() - started)

    def _observe(self, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.series(self.metrics.pipeline_stage, stage).observe(seconds)

    def _failed(self, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.series(self.metrics.pipeline_failures, stage).inc()


def holdback(now: float, last_commit: float, backlog_since: float | None,
             burst_delay: float) -> float:
    """Seconds to wait before the next claim: until acceptance has paused for ``BUSY``,
    but not past ``burst_delay`` after ``backlog_since`` (None: work left from before,
    taken at once)."""
    if backlog_since is None:
        return 0.0
    quiet_at = last_commit + BUSY
    deadline = backlog_since + burst_delay
    return max(0.0, min(quiet_at, deadline) - now)


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


def _returns(item: PipelineInput) -> tuple[str, ...]:
    """Where a bounce to our SRS addresses goes back to (the listener checked them)."""
    if item.direction != "inbound":
        return ()
    out = []
    for r in item.recipients:
        if srs.is_srs(r):
            try:
                out.append(srs.decode(r))
            except srs.SRSError:
                log.warning("%s: recipient %s is not an SRS address we can decode", item.id,
                            logs.mask(r))
    return tuple(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
