"""Breach notices: a personal-data incident told to the tenant's privacy contact.

The processor must tell the controller without undue delay (the agreement says
within 48 hours of discovery).  ``incident notify`` stores the notice as an
outbound message of the tenant, so the pipeline and the delivery queue send it
like any other mail (through the tenant's authorised relay, retried, visible in
``queue list``), and records an audit event with the time of discovery, the
time it was queued and the hours between, in the same transaction: the record
of having notified exists exactly when the notice does.
"""

from __future__ import annotations

import email.header
import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.delivery.notices import local_message
from gateway.policy.subprocessors import SubprocessorPolicy
from gateway.records import NewMessage
from gateway.store.incidents import PROMISE_HOURS

MAX_NOTICE_BYTES = 1_000_000


class NoticeError(Exception):
    """The notice cannot be sent as asked; the text says why."""


@dataclass(frozen=True)
class Notice:
    message: NewMessage
    discovered_at: datetime
    queued_at: datetime
    title: str

    @property
    def hours(self) -> float:
        return (self.queued_at - self.discovered_at).total_seconds() / 3600

    def audit_detail(self) -> dict[str, object]:
        return {"discovered_at": self.discovered_at.isoformat(),
                "queued_at": self.queued_at.isoformat(),
                "hours_after_discovery": round(self.hours, 2),
                "within_promise": self.hours <= PROMISE_HOURS,
                "to": self.message.recipients[0], "title": self.title,
                "sha256": hashlib.sha256(self.message.data).hexdigest()}


def privacy_contact(routing: SubprocessorPolicy | None, tenant: str) -> str | None:
    """Where a tenant's notices go unless told otherwise: the privacy_contact of its
    terms in subprocessors.yaml (None: it names none)."""
    terms = routing.tenants.get(tenant) if routing is not None else None
    return terms.privacy_contact if terms is not None else None


def notice_sender(routing: SubprocessorPolicy | None, hostname: str) -> str:
    """Who notices come from unless told otherwise: notice.from of subprocessors.yaml,
    else the postmaster of the gateway's host name."""
    return (routing.notice_from if routing is not None else "") or f"postmaster@{hostname}"


def recipient(routing: SubprocessorPolicy | None, tenant: str, to: str | None) -> str:
    """Where a notice to ``tenant`` goes: ``to``, else its privacy contact."""
    found = to or privacy_contact(routing, tenant)
    if not found:
        raise NoticeError(f"tenant {tenant} has no privacy_contact in subprocessors.yaml: "
                          "give --to ADDRESS")
    return found


def read_file(path: str) -> str:
    """The text of a notice (or a request) the operator wrote to ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NoticeError(f"{path}: {exc.strerror}") from None
    return read_text(data, path)


def read_text(data: bytes, where: str) -> str:
    if not data.strip():
        raise NoticeError(f"{where}: the notice is empty")
    if len(data) > MAX_NOTICE_BYTES:
        raise NoticeError(f"{where}: the notice is over {MAX_NOTICE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoticeError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if "\0" in text:
        raise NoticeError(f"{where}: the notice contains NUL characters")
    return text


def build(*, tenant: str, tenant_name: str, sender: str, to: str, text: str, title: str,
          discovered_at: datetime, now: datetime, hostname: str) -> Notice:
    if discovered_at > now:
        raise NoticeError(f"the time of discovery {discovered_at.isoformat()} is in the future")
    for name, value in (("from", sender), ("to", to), ("subject", title)):
        if any(c in value for c in "\r\n\0"):
            raise NoticeError(f"the {name} must be one line")
    subject = email.header.Header(title, "utf-8").encode() if not title.isascii() else title
    body = (
        f"{text.rstrip()}\n\n"
        f"-- \nTenant: {tenant_name} ({tenant})\n"
        f"Discovered: {discovered_at.isoformat()}\n"
        f"Notified: {now.isoformat()}\n"
    )
    message = local_message(tenant=tenant, sender=sender, to=to, subject=subject, body=body,
                            hostname=hostname, now=now, kind="incident",
                            submitted_by="(incident notice)",
                            extra_headers="Importance: high\r\n")
    return Notice(message, discovered_at, now, title)
