"""Reading the header block of a raw message (CRLF line ends, as stored)."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterator
from functools import cache

# The fields whose addresses the index holds (role, field name): what search and
# erasure find a person by, besides the envelope.
ADDRESS_FIELDS = (("from", "from"), ("sender", "sender"), ("reply_to", "reply-to"),
                  ("to", "to"), ("cc", "cc"), ("bcc", "bcc"),
                  ("resent_from", "resent-from"), ("resent_to", "resent-to"),
                  ("resent_cc", "resent-cc"), ("resent_bcc", "resent-bcc"))
# What separates the words of an address field, for the fallback scan in _addresses.
_NOT_ADDRESS = str.maketrans({c: " " for c in "<>,;:()\"\\[]\t\r\n"})


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


def from_addresses(raw: bytes) -> list[str] | None:
    """The address of every From field of a raw message (lower case), top first; None
    when a From field holds something that cannot be read as addresses: parsers may
    read such a field differently, so nothing is decided on it."""
    out: list[str] = []
    for value in field_values(raw, b"from"):
        text = value.decode("utf-8", "replace").replace("\r\n", "")
        try:
            found = [a.strip().lower() for _, a in email.utils.getaddresses([text])]
        except RecursionError:  # comments nested a thousand deep
            return None
        if not found or not all("@" in a for a in found):
            return None
        out += found
    return out


def header_text(value: object) -> str:
    """A header value as text.  The email package keeps the 8-bit bytes of a field as
    surrogate escapes; in SMTPUTF8 mail (RFC 6532) they are UTF-8, decoded here (U+FFFD
    for bytes that are not UTF-8)."""
    text = str(value)
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def addresses_in(fields: email.message.Message) -> Iterator[tuple[str, str]]:
    """(role, address) of each address in the address fields of a parsed header
    block, lower case, role by role."""
    # raw_items(): a field with 8-bit bytes comes back from get_all() as a Header
    # whose str() has already replaced them with U+FFFD.
    values: dict[str, list[str]] = {}
    for name, value in fields.raw_items():
        values.setdefault(name.lower(), []).append(value)
    for role, name in ADDRESS_FIELDS:
        for value in values.get(name, ()):
            for address in _addresses(header_text(value)):
                yield role, address


def header_addresses(raw: bytes) -> list[tuple[str, str]]:
    """``addresses_in`` the header block of a raw message, read by the email package
    alone: for mail that mail-parser could not parse, or has not parsed yet."""
    block = raw[:header_end(raw)]
    return list(addresses_in(
        email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block)))


def _addresses(value: str) -> list[str]:
    try:
        pairs = email.utils.getaddresses([value])
    except RecursionError:  # comments nested a thousand deep
        # Every word with an @ then: linear, and nothing that names someone is missed.
        return [w.lower() for w in value.translate(_NOT_ADDRESS).split() if "@" in w]
    return [a.strip().lower() for _, a in pairs if a.strip()]
