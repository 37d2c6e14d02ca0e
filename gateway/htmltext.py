"""A message as text for a person to read (``readable``: its plain part, else its HTML
part as text), and the text of an HTML document as a reader sees it (``html_text``, for
the search index too): no markup, nothing of what is not shown (scripts, styles, the
head), line breaks where blocks end.

One pass that never looks at a character twice: the standard library's HTMLParser
looks ahead for the end of every unfinished tag, and took minutes over a megabyte
of ``<script``.  Entities are decoded; what is left is plain text, never markup.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import html
import re

_TAG_NAME = re.compile(r"(/?)([A-Za-z][A-Za-z0-9]{0,30})")
_HIDDEN = frozenset({"script", "style", "head", "title", "template", "noscript"})
_BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                     "table", "blockquote", "pre", "hr"})


def html_text(doc: str) -> str:
    """The text of an HTML document as a reader sees it: no markup, nothing of what is
    not shown (scripts, styles, the head), line breaks where blocks end.  One pass
    that never looks at a character twice (a parser that looks ahead for the end of
    every unfinished tag takes minutes over a megabyte of ``<script``)."""
    out: list[str] = []
    hidden: str | None = None
    i, n, gt = 0, len(doc), -1
    while i < n:
        lt = doc.find("<", i)
        if lt < 0:
            lt = n
        if hidden is None:
            out.append(doc[i:lt])
        if lt == n:
            break
        if doc.startswith("<!--", lt):  # a comment; an unclosed one hides the rest
            end = doc.find("-->", lt + 4)
            i = n if end < 0 else end + 3
            continue
        m = _TAG_NAME.match(doc, lt + 1)
        if m is None:  # "<" that opens no tag is text
            if hidden is None:
                out.append("<")
            i = lt + 1
            continue
        if gt <= lt:
            gt = doc.find(">", lt)
            if gt < 0:  # a tag that never ends: nothing after it is shown
                break
        i = gt + 1
        closing, name = m.group(1), m.group(2).lower()
        if hidden is not None:
            if closing and name == hidden:
                hidden = None
        elif not closing and name in _HIDDEN:
            hidden = name
        elif name in _BREAKS:
            out.append("\n")
    return html.unescape("".join(out))


_BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")


def readable(raw: bytes) -> tuple[str, str]:
    """The text of a message and where it came from: its first plain-text part
    ("plain"), else its first HTML part as text ("html"), else ("", "none").  A
    charset Python does not know, or bytes that are not in it, read as replacement
    characters: a message is always readable."""
    return text_of(email.message_from_bytes(raw, policy=email.policy.default))


def text_of(mail: email.message.Message) -> tuple[str, str]:
    """``readable`` of a message already parsed (with ``email.policy.default``)."""
    if not isinstance(mail, email.message.EmailMessage):
        return "", "none"
    try:
        part = mail.get_body(preferencelist=("plain", "html"))
    except (LookupError, ValueError, IndexError):  # a broken structure
        part = None
    data = part.get_payload(decode=True) if part is not None else None
    if part is None or not isinstance(data, bytes):
        return "", "none"
    charset = part.get_content_charset() or "utf-8"
    try:
        text = data.decode(charset, "replace")
    except LookupError:
        text = data.decode("utf-8", "replace")
    text = text.replace("\r\n", "\n")
    if part.get_content_subtype() != "html":
        return text, "plain"
    lines = "\n".join(line.strip() for line in html_text(text).splitlines())
    return _BLANK_LINES.sub("\n\n", lines).strip(), "html"
