"""Send messages over SMTP and classify each result.

The reply decides what happens next: 2xx sent; 4xx, a dropped connection or a
timeout is temporary (retry later); 5xx is permanent.  Addresses with CR, LF,
spaces or controls never reach the wire: that is a permanent failure here.

The client is written for what delivery does, one message to one recipient
at a time on connections kept open between messages, as Postfix's smtp client
does it: MAIL FROM, RCPT TO and DATA go out in one write when the server
offers PIPELINING (RFC 2920), and the message, dot-stuffed, with its final dot
in another.  A copy thus costs two round trips on a kept connection, and the
message is not parsed or re-encoded here: what the delivery composed (CRLF
only) is what goes out.  STARTTLS as the target asks: never (``none``), when
offered (``opportunistic``), or always (``required``: a server that does not
offer it gets nothing).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
import time
from dataclasses import dataclass, field

from gateway.tenancy import has_unsafe_chars

SENT = "sent"
TEMPORARY = "temporary"
PERMANENT = "permanent"
_DOT_LINE = re.compile(rb"\n\.")  # a line that starts with a dot
REPLY_LINE = 4096  # bytes: a longer reply line is a broken server
QUIT_TIMEOUT = 2.0  # seconds to wait for QUIT's answer when closing


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    tls: str  # none | opportunistic | required
    verify: bool = True  # check the certificate (not for MX hosts found by lookup)
    name: str = "mx"  # in metrics and logs: the destination, subprocessor, relay or mx


@dataclass(frozen=True, slots=True)
class Result:
    outcome: str  # sent | temporary | permanent
    detail: str
    connected: bool = True  # False: no SMTP conversation happened (try the next host)


class ProtocolError(Exception):
    """The server said something that is not an SMTP reply, or the session could not
    be set up (greeting, EHLO, STARTTLS)."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    def detail(self) -> str:
        return _reply(self.code, self.text)


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"[:500]


@dataclass
class Connection:
    """One SMTP session, after its greeting and EHLO (and STARTTLS)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    timeout: float
    extensions: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    async def reply(self) -> Reply:
        """The next reply, its lines joined; ConnectionError when the server went away,
        TimeoutError after ``timeout``, ProtocolError for anything but a reply."""
        lines: list[str] = []
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    raise ConnectionError("the server closed the connection") from None
                except asyncio.LimitOverrunError:
                    raise ProtocolError("reply line too long") from None
                code, more, text = line[:3], line[3:4], line[4:].rstrip(b"\r\n")
                if not code.isdigit() or more not in (b" ", b"-", b"\r", b"\n"):
                    raise ProtocolError(f"not an SMTP reply: {line[:80]!r}")
                lines.append(text.decode("utf-8", "replace"))
                if more != b"-":
                    return Reply(int(code), "\n".join(lines))

    async def command(self, line: bytes) -> Reply:
        self.writer.write(line)
        return await self.reply()

    async def hello(self, helo: str) -> None:
        """EHLO (HELO when the server refuses it), and the extensions it offers."""
        reply = await self.command(b"EHLO %s\r\n" % helo.encode())
        if reply.code // 100 != 2:
            reply = await self.command(b"HELO %s\r\n" % helo.encode())
            if reply.code // 100 != 2:
                raise ProtocolError(f"HELO refused: {reply.detail()}")
            self.extensions = {}
            return
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            self.extensions[keyword.upper()] = params

    def close(self) -> None:
        self.writer.close()

    async def closed(self) -> None:
        """Close, and wait (briefly) until the socket is closed (a TLS one says goodbye)."""
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), QUIT_TIMEOUT)


def _stuffed(data: bytes) -> bytes:
    """The message as DATA sends it: dot-stuffed, ending in CRLF, then the final dot.

    Most messages have no line that starts with a dot: the regular expression finds
    that out at twice the speed of ``bytes.replace`` (which scans for its count first),
    and then the only copy made is the one that adds the end."""
    end = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    if data.startswith(b".") or _DOT_LINE.search(data) is not None:
        data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    return data + end


def _opened_for(target: Target) -> tuple[str, int, str, bool]:
    return target.host, target.port, target.tls, target.verify


class Sender:
    """Sends over SMTP, keeping connections to each target open between messages.

    A copy or route to the same relay or destination reuses an idle connection
    instead of a new TCP connection, greeting, EHLO and QUIT each time.  An idle
    connection is used as it is, without a NOOP first (a round trip per message):
    one the peer closed meanwhile (or closes now, with 421) fails before its first
    reply, before anything of the message was sent, and is replaced once.
    """

    def __init__(self, *, helo: str, reply_timeout: float, per_server: int = 20,
                 idle_time: float = 30.0) -> None:
        self.helo = helo
        self.reply_timeout = reply_timeout
        self.per_server = per_server  # connections to one host and port at a time, at most
        self.idle_time = idle_time
        # Idle connections by what they were opened for (a target's name is only its
        # label: the relay named as a destination shares them).
        self._idle: dict[tuple[str, int, str, bool], list[tuple[float, Connection]]] = {}
        self._tls: dict[bool, ssl.SSLContext] = {}
        # A server's connections in use (a semaphore, by host and port: the same relay
        # may be named as relay, destination and subprocessor) and the sends that hold
        # or wait for one; both go when the last send to the server ends.
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._users: collections.Counter[tuple[str, int]] = collections.Counter()

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        context = self._tls.get(verify)
        if context is None:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls[verify] = context
        return context

    async def _connect(self, target: Target) -> Connection:
        async with asyncio.timeout(self.reply_timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port,
                                                           limit=REPLY_LINE)
        conn = Connection(reader, writer, self.reply_timeout)
        try:
            greeting = await conn.reply()
            if greeting.code != 220:
                raise ProtocolError(f"greeting: {greeting.detail()}")
            await conn.hello(self.helo)
            if target.tls == "none":
                return conn
            if "STARTTLS" not in conn.extensions:
                if target.tls == "required":
                    raise ProtocolError("the server does not offer STARTTLS, which is "
                                        "required for this destination")
                return conn
            reply = await conn.command(b"STARTTLS\r\n")
            if reply.code != 220:
                if target.tls == "required":
                    raise ProtocolError(f"STARTTLS refused: {reply.detail()}")
                return conn
            async with asyncio.timeout(self.reply_timeout):
                await writer.start_tls(self._tls_context(target.verify),
                                       server_hostname=target.host)
            await conn.hello(self.helo)
        except Exception:
            await conn.closed()
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _take(self, target: Target) -> Connection | None:
        pool = self._idle.get(_opened_for(target), [])
        now = time.monotonic()
        while pool:
            since, conn = pool.pop()
            if conn.usable and now - since < self.idle_time:
                return conn
            conn.close()
        return None

    def _give_back(self, target: Target, conn: Connection) -> None:
        pool = self._idle.setdefault(_opened_for(target), [])
        if conn.usable and len(pool) < self.per_server:
            pool.append((time.monotonic(), conn))
        else:
            conn.close()

    async def send(self, target: Target, *, sender: str, recipient: str,
                   data: bytes) -> Result:
        """One message to one recipient; sent again only on a fresh connection, and only
        when a kept one failed before its first reply.  Waits while ``per_server``
        connections to the target's host and port are in use (as Postfix's
        default_destination_concurrency_limit, so that the copies in hand do not open
        as many connections to one relay)."""
        if has_unsafe_chars(recipient) or (sender and has_unsafe_chars(sender)):
            return Result(PERMANENT, "address contains CR, LF, spaces or control characters")
        server = (target.host, target.port)
        slot = self._slots.get(server)
        if slot is None:
            slot = self._slots[server] = asyncio.Semaphore(self.per_server)
        self._users[server] += 1
        try:
            async with slot:
                return await self._send(target, sender, recipient, data)
        finally:
            self._users[server] -= 1
            if not self._users[server]:
                del self._users[server], self._slots[server]

    async def _send(self, target: Target, sender: str, recipient: str, data: bytes
                    ) -> Result:
        conn = self._take(target)
        if conn is not None:
            result = await self._transaction(target, conn, sender, recipient, data,
                                             kept=True)
            if result is not None:
                return result
        try:
            conn = await self._connect(target)
        except (ProtocolError, OSError, TimeoutError, ssl.SSLError) as exc:
            where = f"{target.host}:{target.port}"
            return Result(TEMPORARY, f"{where}: {type(exc).__name__}: {exc}"[:500],
                          connected=False)
        result = await self._transaction(target, conn, sender, recipient, data, kept=False)
        assert result is not None
        return result

    async def _transaction(self, target: Target, conn: Connection, sender: str,
                           recipient: str, data: bytes, *, kept: bool) -> Result | None:
        """MAIL, RCPT, DATA and the message; None: a kept connection turned out closed
        before anything was answered (try a fresh one)."""
        utf8 = not (sender.isascii() and recipient.isascii())
        if utf8 and "SMTPUTF8" not in conn.extensions:
            self._give_back(target, conn)
            return Result(PERMANENT, "553 5.6.7 the address needs SMTPUTF8, which the "
                                     "server does not offer")
        options = b""
        if "SIZE" in conn.extensions:
            options += b" SIZE=%d" % len(data)
        if utf8:
            options += b" SMTPUTF8"
        mail = b"MAIL FROM:<%s>%s\r\n" % (sender.encode(), options)
        rcpt = b"RCPT TO:<%s>\r\n" % recipient.encode()
        pipelining = "PIPELINING" in conn.extensions
        answered = False
        try:
            first = await conn.command(mail + rcpt + b"DATA\r\n" if pipelining else mail)
            answered = True
            if kept and first.code == 421:  # closing the session it had kept open
                conn.close()
                return None
            replies = [first]
            if pipelining:
                replies += [await conn.reply(), await conn.reply()]
            elif first.code == 250:
                replies.append(await conn.command(rcpt))
                if replies[1].code in (250, 251):
                    replies.append(await conn.command(b"DATA\r\n"))
            refused = next((r for r, ok in zip(replies, ((250,), (250, 251), (354,)),
                                               strict=False) if r.code not in ok), None)
            if refused is not None:
                if len(replies) == 3 and replies[2].code == 354:
                    # DATA accepted though MAIL or RCPT was refused: end it, empty
                    await conn.command(b".\r\n")
                await self._reset(target, conn, refused)
                return _classify(refused)
            final = await conn.command(_stuffed(data))
        except (ConnectionError, OSError, TimeoutError, ProtocolError, ssl.SSLError) as exc:
            conn.close()
            if kept and not answered:
                return None
            return Result(TEMPORARY, f"{type(exc).__name__}: {exc}"[:500])
        if final.code == 421:
            conn.close()
        else:
            self._give_back(target, conn)
        return _classify(final)

    async def _reset(self, target: Target, conn: Connection, refused: Reply) -> None:
        """RSET after a refusal; the connection is kept only when that works."""
        if refused.code == 421:
            conn.close()
            return
        try:
            reply = await conn.command(b"RSET\r\n")
        except (ConnectionError, OSError, TimeoutError, ProtocolError, ssl.SSLError):
            conn.close()
            return
        if reply.code == 250:
            self._give_back(target, conn)
        else:
            conn.close()

    async def close(self) -> None:
        conns = [conn for pool in self._idle.values() for _, conn in pool]
        self._idle.clear()
        for conn in conns:
            if conn.usable:
                conn.timeout = QUIT_TIMEOUT
                try:
                    await conn.command(b"QUIT\r\n")
                except (ConnectionError, OSError, TimeoutError, ProtocolError, ssl.SSLError):
                    pass
            await conn.closed()


def _classify(reply: Reply) -> Result:
    if 200 <= reply.code < 300:
        return Result(SENT, reply.detail())
    if 500 <= reply.code < 600:
        return Result(PERMANENT, reply.detail())
    return Result(TEMPORARY, reply.detail())
