"""The pipeline's stages, in the order they run on a message: the one list that says so.

parse → authenticate → classify → rules → plan → save (``STAGES``; Mailman's
chain of handlers is the model).  Each stage is a small object whose work lives
in its own module (the parser in gateway.pipeline.parse, the checks in
gateway.auth, the tags in gateway.policy, the rules and the plan in
gateway.workflow, the transaction in gateway.store); what it decides goes on
the message's ``Work`` for the stages after it.  A stage takes part in one or
more of three scopes:

- ``batch``: on a few messages at once, in the worker processes (a call per
  message cost the daemon more than the message's own stages).  The batched
  stages of a few messages run side by side; a message a batched stage failed
  for carries the error (``Work.error``) and is quarantined.
- ``message``: on one message, in the order of the list, after the batched stages.
- ``claim``: once for the whole claim (the save: one transaction).

The worker (gateway.pipeline.worker) runs the list; it knows no stage by name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway import logs, srs
from gateway.auth.inbound import AuthResults
from gateway.auth.work import AuthCalls
from gateway.config import KeepOriginalConfig
from gateway.metrics import Metrics
from gateway.pipeline.parse import ParserPool, to_fields
from gateway.policyset import PolicySet
from gateway.records import Outcome, ParsedFields, PipelineInput
from gateway.store.repository import Store
from gateway.tenancy import subaddress
from gateway.workers import WorkerError
from gateway.workflow import actions
from gateway.workflow.rules import MessageView, Plan, evaluate


class Context(Protocol):
    """What the stages take from the worker that runs them."""

    store: Store
    owner: str
    parser: ParserPool
    auth: AuthCalls | None  # DKIM/SPF/ARC/DMARC of inbound mail; None: not checked
    authserv_id: str
    srs: bool  # recipients that are our SRS addresses get the message back
    keep_original: Mapping[str, KeepOriginalConfig]  # by tenant: where originals are kept
    request_address: str  # privacy.request_address: data-subject requests by mail
    unindexed: frozenset[str]  # tenants whose mail stays out of the search index
    metrics: Metrics | None
    log: logging.Logger

    def observe(self, stage: str, seconds: float) -> None: ...

    def timed(self, stage: str, started: float) -> None: ...


@dataclass(slots=True, eq=False)
class Work:
    """One message on its way through the stages, under the policy set taken when
    its processing began; each stage fills in its part."""

    item: PipelineInput
    policy: PolicySet
    error: Exception | None = None  # a batched stage failed for this message
    auth: AuthResults | None = None  # inbound mail, when checked
    result: dict[str, Any] = field(init=False)  # the parse, as the parser returns it
    parsed: ParsedFields = field(init=False)
    tags: tuple[str, ...] = field(init=False)
    plan: Plan = field(init=False)
    rules_started: float = 0.0
    outcome: Outcome = field(init=False)
    rules: list[str] = field(init=False)  # the names of the rules that matched


class Stage:
    """A step of the flow; a subclass overrides the scopes it takes part in."""

    name = ""
    batch = False
    message = False
    claim = False

    def applies(self, ctx: Context, works: list[Work]) -> list[Work]:
        """Of a batch, the messages this stage works on."""
        return works

    async def run_many(self, ctx: Context, works: list[Work]) -> None:
        """``batch``: the stage on a few messages (none of its errors escapes per message)."""

    def observe_many(self, ctx: Context, works: list[Work], wall: float) -> None:
        """``batch``: after all batched stages of these messages; ``wall``: their time
        per message."""

    def run(self, ctx: Context, work: Work) -> None:
        """``message``: the stage on one message (raises: the message is quarantined)."""

    async def save(self, ctx: Context, works: list[Work]) -> list[bool]:
        """``claim``: the stage on the whole claim; per message, whether it was ours."""
        raise NotImplementedError


class Parse(Stage):
    """The MIME structure, headers, attachments and classifier findings (parse.py)."""

    name = "parse"
    batch = True
    message = True

    async def run_many(self, ctx: Context, works: list[Work]) -> None:
        results = await ctx.parser.parse_many(
            [(w.item.raw, w.policy.retention.classifier_for(w.item.tenant_id)) for w in works])
        for work, result in zip(works, results, strict=True):
            work.result = result

    def observe_many(self, ctx: Context, works: list[Work], wall: float) -> None:
        for work in works:
            ctx.observe("parse", work.result.get("seconds", wall))

    def run(self, ctx: Context, work: Work) -> None:
        work.parsed = parsed = to_fields(work.result)
        if parsed.parse_failed:
            ctx.log.warning("%s: stored unparseable (%s)", work.item.id,
                            "; ".join(parsed.defects))


class Authenticate(Stage):
    """DKIM, SPF, ARC and DMARC of inbound mail (gateway.auth.inbound), with DNS and
    CPU in a worker process."""

    name = "authenticate"
    batch = True

    def applies(self, ctx: Context, works: list[Work]) -> list[Work]:
        return [w for w in works if w.item.direction == "inbound"] if ctx.auth else []

    async def run_many(self, ctx: Context, works: list[Work]) -> None:
        assert ctx.auth is not None
        checked = await ctx.auth.check_many(
            [(w.item.raw, w.item.mail_from, w.item.helo, w.item.client_address) for w in works])
        for work, (results, seconds) in zip(works, checked, strict=True):
            if isinstance(results, str):
                work.error = WorkerError(f"checks failed: {results}")
                continue
            ctx.observe("auth", seconds)
            if ctx.metrics is not None:
                ctx.metrics.auth_results((r.result for r in results.dkim), results.for_rules())
            work.auth = results


class Classify(Stage):
    """Tags: the message's own, the tenant's defaults and what the classifier found
    (gateway.policy).  They come before the rules, so that rules can match on them
    (e.g. tagged: [sensitive])."""

    name = "classify"
    message = True

    def run(self, ctx: Context, work: Work) -> None:
        item = work.item
        found = work.policy.retention.tags_for(item.tenant_id, work.result["findings"])
        work.tags = tuple(dict.fromkeys((*item.tags, *found)))


class Rules(Stage):
    """The tenant's workflow rules on what is known of the message (gateway.workflow.rules)."""

    name = "rules"
    message = True

    def run(self, ctx: Context, work: Work) -> None:
        item, parsed, auth = work.item, work.parsed, work.auth
        view = MessageView(
            direction=item.direction, sender=item.mail_from, recipients=item.recipients,
            headers=tuple(tuple(h) for h in work.result["headers"]),
            attachments=tuple((a["filename"] or "", a["content_type"] or "")
                              for a in parsed.attachments),
            size=item.size, tags=frozenset(work.tags),
            auth=auth.for_rules() if auth is not None else (),
        )
        work.rules_started = time.monotonic()  # timed with the plan, as "rules"
        work.plan = evaluate(work.policy.workflows.for_tenant(item.tenant_id), view)


class PlanStage(Stage):
    """What the rules decided, as deliveries, tags and notes (gateway.workflow.actions)."""

    name = "plan"
    message = True

    def run(self, ctx: Context, work: Work) -> None:
        item, plan, auth = work.item, work.plan, work.auth
        returns = _returns(ctx, item) if ctx.srs else ()
        # Mail imported from the tenant's own mailbox is already kept there.
        keep = None if item.protocol == "IMAP" else ctx.keep_original.get(item.tenant_id)
        outcome = actions.outcome(plan, item.recipients, work.tags, item.direction, returns,
                                  keep)
        outcome = dataclasses.replace(outcome, policy_version=work.policy.version,
                                      indexed=item.tenant_id not in ctx.unindexed)
        if auth is not None:
            outcome = dataclasses.replace(outcome, auth_results=auth.as_dict(),
                                          auth_header=auth.header(ctx.authserv_id))
        if ctx.request_address and item.direction == "inbound":
            asked = [r for r in item.recipients
                     if subaddress(r, ctx.request_address) is not None]
            if asked:
                outcome = dataclasses.replace(outcome, request=asked[0])
        ctx.timed("rules", work.rules_started)
        work.outcome = outcome
        work.rules = [name for name, _ in plan.matched]


class Save(Stage):
    """The outcomes of a claim in one transaction, where the message is still ours."""

    name = "save"
    claim = True

    async def save(self, ctx: Context, works: list[Work]) -> list[bool]:
        started = time.monotonic()
        saved = await asyncio.to_thread(
            ctx.store.finish_many, ctx.owner, [(w.item.id, w.parsed, w.outcome) for w in works]
        )
        ctx.timed("save", started)
        return saved


STAGES: tuple[Stage, ...] = (Parse(), Authenticate(), Classify(), Rules(), PlanStage(), Save())

BATCHED = tuple(s for s in STAGES if s.batch)
PER_MESSAGE = tuple(s for s in STAGES if s.message)
[SAVE] = (s for s in STAGES if s.claim)  # one transaction per claim


def _returns(ctx: Context, item: PipelineInput) -> tuple[str, ...]:
    """Where a bounce to our SRS addresses goes back to (the listener checked them)."""
    if item.direction != "inbound":
        return ()
    out = []
    for r in item.recipients:
        if srs.is_srs(r):
            try:
                out.append(srs.decode(r))
            except srs.SRSError:
                ctx.log.warning("%s: recipient %s is not an SRS address we can decode",
                                item.id, logs.mask(r))
    return tuple(out)
