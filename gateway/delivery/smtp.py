"""Send one message to one recipient over SMTP (aiosmtplib) and classify the result.

The reply decides what happens next: 2xx sent; 4xx, a dropped connection or a
timeout is temporary (retry later); 5xx is permanent.  Addresses with CR, LF,
spaces or controls never reach the wire: that is a permanent failure here.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Result:
    outcome: str  # sent | temporary | permanent
    detail: str


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"[:500]


async def send(target: Target, *, helo: str, sender: str, recipient: str, data: bytes,
               reply_timeout: float) -> Result:
    if has_unsafe_chars(recipient) or (sender and has_unsafe_chars(sender)):
        return Result(PERMANENT, "address contains CR, LF, spaces or control characters")
    start_tls = {"none": False, "opportunistic": None, "required": True}[target.tls]
    client = aiosmtplib.SMTP(hostname=target.host, port=target.port, local_hostname=helo,
                             timeout=reply_timeout, start_tls=start_tls, validate_certs=True)
    try:
        await client.connect()
        errors, message = await client.sendmail(sender, [recipient], data)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients[0]
        return _classify(refused.code, refused.message)
    except aiosmtplib.SMTPResponseException as exc:
        return _classify(exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Result(TEMPORARY, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
    if errors:
        response = next(iter(errors.values()))
        return _classify(response.code, response.message)
    return Result(SENT, message[:500])


def _classify(code: int, message: str) -> Result:
    if 200 <= code < 300:
        return Result(SENT, _reply(code, message))
    if 500 <= code < 600:
        return Result(PERMANENT, _reply(code, message))
    return Result(TEMPORARY, _reply(code, message))
