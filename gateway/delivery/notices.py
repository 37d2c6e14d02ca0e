"""Change notices about subprocessors: one email per affected tenant, and its record.

When the registry in force gains a subprocessor, every tenant whose
authorisation covers it is told (its ``privacy_contact``), and the new
subprocessor becomes usable for that tenant only after the objection window
(``notice.window_days``, at least 5 days) has passed without an objection; the
window runs from the notice's delivery to the privacy contact (a 250 from the
server that took it), never ending before the date the notice states.  A tenant
that authorises a subprocessor later (added to the configuration after it, or
authorising one more) gets a notice and a window of its own; a notice that could
not be sent (no privacy contact) is sent once there is one.
A removal is told too; it takes effect at once.  The emails are stored as
outbound messages of the tenant, so the pipeline and the delivery queue send
them like any other mail (through the tenant's authorised relay).  ``sync()``
runs at every start and after every policy reload that changed something.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

from gateway.policy.subprocessors import (
    HELD_PREFIX,
    Subprocessor,
    SubprocessorPolicy,
    notice_text,
)
from gateway.policyset import PolicySet
from gateway.records import NewMessage, Notice
from gateway.store.ids import new_id
from gateway.store.repository import Store

log = logging.getLogger(__name__)


async def sync(store: Store, current: PolicySet, previous: PolicySet | None,
               tenant_names: Mapping[str, str], hostname: str) -> None:
    """Record registry changes with their notices; let held copies try again."""
    routing = current.subprocessors
    if routing is None:
        return
    before = previous.subprocessors.registry if previous and previous.subprocessors else {}
    now = datetime.now(UTC)
    authorised = {(tenant, name): bool(terms.privacy_contact)
                  for tenant, terms in routing.tenants.items()
                  for name in routing.registry if terms.authorises(name)}
    built: list[Notice] = []

    def notices(a: list[str], r: list[str], p: list[tuple[str, str]]) -> list[Notice]:
        built[:] = build(routing, before, tenant_names, hostname, now, a, r, p)
        return built

    added, removed = await asyncio.to_thread(
        store.sync_subprocessors, routing.registry.keys(), now, notices, authorised)
    for name in added:
        queued = _queued(built, name)
        log.info("subprocessor %s added: %s; usable per tenant %d days after its notice "
                 "is delivered, without objection", name, queued, routing.window_days)
    for name in removed:
        log.info("subprocessor %s removed: %s", name, _queued(built, name))
    released = await asyncio.to_thread(store.release_held, HELD_PREFIX)
    if released:
        log.info("%d held deliveries try again under the new subprocessor policy", released)


def _queued(notices: list[Notice], name: str) -> str:
    """What was queued about ``name``, as the log says it."""
    count = sum(1 for n in notices if n.subprocessor == name and n.message is not None)
    unsent = sum(1 for n in notices if n.subprocessor == name and n.message is None)
    said = f"{count} notice{'' if count == 1 else 's'} queued" if count else "no notice queued"
    if unsent:
        said += f", {unsent} tenant{'' if unsent == 1 else 's'} without a privacy contact"
    return said if count or unsent else "no tenant authorises it, no notice queued"


def build(policy: SubprocessorPolicy, previous: Mapping[str, Subprocessor],
          tenant_names: Mapping[str, str], hostname: str, now: datetime,
          added: list[str], removed: list[str], pairs: list[tuple[str, str]],
          ) -> list[Notice]:
    """The notices for a registry change (``previous`` describes removed
    subprocessors), and for ``pairs``: a tenant that authorises a subprocessor it was
    not notified of (a tenant added later, an authorisation extended, a privacy
    contact set where there was none)."""
    deadline = now + timedelta(days=policy.window_days)
    wanted = [("added", name, tenant, deadline) for name in added
              for tenant in policy.affected_by(name)]
    wanted += [("removed", name, tenant, now) for name in removed
               for tenant in sorted(policy.tenants)]
    wanted += [("added", name, tenant, deadline) for tenant, name in pairs]
    out = []
    for change, name, tenant, effective in wanted:
        sp = policy.registry.get(name) or previous.get(name) or _unknown(name)
        contact = policy.tenants[tenant].privacy_contact
        message = None
        if contact:
            body = notice_text(policy, tenant=tenant,
                               tenant_name=tenant_names.get(tenant, tenant),
                               change=change, sp=sp, deadline=deadline)
            message = _email(policy, tenant, contact, body, hostname, now)
        out.append(Notice(tenant, name, change, effective, message))
    return out


def _unknown(name: str) -> Subprocessor:
    """A subprocessor removed while the daemon was not running: only its name is known."""
    return Subprocessor(name, "-", "-", "-", "-", (), date.min)


def _email(policy: SubprocessorPolicy, tenant: str, contact: str, body: str, hostname: str,
           now: datetime) -> NewMessage:
    return local_message(tenant=tenant, sender=policy.notice_from, to=contact,
                         subject=policy.notice_subject, body=body, hostname=hostname, now=now,
                         kind="notice", submitted_by="(subprocessor notice)")


def local_message(*, tenant: str, sender: str, to: str, subject: str, body: str,
                  hostname: str, now: datetime, kind: str, submitted_by: str,
                  extra_headers: str = "", attached: bytes | None = None) -> NewMessage:
    """A plain-text message the gateway itself writes to someone on a tenant's behalf,
    stored as the tenant's outbound mail (so it is delivered like any other); with
    ``attached``, a message it carries whole (message/rfc822) after the text."""
    message_id = new_id()
    text = body.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    part = (b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    if attached is None:
        content = part + text
    else:
        boundary = f"=_{message_id}".encode()
        carried = attached.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        content = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
                   b"--" + boundary + b"\r\n" + part + text + b"\r\n"
                   b"--" + boundary + b"\r\nContent-Type: message/rfc822\r\n"
                   b"Content-Transfer-Encoding: " + (b"7bit" if carried.isascii() else b"8bit")
                   + b"\r\nContent-Disposition: attachment\r\n\r\n" + carried
                   + (b"" if carried.endswith(b"\r\n") else b"\r\n")
                   + b"--" + boundary + b"--\r\n")
    text = (
        f"From: <{sender}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.format_datetime(now)}\r\n"
        f"Message-ID: <{message_id}.{kind}@{hostname}>\r\n"
        f"Auto-Submitted: auto-generated\r\n"
        f"{extra_headers}"
        f"MIME-Version: 1.0\r\n"
    ).encode() + content
    trace = (f"Received: by {hostname} (MailFlowr Gateway) id {message_id}\r\n"
             f"\tfor <{to}>; {email.utils.format_datetime(now)}\r\n")
    return NewMessage(
        id=message_id, tenant_id=tenant, mail_from=sender, recipients=(to,),
        data=text, received_at=now,
        client_address="127.0.0.1", helo=hostname, protocol="local", trace_header=trace,
        smtputf8=False, direction="outbound", submitted_by=submitted_by,
    )
