"""Records that cross a process boundary: plain dataclasses, importable without the
database layer (a parser process imports this, not SQLAlchemy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ParsedFields:
    """What the parse stage learned about a message."""

    message_id: str | None
    header_from: str | None
    header_to: str | None
    header_cc: str | None
    subject: str | None
    date: str | None
    attachments: list[dict[str, Any]]
    defects: list[str]
    parse_failed: bool
    addresses: list[tuple[str, str]]  # (role, address) from headers
