"""SMTP ingress: check the envelope, store the message durably, then answer 250.

``GatewaySMTP`` is aiosmtpd's protocol with what a trusted MTA needs and
aiosmtpd lacks: connection caps (total and per client IP), an error budget,
checks against unauthorised pipelining, enhanced status codes on every reply,
Postfix-like texts, a 421 on idle timeout, and its own DATA reader.  The DATA
reader takes the bytes straight from the transport in large chunks (not line
by line), accepts only ``<CRLF>.<CRLF>`` as the end of data (so no SMTP
smuggling variant can end a message early), keeps memory bounded for an
oversize stream, and hands any bytes after the final dot back to the command
reader.

``IngressHandler`` holds the policy: tenant recipients only, limits, disk
space, and the acceptance itself (``Store.accept`` commits before it returns).
What must be decided before the 250 is the pipeline's precheck stage, called
through ``Precheck``; no parsing, DNS or other slow work happens here.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import re
import time
import types
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

import aiosmtpd
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway import logs
from gateway.auth.srs import SRS
from gateway.config import SMTPConfig
from gateway.errors import TempFailure
from gateway.headers import field_values, header_end
from gateway.metrics import Metrics, reply_class
from gateway.pipeline.flow import InFlow
from gateway.pipeline.parse import HEADER_BLOCK_LIMIT
from gateway.pipeline.precheck import Arrival, Refusal
from gateway.store.ids import new_id
from gateway.store.repository import NewMessage, Store, utcnow
from gateway.tenancy import Accepted, TenantDirectory, has_unsafe_chars

log = logging.getLogger(__name__)

END_OF_DATA = b"\r\n.\r\n"
DOT_LINE = b"\r\n."  # a line that starts with a dot: stuffed, or the end of data
MAX_TEXT_LINE = 998  # octets before CRLF, RFC 5321 4.5.3.1.6

SYNC_ERROR = "554 5.5.0 Error: SMTP protocol synchronization"
QUEUE_WRITE_ERROR = "451 4.3.0 Error: queue file write error"
INTERNAL_ERROR = "451 4.3.0 Error: internal error, try again later"
NO_SPACE = "452 4.3.1 Insufficient system storage"
TOO_BIG = "552 5.3.4 Error: message file too big"
LINE_TOO_LONG = "500 5.5.2 Error: message line longer than 1000 octets (RFC 5321 4.5.3.1.6)"
BARE_NEWLINE = "550 5.5.2 Error: bare CR or LF in message data"
TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down, closing transmission channel"
TOO_MANY_HOPS = "554 5.4.6 Too many hops"
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")

# aiosmtpd's own reply texts, as Postfix would word them, with enhanced codes.
_REPLY_REWRITES: dict[str, str] = {
    "250 OK": "250 2.0.0 Ok",
    "221 Bye": "221 2.0.0 Bye",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "454 TLS not available": "454 4.7.0 TLS not available due to local problem",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Command line too long": "500 5.5.2 Error: command line too long",
    "500 Error: strict ASCII mode": "500 5.5.2 Error: non-ASCII command",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO/EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "502 EXPN not implemented": "502 5.5.1 Error: command not implemented",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed limit",
    "502 5.5.1 Too many unrecognized commands, goodbye.":
        "421 4.7.0 Error: too many unrecognized commands",
}
_PREFIX_REWRITES: tuple[tuple[str, str], ...] = (
    ('500 Error: command "', "502 5.5.2 Error: command not recognized"),
    ("501 Syntax: ", "501 5.5.4 Syntax: "),
    ("501 Error: ", "501 5.5.4 Error: "),
    ("555 ", "555 5.5.4 "),
    ("252 ", "252 2.0.0 "),
)
_PREFIX_CODES = frozenset(prefix[:3] for prefix, _ in _PREFIX_REWRITES)
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}")


def rewrite_reply(reply: str) -> str:
    """aiosmtpd's reply -> ours: Postfix wording and an enhanced status code."""
    rewritten = _REPLY_REWRITES.get(reply)
    if rewritten is not None:
        return rewritten
    code = reply[:3]
    if code in _PREFIX_CODES and not _HAS_ENHANCED.match(reply):
        for prefix, replacement in _PREFIX_REWRITES:
            if reply.startswith(prefix):
                if replacement.endswith(" "):
                    return replacement + reply[len(prefix):]
                return replacement
    if (len(reply) > 4 and reply[3] == " " and code[0] in "245" and code not in ("220", "221")
            and not _HAS_ENHANCED.match(reply)):
        return f"{code} {code[0]}.0.0 {reply[4:]}"
    return reply


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


@dataclass
class DataReader:
    """Collects DATA straight from the transport until ``<CRLF>.<CRLF>``; the future
    gets the message with dot-stuffing undone, or None past the size limit.

    The buffer starts with a virtual CRLF (the one that ended the DATA command)
    so that an empty message's lone dot is found like any other.  The search for
    the end stops at every line that starts with a dot, so it also learns whether
    there is stuffing to undo: most messages have none and are not copied again.
    Past the size limit it keeps only the last four bytes, enough to find the end.
    """

    limit: int
    future: asyncio.Future[bytes | None]
    buffer: bytearray | None = field(default_factory=lambda: bytearray(b"\r\n"))
    tail: bytes = b""
    scanned: int = 0
    stuffed: bool = False  # a line other than the last starts with a dot

    def feed(self, data: bytes) -> bytes | None:
        """Take bytes; returns what follows the end of data once it is found."""
        if self.buffer is None:  # oversize: only look for the end
            window = self.tail + data
            end = window.find(END_OF_DATA)
            if end < 0:
                self.tail = window[-4:]
                return None
            self.future.set_result(None)
            return window[end + 5:]
        buffer = self.buffer
        start = max(self.scanned - 2, 0)  # a CRLF may have come at the end of the last chunk
        buffer += data
        self.scanned = len(buffer)
        at = buffer.find(DOT_LINE, start)
        while at >= 0:
            after = buffer[at + 3 : at + 5]
            if after == b"\r\n":
                return self._end(at)
            if b"\r\n".startswith(after):  # too few bytes yet to tell: look here again
                self.scanned = at + 2
                break
            self.stuffed = True
            at = buffer.find(DOT_LINE, at + 3)
        if len(buffer) - 2 > self.limit:
            self.tail = bytes(buffer[-4:])
            self.buffer = None
        return None

    def _end(self, end: int) -> bytes:
        assert self.buffer is not None
        # The limit holds however the stream was cut into chunks: the chunk that
        # carries the end may also be the one that crosses it.
        content = None
        if end <= self.limit:
            with memoryview(self.buffer) as view:  # one copy, not a slice and then bytes
                content = bytes(view[2 : end + 2])
        if content is not None and self.stuffed:
            content = unstuff(content)
        rest = bytes(self.buffer[end + 5:])
        self.buffer = None
        self.future.set_result(content)
        return rest


def unstuff(wire: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2): drop the first dot of every line."""
    if b"\r\n." not in wire and not wire.startswith(b"."):
        return wire
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def has_bare_newline(content: bytes) -> bool:
    crlf = content.count(b"\r\n")
    return content.count(b"\r") != crlf or content.count(b"\n") != crlf


def normalize_newlines(content: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", content)


def _write(transport: asyncio.BaseTransport, data: bytes) -> None:
    # uvloop's transports write like asyncio's but are not WriteTransport subclasses.
    cast(asyncio.WriteTransport, transport).write(data)


def abort(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection at once (shutdown deadline), whatever loop made it."""
    if transport is not None and not transport.is_closing():
        cast(asyncio.WriteTransport, transport).abort()


def hop_count(content: bytes) -> int:
    """Received header fields in the header block (a loop shows as many of them)."""
    return len(_RECEIVED.findall(content, 0, header_end(content, HEADER_BLOCK_LIMIT)))


def has_long_line(content: bytes) -> bool:
    """A line of more than MAX_TEXT_LINE octets before its CRLF.

    Jumps from the last LF within reach to the next: a line too long shows as a
    stretch of MAX_TEXT_LINE + 2 octets without one.  About a hundred steps for
    100 KB, however short its lines, instead of one object per line.
    """
    reach = MAX_TEXT_LINE + 2
    size, start, rfind = len(content), 0, content.rfind
    while size - start >= reach:
        lf = rfind(b"\n", start, start + reach)
        if lf < 0:
            return True
        start = lf + 1
    return False


# <dot-atom@domain> and what follows: the common path, parsed here as email's address
# parser (which aiosmtpd uses for every MAIL and RCPT) would parse it, at a tenth the cost.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*([^( \t].*|)\Z", re.DOTALL)

# aiosmtpd releases whose SMTP.__init__ GatewaySMTP._init_from reproduces.
_FAST_INIT_VERSIONS = {"1.4.6"}


@dataclass(frozen=True)
class _Tables:
    """What aiosmtpd's SMTP.__init__ finds by introspection, for one protocol class and
    one handler object: the same for every connection of a listener."""

    smtp_functions: dict[str, Callable[..., Any]]
    handle_hooks: dict[str, Callable[..., Any]]
    auth_methods: dict[str, Any]
    ehlo_hook_ver: str | None
    auth_callback: Any

    @classmethod
    def of(cls, protocol: SMTP) -> _Tables:
        p = cast(Any, protocol)
        return cls({name: method.__func__ for name, method in p._smtp_methods.items()},
                   dict(p._handle_hooks), dict(p._auth_methods), p._ehlo_hook_ver,
                   p._auth_callback)


_TABLES: dict[tuple[type, Any], _Tables] = {}


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
        # the MX listener (no AUTH options) of a known aiosmtpd release: tables cached
        cacheable = kwargs.keys() <= {"tls_context"} and aiosmtpd.__version__ in _FAST_INIT_VERSIONS
        tables = _TABLES.get((type(self), handler)) if cacheable else None
        if tables is not None:
            self._init_from(tables, handler, options)
        else:
            super().__init__(handler, **options)
            if cacheable:
                _TABLES[(type(self), handler)] = _Tables.of(self)
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

    def _init_from(self, tables: _Tables, handler: Any, options: dict[str, Any]) -> None:
        """What ``SMTP.__init__`` (aiosmtpd 1.4.6) does for the MX listener, without
        looking the command, hook and AUTH tables up again: that introspection (dir(),
        getmembers on the protocol and the handler) took 45% of the event loop's Python
        time at one connection per message. Same attributes; tests/test_ingress_faults.py holds
        the two paths to the same state."""
        self.__ident__ = options["ident"]
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = options["data_size_limit"]
        self.enable_SMTPUTF8 = options["enable_SMTPUTF8"]
        self._decode_data = options["decode_data"]
        self.hostname = options["hostname"]
        self.tls_context = options.get("tls_context")
        self.require_starttls = self.tls_context and False  # as aiosmtpd: None without TLS
        self._timeout_duration = options["timeout"]
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = tables.auth_callback
        self._auth_required = False
        self._auth_methods = {name: type(attr)(types.MethodType(attr.method.__func__, self)
                                               if attr.is_builtin else attr.method,
                                               attr.is_builtin)
                              for name, attr in tables.auth_methods.items()}
        self._handle_hooks = tables.handle_hooks  # bound to the one shared handler
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = {name: types.MethodType(function, self)
                              for name, function in tables.smtp_functions.items()}
        self._enforce_call_limit = False

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
        tenants = ",".join(_state(envelope).tenants) if envelope is not None else ""
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


class Precheck(Protocol):
    """The decisions before the 250 (``gateway.pipeline.precheck.Precheck``)."""

    async def check(self, arrival: Arrival) -> Refusal | None: ...


@dataclass
class SessionState:
    """What the handler keeps per transaction, beside aiosmtpd's Envelope."""

    tenants: dict[str, list[str]] = field(default_factory=dict)
    overshoot: int = 0  # recipients refused for being past smtp.max_recipients


class IngressHandler:
    """Envelope policy and durable acceptance (aiosmtpd handler hooks)."""

    def __init__(
        self,
        settings: SMTPConfig,
        directory: TenantDirectory,
        store: Store,
        metrics: Metrics,
        precheck: Precheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        srs: Callable[[], SRS | None] = lambda: None,
        flow: InFlow | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.flow = flow  # slows new mail to the pipeline's pace while it is behind
        self.store = store
        self.metrics = metrics
        self.precheck = precheck  # None: every tenant takes what passes the envelope checks
        self.clock = clock
        self.srs = srs  # the SRS secrets in force: bounces to our rewritten senders

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return ehlo_lines(responses, auth=False)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        refusal = sender_refusal(self.store, address, mail_options)
        if refusal is not None:
            return refusal
        if self.flow is not None:
            await self.flow.admit()
        take_sender(envelope, address, mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = recipient_limit(server, envelope)
        if refusal is not None:
            return refusal
        verdict = self.directory.resolve(address, smtputf8=envelope.smtp_utf8, srs=self.srs())
        if not isinstance(verdict, Accepted):
            return refuse_rcpt(server, verdict.reply, verdict.reason)
        state = _state(envelope)
        group = state.tenants.setdefault(verdict.tenant_id, [])
        if verdict.address.lower() not in (r.lower() for r in group):
            group.append(verdict.address)
            envelope.rcpt_tos.append(verdict.address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = self.clock()
        smtp = cast(GatewaySMTP, server)
        data = envelope.original_content
        assert isinstance(data, bytes)
        now = utcnow()
        client = client_address(session)
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        if hop_count(data) >= self.settings.max_hops:
            return smtp.refuse_data(TOO_MANY_HOPS, "too_many_hops", len(data))
        groups = _state(envelope).tenants
        if self.precheck is not None:
            refusal = await self.precheck.check(Arrival(
                sender=mail_from, groups=tuple((t, tuple(r)) for t, r in groups.items()),
                data=data, client=client, helo=_safe_helo(session.host_name)))
            if refusal is not None:
                groups = {t: r for t, r in groups.items() if t not in refusal.tenants}
                if not groups:
                    return smtp.refuse_data(refusal.reply, refusal.reason, len(data))
        batch = [
            build_message(session, envelope, data, tenant_id=tenant_id, recipients=recipients,
                          hostname=self.settings.hostname, mail_from=mail_from, now=now,
                          client=client)
            for tenant_id, recipients in groups.items()
        ]
        try:
            await self.store.accept(batch)
        except TempFailure as exc:
            log.error("message from %s not stored: %s", client, exc)
            return smtp.refuse_data(QUEUE_WRITE_ERROR, "storage", len(data))
        return accepted(smtp, batch, data, self.clock() - started)


def message_id_of(content: bytes) -> str | None:
    """The Message-ID field's value (unfolded), from the header block only; None if none."""
    values = field_values(content, b"message-id", HEADER_BLOCK_LIMIT)
    if not values:
        return None
    return " ".join(values[0].decode("utf-8", "replace").split()) or None


def recipient_limit(server: SMTP, envelope: Envelope) -> str | None:
    """None while the transaction may take another recipient, else its 452.

    As Postfix (smtpd_recipient_overshoot_limit): the first
    smtp.recipient_overshoot_limit recipients past the limit in a transaction
    are not errors, so a client that sends too many still reaches DATA for the
    accepted ones and retries the rest later; each one past those counts, and a
    client that never stops is cut off at smtp.max_errors as for any error.
    """
    smtp = cast(GatewaySMTP, server)
    if len(envelope.rcpt_tos) < smtp.settings.max_recipients:
        return None
    state = _state(envelope)
    state.overshoot += 1
    if state.overshoot <= smtp.settings.recipient_overshoot_limit:
        smtp.excuse_reply()
    return refuse_rcpt(server, TOO_MANY_RCPTS, "too_many")


def refuse_rcpt(server: SMTP, reply: str, reason: str) -> str:
    smtp = cast(GatewaySMTP, server)
    smtp.metrics.series(smtp.metrics.smtp_recipients_refused, smtp.listener, reason).inc()
    return reply


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


def build_message(
    session: Session, envelope: Envelope, data: bytes, *, tenant_id: str,
    recipients: list[str], hostname: str, mail_from: str, now: Any, client: str,
    direction: str = "inbound", submitted_by: str | None = None,
) -> NewMessage:
    """One tenant's copy of an accepted message, with our trace header beside it."""
    message_id = new_id()
    helo = _safe_helo(session.host_name)
    protocol = _protocol(session, envelope)
    trace = received_header(helo=helo, client=client, hostname=hostname, protocol=protocol,
                            queue_id=message_id, recipients=recipients, when=now)
    return NewMessage(
        id=message_id, tenant_id=tenant_id, mail_from=mail_from, recipients=tuple(recipients),
        data=data, received_at=now, client_address=client, helo=helo,
        protocol=protocol, trace_header=trace, smtputf8=bool(envelope.smtp_utf8),
        direction=direction, submitted_by=submitted_by,
    )


def _state(envelope: Envelope) -> SessionState:
    state = getattr(envelope, "gateway_state", None)
    if state is None:
        state = SessionState()
        envelope.gateway_state = state  # type: ignore[attr-defined]
    return state


def _safe_helo(name: str | None) -> str:
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
