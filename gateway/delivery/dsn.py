"""Delivery status notifications (RFC 3464): the bounce for a failed delivery.

Pure.  A DSN is sent only where the sender can be trusted, so that forged
senders never receive backscatter: today that is mail submitted by an
authenticated internal user; never for the null sender.
"""

from __future__ import annotations

import email.utils
import os
from datetime import datetime

from gateway.headers import header_end
from gateway.records import NewMessage
from gateway.store.ids import new_id


def wants_dsn(*, kind: str, direction: str, mail_from: str) -> bool:
    """Only a user's own recipients of outbound mail, and never to <>."""
    return kind == "rcpt" and direction == "outbound" and bool(mail_from)


def _status_code(diagnostic: str, expired: bool) -> str:
    parts = diagnostic.split()
    if len(parts) > 1 and parts[1][:2] in ("5.", "4.") and parts[1].count(".") == 2:
        code = parts[1]
        return "5" + code[1:] if expired else code
    return "4.4.7" if expired else "5.0.0"


def build(*, hostname: str, tenant_id: str, sender: str, recipient: str, diagnostic: str,
          expired: bool, original_id: str, original: bytes, arrival: datetime,
          now: datetime) -> NewMessage:
    """The DSN as a new message for the sender (stored, then handled like any mail)."""
    boundary = f"dsn-{os.urandom(8).hex()}"
    status = _status_code(diagnostic, expired)
    original_headers = original[: header_end(original)]
    reason = ("it could not be delivered in time (the last try said: " + diagnostic + ")"
              if expired else "the receiving server refused it: " + diagnostic)
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.format_datetime(now)}\r\n"
        f"Message-ID: <{new_id()}.dsn@{hostname}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"Your message to <{recipient}> was not delivered:\r\n"
        f"{reason}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-MailFlowr-Queue-ID: {original_id}\r\n"
        f"Arrival-Date: {email.utils.format_datetime(arrival)}\r\n"
        f"\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n"
    ).encode() + original_headers + f"\r\n--{boundary}--\r\n".encode()
    message_id = new_id()
    trace = (f"Received: by {hostname} (MailFlowr Gateway) id {message_id}\r\n"
             f"\tfor <{sender}>; {email.utils.format_datetime(now)}\r\n")
    return NewMessage(
        id=message_id, tenant_id=tenant_id, mail_from="", recipients=(sender,), data=text,
        received_at=now, client_address="127.0.0.1",
        helo=hostname, protocol="local", trace_header=trace, smtputf8=not sender.isascii(),
    )
