"""The precheck stage: what must be decided about a message before the 250.

Ingress calls it at the end of DATA, before anything is stored, and knows only
``Arrival`` (what came in), ``Refusal`` (which tenants' copies are refused,
and the reply when that leaves none) and ``Precheck.check``.  Two decisions
cannot wait for the pipeline:

- a tenant's workflow rule that rejects on the envelope and headers alone: the
  pipeline's own ``evaluate``, run ``before_body`` (it stops at the first rule
  that needs the MIME body; from there on the rules run after storage);
- DMARC for tenants with ``dmarc: reject``: DNS while the client waits, so a
  check that errs or takes longer than ``AUTH_DEADLINE`` never refuses (the
  message is accepted and the pipeline records its results).

Only a message for a tenant with such rules, or with ``dmarc: reject``, pays
for the headers-only parse or the DNS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from gateway.auth.work import AuthCalls
from gateway.pipeline.parse import header_fields
from gateway.workflow.loader import Workflows
from gateway.workflow.rules import INBOUND, MessageView, evaluate

# These lines are written while the SMTP client waits for its reply, and have
# always been the SMTP listener's: operators' filters on its logger keep them.
log = logging.getLogger("gateway.ingress.smtp")

DMARC_REJECTED = "550 5.7.1 Message rejected: DMARC policy of {domain} is reject"
AUTH_DEADLINE = 30.0  # seconds the DMARC check before the reply may take


@dataclass(frozen=True, slots=True)
class Arrival:
    """A message at the end of DATA, as the precheck sees it."""

    sender: str  # the envelope sender; "" for the null sender
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (tenant, its recipients), in RCPT order
    data: bytes  # the message as received
    client: str  # the client's IP address
    helo: str  # the EHLO/HELO name, made safe to log


@dataclass(frozen=True, slots=True)
class Refusal:
    """The tenants whose copies are refused; ``reply`` and ``reason`` (the metrics
    label) are what the client gets when no tenant is left."""

    tenants: frozenset[str]
    reply: str
    reason: str  # rule | dmarc


class Precheck:
    """The decisions before the 250, for the MX listener."""

    def __init__(
        self,
        workflows: Callable[[], Workflows] = Workflows,
        auth: AuthCalls | None = None,
        dmarc_rejecting: Collection[str] = (),
    ) -> None:
        self.workflows = workflows  # the rules in force (they change on a policy reload)
        self.auth = auth  # the checks of inbound mail; None: not configured
        self.dmarc_rejecting = frozenset(dmarc_rejecting)  # tenants with dmarc: reject

    def wanted(self, tenants: Iterable[str]) -> bool:
        """Whether any of these tenants has something to decide before the 250: a rule
        that can reject at the end of DATA, or dmarc: reject with the checks on.  Most
        mail has neither, and the listener then builds no ``Arrival``."""
        workflows = self.workflows()
        return any(workflows.rejects_early(t)
                   or (self.auth is not None and t in self.dmarc_rejecting) for t in tenants)

    async def check(self, arrival: Arrival) -> Refusal | None:
        """Which tenants refuse the message; None when every tenant takes it.

        The rules come first; DMARC is checked only for the tenants they leave.
        """
        by_rule = self._rules(arrival)
        refused = by_rule.tenants if by_rule is not None else frozenset()
        rejecting = [t for t, _ in arrival.groups
                     if t in self.dmarc_rejecting and t not in refused]
        if self.auth is None or not rejecting:
            return by_rule
        by_dmarc = await self._dmarc(arrival, self.auth, rejecting)
        if by_dmarc is None:
            return by_rule
        if by_rule is None:
            return by_dmarc
        return Refusal(by_rule.tenants | by_dmarc.tenants, by_dmarc.reply, by_dmarc.reason)

    def _rules(self, arrival: Arrival) -> Refusal | None:
        """The tenants whose rules reject the message already at the end of DATA; the
        reply is the last such rule's."""
        workflows = self.workflows()
        early = [t for t, _ in arrival.groups if workflows.rejects_early(t)]
        if not early:
            return None
        fields = tuple(header_fields(arrival.data))
        refused: list[str] = []
        reply = ""
        for tenant, recipients in arrival.groups:
            if tenant not in early:
                continue
            view = MessageView(direction=INBOUND, sender=arrival.sender, recipients=recipients,
                               headers=fields, size=len(arrival.data))
            plan = evaluate(workflows.for_tenant(tenant), view, before_body=True)
            if plan.reject is not None:
                log.info("message for tenant %s rejected by rule %s", tenant, plan.stopped_by)
                refused.append(tenant)
                reply = plan.reject
        return Refusal(frozenset(refused), reply, "rule") if refused else None

    async def _dmarc(self, arrival: Arrival, auth: AuthCalls,
                     rejecting: list[str]) -> Refusal | None:
        """``rejecting`` (tenants with dmarc: reject) if the message fails DMARC there."""
        try:
            results = await asyncio.wait_for(auth.check(
                arrival.data, mail_from=arrival.sender, helo=arrival.helo,
                client_ip=arrival.client, dmarc_only=True), AUTH_DEADLINE)
        except Exception as exc:  # DNS trouble or a bug in a check: accept, never refuse
            log.warning("DMARC check before the reply failed (%s); accepting",
                        exc.__class__.__name__)
            return None
        verdict = results.dmarc
        if verdict is None or verdict.result != "fail" or verdict.disposition != "reject":
            return None
        log.info("message from %s fails DMARC of %s (p=reject): refused for %s", arrival.client,
                 verdict.domain, ",".join(rejecting))
        return Refusal(frozenset(rejecting), DMARC_REJECTED.format(domain=verdict.domain),
                       "dmarc")
