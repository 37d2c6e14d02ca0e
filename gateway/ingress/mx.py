"""The MX listener's policy: tenant recipients only, limits, disk space, the
precheck, and the acceptance itself (``Store.accept`` commits before it returns).

What must be decided about the message before the 250 (rules that reject on the
headers, DMARC p=reject) is the pipeline's precheck stage, called through
``Precheck``; no parsing, DNS or other slow work happens here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.clock import utcnow
from gateway.config import SMTPConfig
from gateway.errors import TempFailure
from gateway.ingress.data import hop_count
from gateway.ingress.envelope import (
    client_address,
    ehlo_lines,
    recipient_limit,
    refuse_rcpt,
    sender_refusal,
    session_state,
    take_sender,
)
from gateway.ingress.message import build_message, safe_helo
from gateway.ingress.replies import QUEUE_WRITE_ERROR, TOO_MANY_HOPS
from gateway.ingress.smtp import GatewaySMTP, accepted
from gateway.metrics import Metrics
from gateway.pipeline.flow import InFlow
from gateway.pipeline.precheck import Arrival, Refusal
from gateway.srs import SRS
from gateway.store.repository import Store
from gateway.tenancy import Accepted, TenantDirectory

# The MX listener's lines have always been written as the SMTP listener's.
log = logging.getLogger("gateway.ingress.smtp")


class Precheck(Protocol):
    """The decisions before the 250 (``gateway.pipeline.precheck.Precheck``)."""

    def wanted(self, tenants: Iterable[str]) -> bool: ...

    async def check(self, arrival: Arrival) -> Refusal | None: ...


class IngressHandler:
    """Envelope policy and durable acceptance (aiosmtpd handler hooks)."""

    def __init__(
        self,
        settings: SMTPConfig,
        directory: TenantDirectory,
        store: Store,
        metrics: Metrics,
        precheck: Precheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        srs: Callable[[], SRS | None] = lambda: None,
        flow: InFlow | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.flow = flow  # slows new mail to the pipeline's pace while it is behind
        self.store = store
        self.metrics = metrics
        self.precheck = precheck  # None: every tenant takes what passes the envelope checks
        self.clock = clock
        self.srs = srs  # the SRS secrets in force: bounces to our rewritten senders

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return ehlo_lines(responses, auth=False)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        refusal = sender_refusal(self.store, address, mail_options)
        if refusal is not None:
            return refusal
        if self.flow is not None:
            await self.flow.admit()
        take_sender(envelope, address, mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = recipient_limit(server, envelope)
        if refusal is not None:
            return refusal
        verdict = self.directory.resolve(address, smtputf8=envelope.smtp_utf8, srs=self.srs())
        if not isinstance(verdict, Accepted):
            return refuse_rcpt(server, verdict.reply, verdict.reason)
        state = session_state(envelope)
        group = state.tenants.setdefault(verdict.tenant_id, [])
        if verdict.address.lower() not in (r.lower() for r in group):
            group.append(verdict.address)
            envelope.rcpt_tos.append(verdict.address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = self.clock()
        smtp = cast(GatewaySMTP, server)
        data = envelope.original_content
        assert isinstance(data, bytes)
        now = utcnow()
        client = client_address(session)
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        if hop_count(data) >= self.settings.max_hops:
            return smtp.refuse_data(TOO_MANY_HOPS, "too_many_hops", len(data))
        groups = session_state(envelope).tenants
        if self.precheck is not None and self.precheck.wanted(groups):
            refusal = await self.precheck.check(Arrival(
                sender=mail_from, groups=tuple((t, tuple(r)) for t, r in groups.items()),
                data=data, client=client, helo=safe_helo(session.host_name)))
            if refusal is not None:
                groups = {t: r for t, r in groups.items() if t not in refusal.tenants}
                if not groups:
                    return smtp.refuse_data(refusal.reply, refusal.reason, len(data))
        batch = [
            build_message(session, envelope, data, tenant_id=tenant_id, recipients=recipients,
                          hostname=self.settings.hostname, mail_from=mail_from, now=now,
                          client=client)
            for tenant_id, recipients in groups.items()
        ]
        try:
            await self.store.accept(batch)
        except TempFailure as exc:
            log.error("message from %s not stored: %s", client, exc)
            return smtp.refuse_data(QUEUE_WRITE_ERROR, "storage", len(data))
        return accepted(smtp, batch, data, self.clock() - started)
