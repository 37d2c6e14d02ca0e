"""The bytes a delivery sends: our trace header, then the original, adjusted per kind.

Pure.  Every copy drops any Bcc header the sender's client left in the original
(Bcc never appears in delivered headers).  A Cc copy names its address in the
Cc header: appended to the existing Cc field, or as a new field; unless a DKIM
or ARC signature of the original covers Cc, which that would break.  Nothing
else of the original changes, except that Authentication-Results fields naming
our authserv-id are removed: only we write those, so such a field is forged.
Stored messages are already CRLF-only, so what this returns has no bare CR or
LF; SMTP dot-stuffing is the sender's job.
"""

from __future__ import annotations

import re

from gateway.headers import authserv_id_of, header_end

_FIELD_START = re.compile(rb"(?m)^(?=[^ \t\r\n])")


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block (with its final CRLF) and the rest (blank line and body)."""
    end = 0 if raw.startswith(b"\r\n") else header_end(raw)
    return raw[:end], raw[end:]


def _fields(header: bytes) -> list[bytes]:
    """Header fields, each with its continuation lines."""
    starts = [m.start() for m in _FIELD_START.finditer(header)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [header[a:b] for a, b in zip(starts, [*starts[1:], len(header)], strict=True)
            if header[a:b]]


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


_SIGNERS = (b"dkim-signature", b"arc-message-signature")
_H_TAG = re.compile(rb"(?:^|;)\s*h\s*=([^;]*)")


def signed_names(fields: list[bytes]) -> set[bytes]:
    """Header names a DKIM or ARC signature of the message covers (its h= tag)."""
    names: set[bytes] = set()
    for f in fields:
        if _name(f) in _SIGNERS:
            match = _H_TAG.search(f.split(b":", 1)[1])
            if match is not None:
                names.update(n.strip().lower() for n in match.group(1).split(b":"))
    return names


def compose(trace_header: str, raw: bytes, *, kind: str, recipient: str,
            authserv_id: str | None = None) -> bytes:
    header, rest = _split(raw)
    # An Authentication-Results field in the original that names our authserv-id is
    # forged: only we add those (RFC 8601 5).
    ours = authserv_id.lower().encode() if authserv_id else None
    fields = [f for f in _fields(header) if _name(f) != b"bcc"
              and not (ours and _name(f) == b"authentication-results"
                       and authserv_id_of(f.split(b":", 1)[1]) == ours)]
    # A copy must not break the author's signature: when one covers Cc, the copy's
    # address is not written into it (the envelope still carries the copy).
    if kind == "cc" and b"cc" not in signed_names(fields):
        address = recipient.encode("utf-8")
        for i, f in enumerate(fields):
            if _name(f) == b"cc":
                value = f.rstrip(b"\r\n")
                fields[i] = value + b",\r\n " + address + b"\r\n"
                break
        else:
            fields.append(b"Cc: " + address + b"\r\n")
    return b"".join([trace_header.encode("utf-8"), *fields, rest])  # one copy of the body
