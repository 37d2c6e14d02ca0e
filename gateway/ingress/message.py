"""One tenant's copy of an accepted message, as the store takes it, with our trace
header (``Received:``) beside it: the message bytes are stored as they came."""

from __future__ import annotations

import email.utils
import functools
from datetime import datetime
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from gateway.records import NewMessage
from gateway.store.ids import new_id
from gateway.tenancy import has_unsafe_chars


def build_message(
    session: Session, envelope: Envelope, data: bytes, *, tenant_id: str,
    recipients: list[str], hostname: str, mail_from: str, now: Any, client: str,
    direction: str = "inbound", submitted_by: str | None = None,
) -> NewMessage:
    """One tenant's copy of an accepted message, with our trace header beside it."""
    message_id = new_id()
    helo = safe_helo(session.host_name)
    protocol = _protocol(session, envelope)
    trace = received_header(helo=helo, client=client, hostname=hostname, protocol=protocol,
                            queue_id=message_id, recipients=recipients, when=now)
    return NewMessage(
        id=message_id, tenant_id=tenant_id, mail_from=mail_from, recipients=tuple(recipients),
        data=data, received_at=now, client_address=client, helo=helo,
        protocol=protocol, trace_header=trace, smtputf8=bool(envelope.smtp_utf8),
        direction=direction, submitted_by=submitted_by,
    )


@functools.lru_cache(maxsize=256)
def safe_helo(name: str | None) -> str:
    """The EHLO/HELO name as we write it in headers and logs (a client says the same
    name for every message, and each message asks for it more than once)."""
    if not name:
        return "unknown"
    clean = "".join(c for c in name if 32 < ord(c) < 127 and c not in "()[];\\\"")
    return clean[:255] or "unknown"


def _protocol(session: Session, envelope: Envelope) -> str:
    name = "ESMTP" if session.extended_smtp else "SMTP"
    if envelope.smtp_utf8:
        name = "UTF8SMTP"
    if session.ssl is not None:
        name += "S"
    if session.authenticated:
        name += "A"  # RFC 3848: ESMTPSA
    return name


def received_header(
    *, helo: str, client: str, hostname: str, protocol: str, queue_id: str,
    recipients: list[str], when: datetime,
) -> str:
    """Our trace header, folded like Postfix's; 'for' only with one recipient."""
    parts = [
        f"Received: from {helo} ([{client}])",
        f"\tby {hostname} (MailFlowr Gateway) with {protocol} id {queue_id}",
    ]
    date = _rfc5322_date(when.replace(microsecond=0))
    if len(recipients) == 1 and not has_unsafe_chars(recipients[0]):
        parts.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        parts[-1] += ";"
        parts.append(f"\t{date}")
    return "\r\n".join(parts) + "\r\n"


@functools.lru_cache(maxsize=4)
def _rfc5322_date(when: datetime) -> str:
    """The Date of a trace header: the same for every message of a second."""
    return email.utils.format_datetime(when)
