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

    async def _ready(self, target: Target) -> aiosmtplib.SMTP:
        """An idle connection that still answers NOOP, or a new one."""
        while (client := self._take(target)) is not None:
            try:
                await client.noop()
                return client
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
        return await self._connect(target)

    async def send(self, target: Target, *, sender: str, recipient: str,
                   data: bytes) -> Result:
        """One message to one recipient; never retried once MAIL FROM has been sent."""
        if has_unsafe_chars(recipient) or (sender and has_unsafe_chars(sender)):
            return Result(PERMANENT, "address contains CR, LF, spaces or control characters")
        client: aiosmtplib.SMTP | None = None
        try:
            client = await self._ready(target)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            where = f"{target.host}:{target.port}"
            return Result(TEMPORARY, f"{where}: {type(exc).__name__}: {exc}"[:500],
                          connected=False)
        try:
            result, reusable = await _transaction(client, sender, recipient, data)
        except aiosmtplib.SMTPResponseException as exc:
            if client is not None:
                client.close()
            return _classify(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if client is not None:
                client.close()
            return Result(TEMPORARY, f"{type(exc).__name__}: {exc}"[:500])
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


async def _transaction(client: aiosmtplib.SMTP, sender: str, recipient: str,
                       data: bytes) -> tuple[Result, bool]:
    """One MAIL/RCPT/DATA; returns the result and whether the connection is reusable."""
    try:
        errors, message = await client.sendmail(sender, [recipient], data)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients[0]
        return _classify(refused.code, refused.message), await _reset(client)
    except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
        return _classify(exc.code, exc.message), await _reset(client)
    if errors:
        response = next(iter(errors.values()))
        return _classify(response.code, response.message), await _reset(client)
    return Result(SENT, _reply(250, message)), True  # sendmail only succeeds on 250


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
