"""Data-subject requests that reach the processor: the agreement has them forwarded to
the controller (the tenant's privacy contact) with a copy of the request, and tracked
until the export or erasure that answers them, within the month of GDPR art. 12(3).

``receive()`` records one (from ``request record`` or the admin API) with its
``forward()``, an outbound message of the tenant delivered through the queue like a
breach notice; ``fulfilled()`` is called by exports and erasures of a person, and marks
that person's open requests of those kinds fulfilled."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.config import GatewayConfig
from gateway.delivery.notices import local_message
from gateway.policy.retention import Duration
from gateway.policy.subprocessors import SubprocessorPolicy
from gateway.privacy import incident
from gateway.records import NewMessage
from gateway.store.repository import Store
from gateway.store.requests import RequestStore

ANSWER_WITHIN = Duration(months=1)  # GDPR art. 12(3)
ANSWERED_BY = {"export": ("access", "portability"), "erasure": ("erasure",)}


def due(received_at: datetime) -> datetime:
    return ANSWER_WITHIN.after(received_at)


def forward(*, tenant: str, tenant_name: str, kind: str, subject: str, text: str,
            sender: str, to: str, received_at: datetime, now: datetime,
            hostname: str) -> NewMessage:
    """The forward of a request to the tenant's privacy contact, the request quoted."""
    quoted = "\n".join(f"> {line}" for line in text.replace("\r\n", "\n").split("\n"))
    body = (f"A data-subject request about your data reached us, your processor, and is "
            f"forwarded to you as our agreement says.\n\n"
            f"Kind: {kind}\nPerson: {subject}\nReceived: {received_at.isoformat()}\n"
            f"Due (one month, GDPR art. 12(3)): {due(received_at).isoformat()}\n\n"
            f"The request as received:\n\n{quoted}\n\n"
            f"-- \nTenant: {tenant_name} ({tenant})\n")
    return local_message(tenant=tenant, sender=sender, to=to,
                         subject=f"Data-subject request ({kind})", body=body,
                         hostname=hostname, now=now, kind="request",
                         submitted_by="(data-subject request)")


@dataclass(frozen=True)
class Received:
    id: int
    to: str  # where the forward went
    due: datetime


def receive(store: Store, config: GatewayConfig, routing: SubprocessorPolicy | None, *,
            tenant: str, kind: str, subject: str, subject_hash: str, text: str,
            received_at: datetime, now: datetime, to: str | None, actor: str) -> Received:
    """Record a request about ``subject`` in ``tenant``'s data and forward it, the text
    quoted, to ``to`` or the tenant's privacy contact; NoticeError says why it cannot be
    (no contact, a time in the future)."""
    if received_at > now:
        raise incident.NoticeError(f"received {received_at.isoformat()} is in the future")
    to = incident.recipient(routing, tenant, to)
    settings = config.tenants.get(tenant)
    message = forward(
        tenant=tenant, tenant_name=(settings.name if settings else "") or tenant,
        kind=kind, subject=subject, text=text,
        sender=incident.notice_sender(routing, config.smtp.hostname), to=to,
        received_at=received_at, now=now, hostname=config.smtp.hostname)
    deadline = due(received_at)
    request_id = RequestStore(store).record(
        tenant, kind, subject, received_at, deadline, message, actor,
        {"subject": subject_hash, "to": to, "received_at": received_at.isoformat(),
         "due_at": deadline.isoformat()})
    return Received(request_id, to, deadline)


def fulfilled(store: Store, tenant: str, subject: str, how: str, by: str,
              actor: str) -> list[int]:
    """Mark the open requests of ``subject`` in ``tenant`` that ``how`` (export,
    erasure) answers as fulfilled by ``by``; their ids."""
    return RequestStore(store).fulfil(tenant, subject, ANSWERED_BY[how], by, actor)
