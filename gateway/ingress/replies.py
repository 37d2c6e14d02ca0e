"""The SMTP listeners' reply texts, and aiosmtpd's own replies reworded.

Every reply carries an enhanced status code (RFC 3463) and reads as Postfix's
would; ``rewrite_reply`` turns aiosmtpd's texts into ours as they go out.
"""

from __future__ import annotations

import re

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
