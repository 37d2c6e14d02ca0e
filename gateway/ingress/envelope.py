"""The envelope checks both listeners share: the sender at MAIL, the recipient cap
at RCPT, and what a transaction keeps beside aiosmtpd's ``Envelope``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.config import SMTPConfig
from gateway.ingress.replies import NO_SPACE, TOO_MANY_RCPTS
from gateway.metrics import Metrics
from gateway.store.repository import Store
from gateway.tenancy import has_unsafe_chars


class Listener(Protocol):
    """What the checks here need of the SMTP session (``GatewaySMTP``)."""

    settings: SMTPConfig
    metrics: Metrics
    listener: str

    def excuse_reply(self) -> None: ...


@dataclass
class SessionState:
    """What the handler keeps per transaction, beside aiosmtpd's Envelope."""

    tenants: dict[str, list[str]] = field(default_factory=dict)
    overshoot: int = 0  # recipients refused for being past smtp.max_recipients


def session_state(envelope: Envelope) -> SessionState:
    state = getattr(envelope, "gateway_state", None)
    if state is None:
        state = SessionState()
        envelope.gateway_state = state  # type: ignore[attr-defined]
    return state


def recipient_limit(server: SMTP, envelope: Envelope) -> str | None:
    """None while the transaction may take another recipient, else its 452.

    As Postfix (smtpd_recipient_overshoot_limit): the first
    smtp.recipient_overshoot_limit recipients past the limit in a transaction
    are not errors, so a client that sends too many still reaches DATA for the
    accepted ones and retries the rest later; each one past those counts, and a
    client that never stops is cut off at smtp.max_errors as for any error.
    """
    smtp = cast(Listener, server)
    if len(envelope.rcpt_tos) < smtp.settings.max_recipients:
        return None
    state = session_state(envelope)
    state.overshoot += 1
    if state.overshoot <= smtp.settings.recipient_overshoot_limit:
        smtp.excuse_reply()
    return refuse_rcpt(server, TOO_MANY_RCPTS, "too_many")


def refuse_rcpt(server: SMTP, reply: str, reason: str) -> str:
    smtp = cast(Listener, server)
    smtp.metrics.series(smtp.metrics.smtp_recipients_refused, smtp.listener, reason).inc()
    return reply


def ehlo_lines(responses: list[str], *, auth: bool) -> list[str]:
    """aiosmtpd's EHLO lines plus PIPELINING and ENHANCEDSTATUSCODES; AUTH only if asked."""
    lines = [r[4:] for r in responses if auth or not r[4:].startswith("AUTH")]
    lines = [line for line in lines if line != "HELP"]
    lines[1:1] = ["PIPELINING"]
    lines.append("ENHANCEDSTATUSCODES")
    return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


def sender_refusal(store: Store, address: str, mail_options: list[str]) -> str | None:
    """The reply refusing MAIL FROM for reasons every listener shares, or None."""
    if not store.has_free_space():
        return NO_SPACE
    if not address.isascii() and "SMTPUTF8" not in mail_options:
        return "553 5.6.7 Must declare SMTPUTF8 to send non-ASCII addresses"
    if address != "<>" and has_unsafe_chars(address):
        return "501 5.1.7 Bad sender address syntax"
    return None


def take_sender(envelope: Envelope, address: str, mail_options: list[str]) -> None:
    envelope.mail_from = address  # aiosmtpd keeps the null sender as "<>"
    envelope.mail_options.extend(mail_options)
    envelope.smtp_utf8 = "SMTPUTF8" in mail_options


def client_address(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"
