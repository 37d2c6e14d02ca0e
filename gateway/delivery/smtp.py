"""Send messages over SMTP (aiosmtplib) and classify each result.

The reply decides what happens next: 2xx sent; 4xx, a dropped connection or a
timeout is temporary (retry later); 5xx is permanent.  Addresses with CR, LF,
spaces or controls never reach the wire: that is a permanent failure here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiosmtplib

from gateway.tenancy import has_unsafe_chars

SENT = "sent"
TEMPORARY = "temporary"
PERMANENT = "permanent"


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


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"[:500]


class Sender:
    """Sends over SMTP, keeping connections to each target open between messages.

    A copy or route to the same relay or destination reuses an idle connection
    instead of a new TCP connection, greeting, EHLO and QUIT each time.  A
    connection the peer has closed meanwhile is replaced once, transparently.
    """

    def __init__(self, *, helo: str, reply_timeout: float, max_idle: int = 20,
                 idle_time: float = 30.0) -> None:
        self.helo = helo
        self.reply_timeout = reply_timeout
        self.max_idle = max_idle
        self.idle_time = idle_time
        self._idle: dict[Target, list[tuple[float, aiosmtplib.SMTP]]] = {}

    async def _connect(self, target: Target) -> aiosmtplib.SMTP:
        start_tls = {"none": False, "opportunistic": None, "required": True}[target.tls]
        client = aiosmtplib.SMTP(hostname=target.host, port=target.port,
                                 local_hostname=self.helo, timeout=self.reply_timeout,
                                 start_tls=start_tls, validate_certs=target.verify)
        await client.connect()
        return client

    def _take(self, target: Target) -> aiosmtplib.SMTP | None:
        pool = self._idle.get(target, [])
        now = time.monotonic()
        while pool:
            since, client = pool.pop()
            if client.is_connected and now - since < self.idle_time:
                return client
            client.close()
        return None

    def _give_back(self, target: Target, client: aiosmtplib.SMTP) -> None:
        pool = self._idle.setdefault(target, [])
        if client.is_connected and len(pool) < self.max_idle:
            pool.append((time.monotonic(), client))
        else:
            client.close()

    async def send(self, target: Target, *, sender: str, recipient: str,
                   data: bytes) -> Result:
        """One message to one recipient; never retried once MAIL FROM has been answered."""
        if has_unsafe_chars(recipient) or (sender and has_unsafe_chars(sender)):
            return Result(PERMANENT, "address contains CR, LF, spaces or control characters")
        client = self._take(target)
        if client is not None:
            # An idle connection is used as it is, without a NOOP first (a round trip
            # per message): one the peer closed meanwhile (or closes now, with 421)
            # fails at MAIL FROM, before anything of the message was sent, and is
            # replaced once.
            try:
                await _mail(client, sender, data)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code != 421:
                    return self._ended(target, client, _classify(exc.code, exc.message),
                                       await _reset(client))
                client.close()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
            else:
                return await self._rest(target, client, recipient, data)
        try:
            client = await self._connect(target)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            where = f"{target.host}:{target.port}"
            return Result(TEMPORARY, f"{where}: {type(exc).__name__}: {exc}"[:500],
                          connected=False)
        try:
            await _mail(client, sender, data)
        except aiosmtplib.SMTPResponseException as exc:
            return self._ended(target, client, _classify(exc.code, exc.message),
                               await _reset(client))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            return Result(TEMPORARY, f"{type(exc).__name__}: {exc}"[:500])
        return await self._rest(target, client, recipient, data)

    async def _rest(self, target: Target, client: aiosmtplib.SMTP, recipient: str,
                    data: bytes) -> Result:
        """RCPT TO and DATA of a transaction whose MAIL FROM was accepted."""
        try:
            await client.rcpt(recipient)
            response = await client.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return self._ended(target, client, _classify(exc.code, exc.message),
                               await _reset(client))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            return Result(TEMPORARY, f"{type(exc).__name__}: {exc}"[:500])
        return self._ended(target, client, _classify(response.code, response.message), True)

    def _ended(self, target: Target, client: aiosmtplib.SMTP, result: Result,
               reusable: bool) -> Result:
        if reusable:
            self._give_back(target, client)
        else:
            client.close()
        return result

    async def close(self) -> None:
        for pool in self._idle.values():
            for _, client in pool:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
        self._idle.clear()


async def _mail(client: aiosmtplib.SMTP, sender: str, data: bytes) -> None:
    """MAIL FROM, with the message's size when the server takes SIZE (RFC 1870): the
    bytes are CRLF-only already, as they go out."""
    options = [f"SIZE={len(data)}"] if client.supports_extension("size") else []
    await client.mail(sender, options=options)


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET after a refusal; False when the connection is not worth keeping."""
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return False
    return True


def _classify(code: int, message: str) -> Result:
    if 200 <= code < 300:
        return Result(SENT, _reply(code, message))
    if 500 <= code < 600:
        return Result(PERMANENT, _reply(code, message))
    return Result(TEMPORARY, _reply(code, message))
