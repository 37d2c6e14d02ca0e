"""The SMTP session: aiosmtpd's protocol, with what a trusted MTA needs and it lacks.

``GatewaySMTP`` adds connection caps (total and per client IP), an error
budget, checks against unauthorised pipelining, enhanced status codes on every
reply (``replies``), Postfix-like texts, a 421 on idle timeout, and its own
DATA reader (``data``).  The listener's handler (``mx.IngressHandler``, or
``submission.SubmissionHandler``) holds the policy and stores the message;
``accepted`` counts and logs what it stored, ``refuse_data`` what it did not.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import SMTP

from gateway import logs
from gateway.config import SMTPConfig
from gateway.ingress import fastinit
from gateway.ingress.data import (
    DataReader,
    has_bare_newline,
    has_long_line,
    message_id_of,
    normalize_newlines,
)
from gateway.ingress.envelope import session_state
from gateway.ingress.replies import (
    BARE_NEWLINE,
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    SHUTTING_DOWN,
    SYNC_ERROR,
    TOO_BIG,
    rewrite_reply,
)
from gateway.metrics import Metrics, reply_class
from gateway.records import NewMessage

log = logging.getLogger(__name__)


class ConnectionTracker:
    """Counts connections in all and per client IP; knows the live sessions."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.per_ip: dict[str, int] = defaultdict(int)
        self.sessions: set[GatewaySMTP] = set()
        self.shutting_down = False
        self.idle = asyncio.Event()  # set while no session is open
        self.idle.set()

    def admit(self, ip: str) -> str | None:
        """None when the connection may go on, else the reason it may not."""
        if self.shutting_down:
            return "shutdown"
        if len(self.sessions) >= self.max_total:
            return "total"
        if self.per_ip[ip] >= self.max_per_ip:
            return "per_ip"
        return None

    def add(self, session: GatewaySMTP, ip: str) -> None:
        self.sessions.add(session)
        self.per_ip[ip] += 1
        self.idle.clear()

    def remove(self, session: GatewaySMTP, ip: str) -> None:
        self.sessions.discard(session)
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        if not self.sessions:
            self.idle.set()


def _write(transport: asyncio.BaseTransport, data: bytes) -> None:
    # uvloop's transports write like asyncio's but are not WriteTransport subclasses.
    cast(asyncio.WriteTransport, transport).write(data)


def abort(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection at once (shutdown deadline), whatever loop made it."""
    if transport is not None and not transport.is_closing():
        cast(asyncio.WriteTransport, transport).abort()


# <dot-atom@domain> and what follows: the common path, parsed here as email's address
# parser (which aiosmtpd uses for every MAIL and RCPT) would parse it, at a tenth the cost.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*([^( \t].*|)\Z", re.DOTALL)


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol, hardened (see the module docstring)."""

    def __init__(
        self,
        handler: Any,
        *,
        settings: SMTPConfig,
        tracker: ConnectionTracker,
        metrics: Metrics,
        submission: bool = False,
        listener: str = "smtp",
        **kwargs: Any,
    ) -> None:
        options = {"data_size_limit": settings.max_message_size, "enable_SMTPUTF8": True,
                   "decode_data": False, "hostname": settings.hostname,
                   "ident": "ESMTP MailFlowr", "timeout": settings.idle_timeout, **kwargs}
        # the MX listener (no AUTH options): aiosmtpd's tables cached, see fastinit
        fastinit.initialise(self, handler, options, cacheable=kwargs.keys() <= {"tls_context"})
        # aiosmtpd keeps these limits in a dict shared by all sessions (EHLO raises the
        # MAIL limit for everyone, each new connection resets it): one per session.
        self.command_size_limits = defaultdict(lambda: SMTP.command_size_limit)
        self.settings = settings
        self.tracker = tracker
        self.metrics = metrics
        self.submission = submission
        self.listener = listener  # the metrics label: smtp or submission
        self._peer_ip = ""
        self._admitted = False
        self._greeted = False
        self._errors = 0
        self._excused = False  # the reply about to go out is not counted in _errors
        self._data_reader: DataReader | None = None
        self._in_data = False
        self._verbatim = False  # EHLO/HELO replies carry no enhanced status codes
        self._deadline = 0.0  # loop time at which an idle session is closed

    # ---------------------------------------------------------- connections
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:  # the same connection again, after STARTTLS
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if peer else "unknown"
        refusal = self.tracker.admit(self._peer_ip)
        if refusal is not None:
            self.metrics.smtp_connections_refused.labels(self.listener, refusal).inc()
            text = {
                "total": "421 4.7.0 {host} Error: too many connections",
                "per_ip": "421 4.7.0 {host} Error: too many connections from {ip}",
                "shutdown": SHUTTING_DOWN,
            }[refusal].format(host=self.hostname, ip=self._peer_ip)
            log.warning("connection from %s refused: %s", self._peer_ip, refusal)
            self._count(text)
            _write(transport, text.encode() + b"\r\n")
            transport.close()
            return
        self._admitted = True
        self.tracker.add(self, self._peer_ip)
        self.metrics.series(self.metrics.smtp_connections, self.listener).inc()
        self.metrics.series(self.metrics.smtp_connections_total, self.listener).inc()
        super().connection_made(transport)
        if self._handler_coroutine is not None:
            self._handler_coroutine.add_done_callback(self._forget)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.tracker.remove(self, self._peer_ip)
        self.metrics.series(self.metrics.smtp_connections, self.listener).dec()
        if self._data_reader is not None and not self._data_reader.future.done():
            self._data_reader.future.cancel()
        super().connection_lost(error)  # cancels the session's task: needs it till here
        if self._handler_coroutine is None or self._handler_coroutine.done():
            self._release()

    def _forget(self, task: asyncio.Task[None]) -> None:
        if self.transport is None:  # connection_lost() has run
            self._release()

    def _release(self) -> None:
        """The session's task and its connection have ended: drop what ties this object
        into reference cycles (its bound methods, its stream writer, the task whose end
        holds a traceback of its frames), so that it is freed at once.  Left to the
        cyclic collector, a full pass over the sessions of the last few seconds paused
        the loop for 50-80 ms at 100 sessions."""
        self._smtp_methods = {}
        self._auth_methods = {}
        self._data_reader = None
        self._handler_coroutine = None
        self._writer = None  # type: ignore[assignment]  # aiosmtpd types it as always set
        self._client_connected_cb = None

    def eof_received(self) -> bool | None:
        if not self._admitted:
            return False
        return super().eof_received()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline. aiosmtpd cancels its timer and starts another on
        every line a client sends; here each line only notes the new deadline, and the
        one timer, when it fires before it, waits on until then (the two calls into the
        loop's timer heap per line were 4% of its time at one message per session)."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._deadline:  # the client was heard from since
            self._timeout_handle = self.loop.call_at(self._deadline, self._idle_check)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _say_and_close(self, reply: str) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._count(reply)
        _write(transport, reply.encode() + b"\r\n")
        transport.close()

    def _count(self, reply: str) -> None:
        code = reply[:3]
        if code.isdigit():
            self.metrics.reply(self.listener, code)

    def excuse_reply(self) -> None:
        """The next reply, though a refusal, is not counted in smtp.max_errors."""
        self._excused = True

    def refuse_data(self, reply: str, reason: str, size: int | None = None) -> str:
        """A message refused or deferred at the end of DATA: count it, log it, reply."""
        self.metrics.series(self.metrics.smtp_messages, self.listener, reply_class(reply),
                            reason).inc()
        envelope = self.envelope
        tenants = ",".join(session_state(envelope).tenants) if envelope is not None else ""
        logs.event(log, "rejected", logging.WARNING if reply[:1] == "4" else logging.INFO,
                   listener=self.listener, tenant=tenants or "-", code=int(reply[:3]),
                   reason=reason, size=size, client=self._peer_ip,
                   sender=(envelope.mail_from if envelope is not None else None) or "<>")
        return reply

    def _pending_input(self) -> int:
        """Bytes the client sent that no command has read yet.

        StreamReader has no public way to ask; aiosmtpd itself clears this
        buffer after STARTTLS (CVE-2024-34083), so it is as stable as that.
        """
        return len(self._reader._buffer)  # type: ignore[attr-defined]

    @property
    def in_transaction(self) -> bool:
        return self._in_data or bool(self.envelope is not None and self.envelope.mail_from)

    def shutdown(self) -> None:
        """Close now if idle; otherwise the transaction may finish first."""
        if not self.in_transaction:
            self._say_and_close(SHUTTING_DOWN.format(host=self.hostname))

    # ---------------------------------------------------------- replies
    async def push(self, status: str | bytes) -> None:
        if not self._greeted:
            self._greeted = True
            if self.settings.greet_pause > 0:
                await asyncio.sleep(self.settings.greet_pause)
            if self._pending_input():
                log.warning("%s talked before the greeting", self._peer_ip)
                self._say_and_close(SYNC_ERROR)
                return
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        # EHLO's capability lines go out as they are; its refusals get a code like all.
        reply = text if self._verbatim and text[:1] == "2" else rewrite_reply(text)
        if self.transport is None or self.transport.is_closing():
            return
        self._count(reply)
        excused, self._excused = self._excused, False
        await super().push(reply)
        if reply[:1] in "45" and not reply.startswith("421") and not excused:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                log.warning("%s: too many errors, disconnecting", self._peer_ip)
                self._say_and_close(f"421 4.7.0 {self.hostname} Error: too many errors")
                return
        if self.tracker.shutting_down and not self.in_transaction and reply[:1] != "3":
            self._say_and_close(SHUTTING_DOWN.format(host=self.hostname))

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's "500 Error: (Exception) text": a temporary failure, no detail.
        log.error("%s: SMTP session error", self._peer_ip, exc_info=error)
        return INTERNAL_ERROR

    # ---------------------------------------------------------- commands
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # A source route <@a:u@b> would come back as plain u@b; keep it whole
        # so that the recipient check sees it and refuses it as a relay attempt.
        stripped = arg.lstrip()
        if stripped.startswith("<@"):
            inner, sep, rest = stripped[1:].partition(">")
            return (inner, rest) if sep else (None, None)
        plain = _PLAIN_PATH.match(arg)
        if plain:  # what email's address parser would return, without its cost
            return plain.group(1), plain.group(2)
        return super()._getaddr(arg)

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._hello(super().smtp_EHLO, hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self._hello(super().smtp_HELO, hostname)

    async def _hello(self, command: Callable[[str], Awaitable[None]], hostname: str) -> None:
        # RFC 2920: EHLO/HELO end a command group; anything sent behind them is refused.
        if self._pending_input():
            self._say_and_close(SYNC_ERROR)
            return
        self._verbatim = True
        try:
            await command(hostname)
        finally:
            self._verbatim = False

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.submission:  # the MX listener authenticates nobody
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self._pending_input():  # message text sent before our 354
            self._say_and_close(SYNC_ERROR)
            return
        reader = DataReader(self.settings.max_message_size, self.loop.create_future())
        self._data_reader = reader
        self._in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            content = await reader.future
        finally:
            self._data_reader = None
        try:
            status = await self._finish_data(content)
        finally:
            self._in_data = False
            self._set_post_data_state()
        await self.push(status)

    async def _finish_data(self, content: bytes | None) -> str:
        if content is None:
            return self.refuse_data(TOO_BIG, "too_big")
        if has_bare_newline(content):
            if self.settings.bare_newline == "reject":
                return self.refuse_data(BARE_NEWLINE, "bare_newline")
            content = normalize_newlines(content)
        if has_long_line(content):
            return self.refuse_data(LINE_TOO_LONG, "line_too_long")
        assert self.envelope is not None
        self.envelope.content = content
        self.envelope.original_content = content
        status: str = await self._call_handler_hook("DATA")
        return status

    def data_received(self, data: bytes) -> None:
        reader = self._data_reader
        if reader is None or reader.future.done():
            super().data_received(data)
            return
        self._reset_timeout()
        rest = reader.feed(data)
        if rest:  # commands pipelined after the final dot
            super().data_received(rest)


def accepted(smtp: GatewaySMTP, batch: list[NewMessage], data: bytes, latency: float,
             user: str | None = None) -> str:
    """Count the stored copies of a message; the 250 reply for them. Their log lines
    are written once the reply is on its way: the client does not wait for them."""
    metrics, listener = smtp.metrics, smtp.listener
    metrics.series(metrics.smtp_messages, listener, "2xx", "ok").inc()
    metrics.series(metrics.smtp_received_bytes, listener).inc(len(data))
    metrics.series(metrics.accept_latency, listener).observe(latency)
    for m in batch:
        metrics.series(metrics.messages_accepted, metrics.tenant(m.tenant_id)).inc()
    if log.isEnabledFor(logging.INFO):
        smtp.loop.call_soon(_log_accepted, batch, data, listener, user)
    return f"250 2.0.0 Ok: queued as {' '.join(m.id for m in batch)}"


def _log_accepted(batch: list[NewMessage], data: bytes, listener: str,
                  user: str | None) -> None:
    msgid = logs.msgid_hash(message_id_of(data))
    for m in batch:
        logs.event(log, "accepted", queue_id=m.id, tenant=m.tenant_id, msgid=msgid, code=250,
                   size=len(data), rcpts=len(m.recipients), listener=listener,
                   client=m.client_address, user=user, sender=m.mail_from or "<>")


def protocol_factory(
    handler: Any, settings: SMTPConfig, tracker: ConnectionTracker, metrics: Metrics,
    tls_context: Callable[[], Any] = lambda: None, **kwargs: Any,
) -> Callable[[], GatewaySMTP]:
    """Protocols for one listener; each new connection takes the TLS context in force
    (SIGHUP may have loaded a renewed certificate)."""
    def make() -> GatewaySMTP:
        return GatewaySMTP(handler, settings=settings, tracker=tracker, metrics=metrics,
                           tls_context=tls_context(), **kwargs)

    return make
