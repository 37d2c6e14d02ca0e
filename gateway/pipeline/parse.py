"""Parse stored messages with mail-parser, in worker processes, with a time bound.

mail-parser has had uncaught-exception and ReDoS advisories, and a hostile
message (MIME nested 1,000 deep, 100,000 parts) can take seconds of CPU.  So
parsing never runs on the event loop or in the daemon's process: each worker
process parses one message at a time, a parse that overruns its time bound gets
its process killed and replaced, and any exception means "unparseable" — the
message stays stored and is flagged, never lost.  The pipeline sends a few
messages per call, within the bound of one parse; when such a call overruns,
each of its messages is parsed again in a call of its own.
"""

from __future__ import annotations

import base64
import email.utils
import itertools
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.headers import addresses_in, header_addresses, header_end, header_text
from gateway.htmltext import html_text
from gateway.policy.classify import Classifier
from gateway.query import clean
from gateway.records import ParsedFields
from gateway.workers import Overran, ProcessEnded, WorkerError, WorkerPool

log = logging.getLogger(__name__)

MAX_FIELD = 998  # longest header text we keep per field (RFC 5322 line length)
MAX_ADDRESSES = 1000  # header addresses indexed per message
MAX_ATTACHMENTS = 1000
MAX_HEADERS = 500  # header fields kept for workflow rules


def _clip(text: Any) -> str | None:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD]


_SPECIALS = re.compile(r'[][\\()<>@,:;".]')


def _display(pairs: Any) -> str | None:
    """Mailboxes as a person reads them, UTF-8 as it is.  Not email.utils.formataddr:
    it encodes a non-ASCII name (RFC 2047) and refuses a non-ASCII address with
    UnicodeEncodeError, which SMTPUTF8 mail (RFC 6532) has."""
    if not pairs:
        return None
    shown = []
    for name, address in pairs:
        if name and _SPECIALS.search(name):
            name = f'"{email.utils.quote(name)}"'
        shown.append(f"{name} <{address}>" if name else address)
    return _clip(", ".join(shown))


def _decoded(value: Any) -> str:
    """A header value (raw, as ``raw_items()`` gives it) as text, RFC 2047 words
    decoded (raw text if that fails)."""
    import email.header

    text = header_text(value)
    if "=?" not in text:  # nothing encoded: most headers, and the cheap case
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


HEADER_BLOCK_LIMIT = 65536  # bytes of header looked at before the message is stored


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """Header fields of a message, decoded, from at most HEADER_BLOCK_LIMIT bytes.

    Cheap enough for the end of DATA: only the header block, no MIME structure.
    """
    return _fields(_header_block(raw[: header_end(raw, HEADER_BLOCK_LIMIT)]))


def _header_block(block: bytes) -> Any:
    """A header block alone as the email package reads it (compat32, no body)."""
    import email.parser
    import email.policy

    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block)


def _fields(headers: Any) -> list[tuple[str, str]]:
    """The header fields workflow rules match on: name in lower case, decoded value."""
    return [(str(name).lower()[:MAX_FIELD], _clip(_decoded(value)) or "")
            for name, value in list(headers.raw_items())[:MAX_HEADERS]]


_TAG = re.compile(r"<[^>]{0,2000}>")


def _texts(mail: Any) -> list[str]:
    """What the classifier reads: the subject and the text parts (HTML without tags)."""
    texts = [str(mail.subject or "")]
    texts += [str(t) for t in mail.text_plain]
    texts += [_TAG.sub(" ", str(t)) for t in mail.text_html]
    return texts


# characters of a message's text kept for the search index: some 2,500 words, where
# a long body is mostly the thread it quotes; indexing costs by the character
MAX_TEXT = 16384


def _index_text(mail: Any) -> str:
    """The text the search index holds of a message: its text parts (the text of the
    HTML parts when there is no plain text) and the text of its text attachments, at most
    MAX_TEXT characters."""
    parts = [str(t) for t in mail.text_plain] or [html_text(str(t)[:4 * MAX_TEXT])
                                                  for t in mail.text_html]
    for a in mail.attachments[:MAX_ATTACHMENTS]:
        if sum(map(len, parts)) >= MAX_TEXT:
            break
        if str(a.get("mail_content_type") or "").lower().startswith("text/"):
            parts.append(_attachment_text(a))
    return clean("\n".join(parts)[:MAX_TEXT])


def _attachment_text(attachment: dict[str, Any]) -> str:
    payload = attachment.get("payload") or ""
    if not attachment.get("binary"):
        return str(payload)[:MAX_TEXT]
    try:  # mail-parser keeps a base64 part as it came
        data = base64.b64decode(str(payload)[:MAX_TEXT * 2], validate=False)
        return data.decode(str(attachment.get("charset") or "utf-8"), "replace")
    except (ValueError, LookupError):
        return ""


def _message(raw: bytes) -> Any:
    """The message as ``email.message_from_bytes`` gives it.  A body that is neither
    multipart nor an enclosed message is taken whole rather than line by line: the
    email package's parser spends most of a large message's parse walking such a body
    (a 100 KiB text, 1,300 lines), and what it would give is the body as it is.  Any
    doubt (no blank line in the first HEADER_BLOCK_LIMIT bytes, a defect in the header
    block, a MIME structure) and the whole message goes through the parser."""
    import email

    blank = raw.find(b"\r\n\r\n", 0, HEADER_BLOCK_LIMIT)  # header_end cannot say "none"
    if blank >= 0:
        head = _header_block(raw[:blank + 2])
        if not head.defects and head.get_content_maintype() not in ("multipart", "message"):
            head.set_payload(raw[blank + 4:].decode("ascii", "surrogateescape"))
            return head
    return email.message_from_bytes(raw)


def parse_message(raw: bytes, classifier: Classifier | None = None) -> dict[str, Any]:
    """Pure parse of one message; returns plain data (picklable).

    With a ``classifier``, ``findings`` lists the special categories of
    personal data found in the text (see gateway.policy.classify).
    """
    import mailparser

    try:
        mail = mailparser.MailParser(_message(raw))
        headers = mail.message
        addresses = _indexed(addresses_in(headers))
        attachments = [
            {
                "filename": _clip(a.get("filename")),
                "content_type": _clip(a.get("mail_content_type")),
                "size": len(a.get("payload") or ""),
            }
            for a in mail.attachments[:MAX_ATTACHMENTS]
        ]
        date = headers.get("date")
        return {
            "message_id": _clip(mail.message_id),
            "header_from": _display(mail.from_),
            "header_to": _display(mail.to),
            "header_cc": _display(mail.cc),
            "subject": _clip(mail.subject),
            "date": _clip(header_text(date)) if date is not None else None,
            "attachments": attachments,
            "defects": sorted(mail.defects_categories)[:100],
            "parse_failed": False,
            "addresses": addresses,
            "headers": _fields(headers),
            "findings": classifier.findings(_texts(mail)) if classifier else [],
            "text": _index_text(mail),
        }
    except Exception as exc:  # any failure of the third-party parser = unparseable
        return failed(f"{exc.__class__.__name__}: {str(exc)[:200]}", raw_addresses(raw))


def raw_addresses(raw: bytes) -> list[tuple[str, str]]:
    """The addresses of a message mail-parser could not parse, read from its header
    block by the email package alone: search and erasure find it by them all the same."""
    return _indexed(header_addresses(raw))


def _indexed(addresses: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(role, address[:MAX_FIELD])
            for role, address in itertools.islice(addresses, MAX_ADDRESSES)]


def failed(reason: str, addresses: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {
        "message_id": None, "header_from": None, "header_to": None, "header_cc": None,
        "subject": None, "date": None, "attachments": [], "defects": [f"unparseable: {reason}"],
        "parse_failed": True, "addresses": addresses or [], "headers": [], "findings": [],
        "text": "",
    }


def to_fields(result: dict[str, Any]) -> ParsedFields:
    return ParsedFields(**{k: result[k] for k in ParsedFields.__slots__})


def parse_many_in_worker(context: object, items: list[tuple[bytes, Classifier | None]]
                         ) -> list[dict[str, Any]]:
    """``parse_message`` as a worker process runs it (the pool's context is not used),
    on one or several messages, each result with the seconds its parse took."""
    results = []
    for raw, classifier in items:
        started = time.perf_counter()
        result = parse_message(raw, classifier)
        result["seconds"] = time.perf_counter() - started
        results.append(result)
    return results


def _raw_addresses_in_worker(context: object, raw: bytes) -> list[tuple[str, str]]:
    return raw_addresses(raw)


class ParserPool:
    """Parsing in the daemon's worker processes (``size`` of them take part), one
    call at a time in each; ``parse()`` and ``parse_many()`` never block the loop and
    never raise."""

    def __init__(self, pool: WorkerPool[Any], size: int, timeout: float) -> None:
        assert 1 <= size <= pool.size, "parsing needs a worker process"
        self.pool = pool
        self.size = size
        self.timeout = timeout

    async def parse(self, raw: bytes, classifier: Classifier | None = None) -> dict[str, Any]:
        reason = ""
        # A process may end with a parse in hand for another call's sake (one that
        # overran, or was killed from outside): such a parse is tried once more.
        for _ in range(2):
            try:
                [result] = await self.pool.run_alone(parse_many_in_worker,
                                                      [(raw, classifier)],
                                                      bound=self.timeout, among=self.size)
                return result
            except Overran:
                return await self._unparseable(raw, f"parse took longer than {self.timeout:g} s")
            except ProcessEnded as exc:
                reason = f"parser {exc}"
            except WorkerError as exc:  # raised in the process: MemoryError, pickling
                return await self._unparseable(raw, str(exc))
        return await self._unparseable(raw, reason)

    async def _unparseable(self, raw: bytes, reason: str) -> dict[str, Any]:
        """The result for a message whose parse did not come back: flagged, with the
        addresses of its header block (read in a worker process too, within the same
        bound; none when even that fails)."""
        try:
            addresses = await self.pool.run_alone(_raw_addresses_in_worker, raw,
                                                  bound=self.timeout, among=self.size)
        except WorkerError as exc:  # Overran and ProcessEnded too
            log.warning("reading the addresses of an unparseable message failed: %s", exc)
            addresses = []
        return failed(reason, addresses)

    async def parse_many(self, items: Sequence[tuple[bytes, Classifier | None]]
                         ) -> list[dict[str, Any]]:
        """Messages parsed in one call to one process, within the bound of one parse
        (the caller keeps a batch small); when that call fails or overruns, each is
        parsed on its own, so that only a message that overruns alone is flagged."""
        if len(items) == 1:
            return [await self.parse(*items[0])]
        try:
            return await self.pool.run_alone(parse_many_in_worker, list(items),
                                              bound=self.timeout, among=self.size)
        except WorkerError as exc:  # Overran and ProcessEnded too
            log.warning("parsing %d messages in one call failed (%s); parsing them one "
                        "by one", len(items), exc)
        return [await self.parse(raw, classifier) for raw, classifier in items]
