"""Reading the header block of a raw message (CRLF line ends, as stored)."""

from __future__ import annotations

import re
from functools import cache


def header_end(raw: bytes, limit: int | None = None) -> int:
    """The offset just past the last header field's CRLF, where the blank line starts.

    A message without a blank line is all header: then the length of ``raw``, or
    ``limit`` when the search was bounded to the first ``limit`` bytes.
    """
    end = raw.find(b"\r\n\r\n") if limit is None else raw.find(b"\r\n\r\n", 0, limit)
    if end >= 0:
        return end + 2
    return len(raw) if limit is None else min(len(raw), limit)


@cache
def _field(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"(?im)^" + re.escape(name) + rb"[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")


def field_values(raw: bytes, name: bytes, limit: int | None = None) -> list[bytes]:
    """The values of every header field called ``name`` (any case), top first, each
    with its continuation lines, as it is in the message."""
    return _field(name).findall(raw, 0, header_end(raw, limit))


def authserv_id_of(value: bytes) -> bytes:
    """The authserv-id an Authentication-Results value names (RFC 8601 2.2), lower case."""
    words = value.split(b";", 1)[0].split()
    return words[0].lower() if words else b""
