"""Find special categories of personal data in a message's text. Pure, no I/O.

The retention policy maps what is found to tags (usually ``sensitive``), so
such mail can get a shorter retention and stricter routing.  Numbers count
only when their check digits hold, which keeps ordinary order and phone
numbers out:

- ``bsn``: a Dutch citizen service number, 9 digits passing the 11-check
  (9*d1 + 8*d2 + ... + 2*d8 - d9 divisible by 11).  A bare 9-digit number
  passes the check one time in eleven, so by default it counts only with a
  context word (BSN, burgerservicenummer, sofinummer) up to 30 characters
  before it on the same line, or when
  written in the 4-2-3 grouping ``1234.56.789``.
- ``iban``: a country code with its registered length, mod-97 remainder 1.
- ``card``: a payment card number of 13 to 19 digits (spaces or dashes allowed
  between groups) with a card-network prefix, passing the Luhn check.
- ``health``: any configured keyword, as a whole word, case-insensitive.

The text examined is the subject and the text parts, cut at MAX_TEXT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAX_TEXT = 1 << 20  # characters examined per message
CATEGORIES = ("bsn", "iban", "card", "health")

# Lengths from the SWIFT IBAN registry.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}

_BSN_CONTEXT = r"(?:bsn|burgerservicenummer|sofi-?nummer|citizen service number)"
_BSN_WITH_CONTEXT = re.compile(
    _BSN_CONTEXT + r"[^\d\n]{0,30}?(?<!\d)(\d{9}|\d{4}[. ]\d{2}[. ]\d{3})(?![\d.]?\d)",
    re.IGNORECASE,
)
_BSN_GROUPED = re.compile(r"(?<![\d.])(\d{4}\.\d{2}\.\d{3})(?![\d.])")
_BSN_BARE = re.compile(r"(?<![\d.,-])(\d{9})(?![\d.,-]?\d)")
_IBAN_START = re.compile(r"\b([A-Z]{2})\d{2}")
_CARD = re.compile(r"(?<![\d-])((?:\d[ -]?){12,18}\d)(?![\d-])")


def bsn_valid(number: str) -> bool:
    """The 11-check of a Dutch BSN (9 digits; not all zeros)."""
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) != 9 or not any(digits):
        return False
    total = sum(w * d for w, d in zip(range(9, 1, -1), digits[:8], strict=True)) - digits[8]
    return total % 11 == 0


def iban_valid(text: str) -> bool:
    """Registered length for the country, and the mod-97 check."""
    iban = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    if not rearranged.isalnum():
        return False
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return bool(digits) and total % 10 == 0


def card_valid(text: str) -> bool:
    """13-19 digits, a card-network prefix (Visa, Mastercard, Amex, Discover, JCB,
    Diners, Maestro, UnionPay), and the Luhn check."""
    digits = "".join(c for c in text if c.isdigit())
    if not 13 <= len(digits) <= 19 or digits[0] not in "3456":
        return False
    return luhn_valid(digits)


@dataclass(frozen=True, slots=True)
class Classifier:
    """What to look for; built from the retention policy's ``classifier`` section."""

    categories: frozenset[str] = frozenset(CATEGORIES)
    health_keywords: tuple[str, ...] = ()
    bsn_needs_context: bool = True
    _health: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def findings(self, texts: Iterable[str]) -> list[str]:
        """The categories found in ``texts``, in CATEGORIES order."""
        text = _joined(texts)
        found = []
        for category in CATEGORIES:
            if category in self.categories and self._finds(category, text):
                found.append(category)
        return found

    def _finds(self, category: str, text: str) -> bool:
        if category == "bsn":
            if any(bsn_valid(m.group(1)) for m in _BSN_WITH_CONTEXT.finditer(text)):
                return True
            if any(bsn_valid(m.group(1)) for m in _BSN_GROUPED.finditer(text)):
                return True
            return not self.bsn_needs_context and any(
                bsn_valid(m.group(1)) for m in _BSN_BARE.finditer(text))
        if category == "iban":
            upper = text.upper()
            return any(iban_valid(c) for c in _iban_candidates(upper))
        if category == "card":
            return any(card_valid(m.group(1)) for m in _CARD.finditer(text))
        if category == "health":
            return self._health is not None and self._health.search(text) is not None
        raise ValueError(f"unknown category {category!r}")

    def __post_init__(self) -> None:
        health = None
        if self.health_keywords:
            words = sorted(self.health_keywords, key=len, reverse=True)
            alternatives = "|".join(re.escape(k) for k in words)
            health = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        object.__setattr__(self, "_health", health)


def _iban_candidates(text: str) -> Iterator[str]:
    """At each country code + 2 digits, exactly as many characters as that country's
    IBAN has (single spaces between groups allowed), ending at a word boundary."""
    for m in _IBAN_START.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1))
        if length is None:
            continue
        chars: list[str] = []
        i = m.start()
        while i < len(text) and len(chars) < length:
            c = text[i]
            if c.isascii() and c.isalnum():
                chars.append(c)
            elif not (c == " " and chars and i + 1 < len(text) and text[i + 1] != " "):
                break
            i += 1
        if len(chars) == length and not (i < len(text) and text[i].isalnum()):
            yield "".join(chars)


def _joined(texts: Iterable[str]) -> str:
    parts: list[str] = []
    size = 0
    for t in texts:
        if size >= MAX_TEXT:
            break
        parts.append(t[: MAX_TEXT - size])
        size += len(parts[-1])
    return "\n".join(parts)
