"""Data-subject requests that reach the processor: the agreement has them forwarded to
the controller (the tenant's privacy contact) with a copy of the request, and tracked
until the export or erasure that answers them, within the month of GDPR art. 12(3).

``receive()`` records one (from ``request record`` or the admin API) with its
``forward()``, an outbound message of the tenant delivered through the queue like a
breach notice; ``fulfilled()`` is called by exports and erasures of a person, and marks
that person's open requests of those kinds fulfilled."""

from __future__ import annotations

import email
import email.policy
import email.utils
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.clock import aware
from gateway.config import GatewayConfig
from gateway.delivery.notices import local_message
from gateway.htmltext import text_of
from gateway.policy.subprocessors import SubprocessorPolicy
from gateway.privacy import incident
from gateway.privacy.keys import PrivacyKey
from gateway.records import NewMessage
from gateway.store.models import request_due as due
from gateway.store.repository import Store
from gateway.store.requests import RequestStore

ANSWERED_BY = {"export": ("access", "portability"), "erasure": ("erasure",)}


def forward(config: GatewayConfig, routing: SubprocessorPolicy | None, *, tenant: str,
            kind: str, subject: str, text: str, received_at: datetime, now: datetime,
            to: str | None, original: bytes | None = None) -> tuple[str, NewMessage]:
    """The forward of a request to ``to`` or the tenant's privacy contact, the request
    quoted (and, when it came by mail, that mail attached whole): where it goes, and the
    message (NoticeError: the tenant names no contact)."""
    to = incident.recipient(routing, tenant, to)
    settings = config.tenants.get(tenant)
    tenant_name = (settings.name if settings else "") or tenant
    quoted = "\n".join(f"> {line}" for line in text.replace("\r\n", "\n").split("\n"))
    body = (f"A data-subject request about your data reached us, your processor, and is "
            f"forwarded to you as our agreement says.\n\n"
            f"Kind: {kind}\nPerson: {subject}\nReceived: {received_at.isoformat()}\n"
            f"Due (one month, GDPR art. 12(3)): {due(received_at).isoformat()}\n\n"
            f"The request as received"
            f"{' (the mail itself is attached)' if original else ''}:\n\n{quoted}\n\n"
            f"-- \nTenant: {tenant_name} ({tenant})\n")
    return to, local_message(
        tenant=tenant, sender=incident.notice_sender(routing, config.smtp.hostname), to=to,
        subject=f"Data-subject request ({kind})", body=body, hostname=config.smtp.hostname,
        now=now, kind="request", submitted_by="(data-subject request)", attached=original)


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
    to, message = forward(config, routing, tenant=tenant, kind=kind, subject=subject,
                          text=text, received_at=received_at, now=now, to=to)
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


MAX_LETTER_CHARS = 100_000  # of a request by mail's text, quoted in its forward


def letter(raw: bytes | None, sender: str) -> tuple[str, str]:
    """Of a request that came by mail: the person (the From: address, else the envelope
    sender) and its text (the plain part, else the HTML part as text, else the whole
    message as text)."""
    if raw is None:
        return sender, "(the message is no longer stored)"
    try:
        mail = email.message_from_bytes(raw, policy=email.policy.default)
        person = email.utils.parseaddr(str(mail.get("From", "")))[1] or sender
        head = "".join(f"{name}: {mail.get(name)}\n" for name in ("From", "Date", "Subject")
                       if mail.get(name) is not None)
        body, source = text_of(mail)
    except Exception:
        person, head, source = sender, "", "none"
    if source == "none":
        body = raw.decode("utf-8", "replace")
    text = (head + "\n" + body).replace("\0", "")
    return person if "@" in person else sender, text[:MAX_LETTER_CHARS]


def read_mail_request(store: Store, config: GatewayConfig,
                      routing: SubprocessorPolicy | None, key: PrivacyKey,
                      row: dict[str, Any], from_status: str, *, tenant: str, kind: str,
                      subject: str | None, to: str | None, actor: str, now: datetime,
                      ) -> str | None:
    """A request by mail (``row``), read: forwarded to ``tenant``'s privacy contact (or
    ``to``) as ``kind``, or left unassigned when ``tenant`` is "".  Where it went, or
    None when no longer in ``from_status``; NoticeError: the tenant has no contact."""
    raw = store.raw(row["source_id"])
    person, text = letter(raw, row["subject"])
    person = subject or person
    received = aware(row["received_at"])
    detail = {"subject": key.subject_hash(person), "received_at": received.isoformat(),
              "due_at": aware(row["due_at"]).isoformat(), "by": "mail",
              "source": row["source_id"]}
    message = None
    if tenant:
        to, message = forward(config, routing, tenant=tenant, kind=kind, subject=person,
                              text=text, received_at=received, now=now, to=to,
                              original=raw)
        detail["to"] = to
    done = RequestStore(store).assign(row["id"], from_status, tenant=tenant, kind=kind,
                                      subject=person, forward=message, actor=actor,
                                      detail=detail)
    return (to or "") if done else None
