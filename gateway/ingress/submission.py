"""The submission listener for internal users (port 587 in production).

Users authenticate with AUTH PLAIN or LOGIN, offered only after STARTTLS
(``538 5.7.11`` before it); passwords are checked against scrypt hashes off
the event loop; repeated failures from one client IP within
``submission.auth_window`` turn that IP away with 421 4.7.0.  A user sends only
as the addresses they own (``send_as``, by default their login address), in the
envelope and in every header From alike (``553 5.7.1`` otherwise): the From
address decides which DKIM key signs, so it is checked like the envelope.  Their messages are
stored like inbound mail, marked outbound, and the pipeline plans one delivery
per recipient plus whatever the tenant's rules add for outbound mail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.clock import utcnow
from gateway.config import SMTPConfig, SubmissionConfig, TenantConfig
from gateway.errors import TempFailure
from gateway.headers import from_addresses
from gateway.ingress.data import hop_count
from gateway.ingress.envelope import (
    client_address,
    ehlo_lines,
    recipient_limit,
    refuse_rcpt,
    sender_refusal,
    take_sender,
)
from gateway.ingress.message import build_message
from gateway.ingress.replies import QUEUE_WRITE_ERROR, TOO_MANY_HOPS
from gateway.ingress.smtp import GatewaySMTP, accepted
from gateway.metrics import Metrics
from gateway.passwords import N, is_weak, verify
from gateway.pipeline.flow import InFlow
from gateway.store.repository import Store
from gateway.tenancy import BAD_SYNTAX, NEED_SMTPUTF8, SendAs, has_unsafe_chars, printable

log = logging.getLogger(__name__)

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Error: authentication failed"
AUTH_THROTTLED = "421 4.7.0 {host} Error: too many authentication failures"
NOT_OWNED = "553 5.7.1 <{addr}>: Sender address rejected: not owned by user {user}"
HEADER_NOT_OWNED = ("553 5.7.1 <{addr}>: Sender address rejected: header From not owned "
                    "by user {user}")


class SubmissionHandler:
    """aiosmtpd handler hooks for authenticated users."""

    def __init__(
        self,
        settings: SMTPConfig,
        submission: SubmissionConfig,
        tenants: Mapping[str, TenantConfig],
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        flow: InFlow | None = None,
    ) -> None:
        self.settings = settings
        self.submission = submission
        self.flow = flow  # slows new mail to the pipeline's pace while it is behind
        self.tenants = tenants
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.users = {login.lower(): (tid, user) for tid, t in tenants.items()
                      for login, user in t.users.items()}
        self.send_as = {login.lower(): SendAs(login, user.send_as)
                        for t in tenants.values() for login, user in t.users.items()}
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._verifying = asyncio.Semaphore(VERIFY_AT_ONCE)
        self.inactive: frozenset[str] = frozenset()  # deactivated tenants: logins refused

    # ---------------------------------------------------------- authentication
    def _recent_failures(self, ip: str) -> int:
        window = self._failures[ip]
        cutoff = self.clock() - self.submission.auth_window
        while window and window[0] < cutoff:
            window.popleft()
        if not window:
            del self._failures[ip]
            return 0
        return len(window)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return ehlo_lines(responses, auth=True)

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope,
                          args: list[str]) -> str | None:
        ip = client_address(session)
        if self._recent_failures(ip) >= self.submission.max_auth_failures:
            self._turn_away(server, ip)
            return None
        credentials = await self._credentials(server, args)
        if credentials is None:
            return None  # aiosmtpd has already answered (aborted or not base64)
        if isinstance(credentials, str):
            return credentials
        login, password = credentials
        # Counted as a failure from before the check until it proves right: guesses
        # sent in parallel sessions see each other, and no more than
        # max_auth_failures passwords of one IP are ever checked per window.
        if self._recent_failures(ip) >= self.submission.max_auth_failures:
            self._turn_away(server, ip)
            return None
        attempt = self.clock()
        self._failures[ip].append(attempt)
        entry = self.users.get(login.lower())
        # Without a user, verify against a dummy hash all the same: equal timing.
        encoded = entry[1].password_hash if entry else _DUMMY_HASH
        async with self._verifying:  # 128 MiB each: a bounded number at once
            checked = await asyncio.to_thread(verify, password, encoded)
        ok = checked and entry is not None and entry[0] not in self.inactive
        if ok:
            with contextlib.suppress(ValueError):  # gone if the window has passed
                self._failures[ip].remove(attempt)
        else:
            # one line per refusal, in the admin API's form: one fail2ban filter for both
            log.warning("submission: authentication failed from %s: %s", ip,
                        "wrong login or password")
            self.metrics.smtp_auth_failures.labels("credentials").inc()
            if self._recent_failures(ip) >= self.submission.max_auth_failures:
                self._turn_away(server, ip)
                return None
            return AUTH_FAILED
        session.authenticated = True
        session.login_data = login.lower()
        log.info("submission: %s logged in from %s", _login_ref(login), ip)
        assert entry is not None
        if is_weak(entry[1].password_hash):
            log.warning("submission: %s has a password hash of a lower cost than scrypt "
                        "N=%d: make a new one with users hash-password and replace it in "
                        "the configuration", _login_ref(login), N)
        return AUTH_OK

    def _turn_away(self, server: SMTP, ip: str) -> None:
        assert isinstance(server, GatewaySMTP)
        log.warning("submission: authentication failed from %s: %s", ip,
                    f"over {self.submission.max_auth_failures} failures, turned away")
        self.metrics.smtp_auth_failures.labels("throttled").inc()
        server._say_and_close(AUTH_THROTTLED.format(host=self.settings.hostname))

    async def _credentials(self, server: SMTP,
                           args: list[str]) -> tuple[str, bytes] | str | None:
        """(login, password) from the client, a reply to send, or None if answered."""
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            blob = _b64(args[1]) if len(args) > 1 else await _challenge(server, "")
            if blob is None:
                return "501 5.5.2 Error: cannot decode the response" if len(args) > 1 else None
            parts = blob.split(b"\0")
            if len(parts) != 3:
                return "501 5.5.2 Error: malformed PLAIN response"
            return parts[1].decode("utf-8", "replace"), parts[2]
        if mechanism == "LOGIN":
            user = _b64(args[1]) if len(args) > 1 else await _challenge(server, "Username:")
            if user is None:
                return "501 5.5.2 Error: cannot decode the response" if len(args) > 1 else None
            password = await _challenge(server, "Password:")
            if password is None:
                return None
            return user.decode("utf-8", "replace"), password
        return "504 5.5.4 Error: unsupported authentication mechanism"

    # ---------------------------------------------------------- envelope
    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        refusal = sender_refusal(self.store, address, mail_options)
        if refusal is not None:
            return refusal
        login = str(session.login_data)
        if address == "<>" or not self.send_as[login].owns(address):
            return NOT_OWNED.format(addr=printable(address), user=_login_ref(login))
        if self.flow is not None:
            await self.flow.admit()
        take_sender(envelope, address, mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        refusal = recipient_limit(server, envelope)
        if refusal is not None:
            return refusal
        if not address.isascii() and not envelope.smtp_utf8:
            return refuse_rcpt(server, NEED_SMTPUTF8, "smtputf8")
        local, at, domain = address.rpartition("@")
        if has_unsafe_chars(address) or not at or not local or not domain or "@" in local:
            return refuse_rcpt(server, BAD_SYNTAX, "syntax")
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        smtp = cast(GatewaySMTP, server)
        data = envelope.original_content
        assert isinstance(data, bytes)
        if hop_count(data) >= self.settings.max_hops:
            return smtp.refuse_data(TOO_MANY_HOPS, "too_many_hops", len(data))
        login = str(session.login_data)
        foreign = self.send_as[login].header_refusal(from_addresses(data))
        if foreign is not None:
            return smtp.refuse_data(HEADER_NOT_OWNED.format(
                addr=printable(foreign), user=_login_ref(login)),
                "header_from", len(data))
        tenant_id, _ = self.users[login]
        client = client_address(session)
        message = build_message(
            session, envelope, data, tenant_id=tenant_id, recipients=list(envelope.rcpt_tos),
            hostname=self.settings.hostname, mail_from=str(envelope.mail_from), now=utcnow(),
            client=client, direction="outbound",
            submitted_by=login,
        )
        try:
            await self.store.accept([message])
        except TempFailure as exc:
            log.error("submitted message from %s not stored: %s", client, exc)
            return smtp.refuse_data(QUEUE_WRITE_ERROR, "storage", len(data))
        return accepted(smtp, [message], data, time.monotonic() - started,
                        user=_login_ref(login))


VERIFY_AT_ONCE = 2  # password checks at the same time (each holds 128 MiB for 0.3 s)
# verified for a login no user has: the same cost as a user's, so the same time
_DUMMY_HASH = (
    "scrypt$131072$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


async def _challenge(server: SMTP, prompt: str) -> bytes | None:
    """One 334 round; None when the client aborted (aiosmtpd has answered then)."""
    answer = await server.challenge_auth(prompt)
    return answer if isinstance(answer, bytes) else None


def _b64(text: str) -> bytes | None:
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _login_ref(login: str) -> str:
    """A user named in logs without the login itself (an address)."""
    return "user#" + hashlib.sha256(login.lower().encode()).hexdigest()[:10]
