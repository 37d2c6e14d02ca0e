"""Data-subject requests that reach the processor: the agreement has them forwarded to
the controller (the tenant's privacy contact) with a copy of the request, and tracked
until the export or erasure that answers them, within the month of GDPR art. 12(3).

``forward()`` writes the forward, an outbound message of the tenant delivered through
the queue like a breach notice; ``fulfilled()`` is called by exports and erasures of a
person, and marks that person's open requests of those kinds fulfilled."""

from __future__ import annotations

from datetime import datetime

from gateway.delivery.notices import local_message
from gateway.policy.retention import Duration
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


def fulfilled(store: Store, tenant: str, subject: str, how: str, by: str,
              actor: str) -> list[int]:
    """Mark the open requests of ``subject`` in ``tenant`` that ``how`` (export,
    erasure) answers as fulfilled by ``by``; their ids."""
    return RequestStore(store).fulfil(tenant, subject, ANSWERED_BY[how], by, actor)
