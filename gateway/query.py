"""The search query language, read into plain data: the store turns a ``Query`` into
SQLite FTS5 or PostgreSQL full-text terms.

Words match anywhere (subject, addresses, text, attachment names); every part must
match. ``"a phrase"`` matches the words in that order, ``word*`` words that begin so.
``from:``, ``to:`` (To, Cc and the envelope recipients) and ``subject:`` restrict a
word, a prefix or a phrase to one field; ``tag:NAME``, ``before:DATE``,
``after:DATE`` (``YYYY-MM-DD``, UTC; before is exclusive, after inclusive) and
``has:attachment`` filter. Text is compared as ``words`` gives it: case and accents
folded, anything but letters and digits a space between words.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

MAX_QUERY = 500  # characters of a query
MAX_PAGE = 100  # results of one page at most
MAX_PAGES = 1000  # pages of one query: ranked results are read from the first
MAX_TERMS = 16  # words, phrases and prefixes, together
MIN_PREFIX = 2  # letters before a *: "a*" would match most of the index
FIELDS = ("from", "to", "subject")
FILTERS = ("tag", "before", "after", "has")

_WORD = re.compile(r"[^\W_]+")  # letters and digits: _ parts words, as the indexes do
_PART = re.compile(r'\s*(-?)(?:([a-z]+):)?(?:"([^"]*)"|(\S+))', re.IGNORECASE)
# The marks around a match in a snippet: private-use characters, taken out of every
# text before it is indexed, so that a marked snippet is never ambiguous.
START, STOP = "\ue000", "\ue001"


class QueryError(ValueError):
    """A query the language does not allow; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Term:
    """Words that must appear together (one word, or a phrase), in one field or any."""

    words: tuple[str, ...]
    field: str | None = None  # from | to | subject; None: any
    prefix: bool = False  # the last word is a prefix


@dataclass(frozen=True, slots=True)
class Query:
    terms: tuple[Term, ...] = ()
    tags: tuple[str, ...] = ()
    before: datetime | None = None
    after: datetime | None = None
    has_attachment: bool = False
    text: str = field(default="", compare=False)  # as written, for logs and replies


def words(text: str) -> list[str]:
    """The words of a text as the index compares them: case-folded, accents removed."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(c for c in folded if not unicodedata.combining(c))
    return _WORD.findall(plain)


# control characters but tab and newline, and the snippet marks
_UNCLEAN = re.compile(f"[\x00-\x08\x0b-\x1f\x7f{START}{STOP}]")


def clean(text: str) -> str:
    """Text as it goes into the index: control characters and the snippet marks
    replaced by spaces."""
    return _UNCLEAN.sub(" ", text)


def parse(text: str) -> Query:
    """Read a query; QueryError says what is wrong with it."""
    if len(text) > MAX_QUERY:
        raise QueryError(f"the query is longer than {MAX_QUERY} characters")
    terms: list[Term] = []
    tags: list[str] = []
    before = after = None
    has_attachment = False
    pos = 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _PART.match(text, pos)
        if m is None or (m.group(3) is None and m.group(4) is None):
            raise QueryError(f"unclosed quote at character {text.index(chr(34), pos) + 1}"
                             if '"' in text[pos:] else f"cannot read {text[pos:]!r}")
        negated, name, phrase, bare = m.groups()
        pos = m.end()
        if bare is not None and '"' in bare:
            at = m.start(4) + bare.index('"') + 1
            raise QueryError(f"unclosed quote at character {at}")
        if negated:
            raise QueryError(f"-{name + ':' if name else ''}{phrase or bare}: excluding is not "
                             "supported")
        name = (name or "").lower()
        value: str = phrase if phrase is not None else bare or ""
        if name and name not in FIELDS + FILTERS:
            raise QueryError(f"{name}: unknown (fields: {', '.join(FIELDS + FILTERS)})")
        if name == "tag":
            if not value or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
                raise QueryError(f"tag:{value}: a tag name is letters, digits and _.-")
            tags.append(value)
            continue
        if name in ("before", "after"):
            day = _day(name, value)
            before, after = (day, after) if name == "before" else (before, day)
            continue
        if name == "has":
            if value.lower() != "attachment":
                raise QueryError(f"has:{value}: only has:attachment is known")
            has_attachment = True
            continue
        prefix = phrase is None and value.endswith("*")
        found = words(value[:-1] if prefix else value)
        if not found:
            if name or phrase is not None:
                raise QueryError(f"{name + ':' if name else ''}{value!r}: no words in it")
            continue  # punctuation alone: nothing to look for
        if prefix and len(found[-1]) < MIN_PREFIX:
            raise QueryError(f"{value}: a prefix needs at least {MIN_PREFIX} letters")
        terms.append(Term(tuple(found), name or None, prefix))
    if len(terms) > MAX_TERMS:
        raise QueryError(f"more than {MAX_TERMS} words, phrases and prefixes")
    if not (terms or tags or has_attachment or before or after):
        raise QueryError("nothing to look for: give a word, a phrase, a field or a filter")
    if before is not None and after is not None and after >= before:
        raise QueryError("after: is not before before:")
    return Query(tuple(terms), tuple(tags), before, after, has_attachment, text)


def _day(name: str, value: str) -> datetime:
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise QueryError(f"{name}:{value}: a day as YYYY-MM-DD") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def segments(snippet: str) -> list[dict[str, object]]:
    """A snippet with START/STOP marks as a list of {text, match} pieces, which a client
    renders without reading anything as markup."""
    out: list[dict[str, object]] = []
    for n, piece in enumerate(re.split(f"[{START}{STOP}]", snippet)):
        if piece:
            out.append({"text": piece, "match": n % 2 == 1})
    return out
