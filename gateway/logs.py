"""Logging: one line per event, human or JSON, to stderr; personal data masked.

Every message event (accepted, rejected, processed, quarantined, delivered,
deferred, bounced, held, deleted) is one line written by ``event()``::

    accepted queue_id=01JD... tenant=acme msgid=5c1f0e9a7b2d4c3e code=250 size=2048 ...

with the queue id, the tenant, a hash of the Message-ID (the same message can
be found in the sender's logs by hashing its Message-ID the same way, without
the Message-ID itself being written down) and the reply code.

By default nothing a person can be recognised by is written: the formatters
replace every e-mail address in the finished line (tracebacks and remote
servers' replies included) with ``[address]`` and the value of a ``subject``
field with ``[subject]``.  An erased person's address is then not left behind
in the journal.  ``logging.personal_data: true`` turns the masking off, for
debugging.  Client IP addresses are written: they are needed against abuse,
as in every MTA's log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

ADDRESS_MASK = "[address]"
SUBJECT_MASK = "[subject]"
PERSONAL_FIELDS = frozenset({"subject"})

# Anything shaped like local@domain: dot-atoms, quoted local parts, UTF-8, [IP] literals.
_ADDRESS = re.compile(
    r"""(?:"[^"\r\n]*"|[^\s<>()\[\],;:"'@=]+)@(?:\[[^\]\s]*\]|[^\s<>()\[\],;:"'@]+)"""
)
_BARE = re.compile(r"^[^\s\"'=\\]+$")


def mask(text: str) -> str:
    """The text with every e-mail address replaced by ``[address]``."""
    return _ADDRESS.sub(ADDRESS_MASK, text) if "@" in text else text


def msgid_hash(message_id: str | None) -> str:
    """16 hex digits of SHA-256 of the Message-ID without its angle brackets; '-' if none."""
    if not message_id:
        return "-"
    value = message_id.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def event(logger: logging.Logger, kind: str, level: int = logging.INFO,
          exc_info: bool = False, **fields: Any) -> None:
    """Log one message event: ``kind key=value ...``; None values are left out."""
    if not logger.isEnabledFor(level):
        return
    kept = {k: v for k, v in fields.items() if v is not None}
    logger.log(level, "%s %s", kind, _pairs(kept), exc_info=exc_info,
               extra={"event": kind, "event_fields": kept})


def _pairs(fields: dict[str, Any]) -> str:
    out = []
    for key, value in fields.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if not text or not _BARE.match(text):
            text = json.dumps(text, ensure_ascii=False)
        out.append(f"{key}={text}")
    return " ".join(out)


def _masked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: SUBJECT_MASK if k in PERSONAL_FIELDS else v for k, v in fields.items()}


# syslog priorities (sd-daemon(3)), as journald reads them from a line's "<N>" prefix
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def priority(level: int) -> int:
    return next((p for lvl, p in sorted(_PRIORITY.items(), reverse=True) if level >= lvl), 7)


def journal_prefixed(line: str, level: int) -> str:
    """Each line (a traceback's too) with the priority journald files it under."""
    prefix = f"<{priority(level)}>"
    return "\n".join(prefix + part for part in line.split("\n"))


def stderr_is_journal() -> bool:
    """Whether stderr is a stream to journald: systemd says so in JOURNAL_STREAM
    (``device:inode`` of that stream) for a service whose output goes to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` with personal data masked unless asked for; to
    the journal (``journal``), ``<priority>level logger: message``: journald keeps the
    time and files each line under its priority (``journalctl -p warning``)."""

    def __init__(self, personal_data: bool = False, journal: bool = False) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if journal
                         else "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.personal_data = personal_data
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "event_fields", None)
        if fields is not None and not self.personal_data:
            record = logging.makeLogRecord(record.__dict__)
            record.args = (record.__dict__["event"], _pairs(_masked_fields(fields)))
        line = super().format(record)
        line = line if self.personal_data else mask(line)
        return journal_prefixed(line, record.levelno) if self.journal else line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an event's fields."""

    def __init__(self, personal_data: bool = False, journal: bool = False) -> None:
        super().__init__()
        self.personal_data = personal_data
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "event_fields", None)
        if fields is not None:
            out["event"] = record.__dict__["event"]
            out.update(fields if self.personal_data else _masked_fields(fields))
            out["message"] = f"{out['event']} {_pairs(_masked_fields(fields))}" \
                if not self.personal_data else out["message"]
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False, default=str)
        line = line if self.personal_data else mask(line)
        return journal_prefixed(line, record.levelno) if self.journal else line


def setup(level: str, fmt: str = "text", personal_data: bool = False) -> None:
    """Log to stderr (journald under systemd) in the chosen format; to the journal with
    each line's priority and without a time of our own."""
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    handler.setFormatter(JSONFormatter(personal_data, journal) if fmt == "json"
                         else TextFormatter(personal_data, journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiosmtpd logs every command line, addresses included, at INFO (and
    # the peer of every connection); its warnings and errors are kept.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)  # every untagged line at INFO
