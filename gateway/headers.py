"""Where the header block of a raw message ends (CRLF line ends, as stored)."""

from __future__ import annotations


def header_end(raw: bytes, limit: int | None = None) -> int:
    """The offset just past the last header field's CRLF, where the blank line starts.

    A message without a blank line is all header: then the length of ``raw``, or
    ``limit`` when the search was bounded to the first ``limit`` bytes.
    """
    end = raw.find(b"\r\n\r\n") if limit is None else raw.find(b"\r\n\r\n", 0, limit)
    if end >= 0:
        return end + 2
    return len(raw) if limit is None else min(len(raw), limit)
