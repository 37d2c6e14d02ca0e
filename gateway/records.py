"""The records that flow between the stages: plain frozen dataclasses.

Ingress hands a ``NewMessage`` to the store; the pipeline claims a ``PipelineInput``,
parses it into ``ParsedFields`` and decides an ``Outcome`` of ``PlannedDelivery``s;
delivery claims ``DeliveryJob``s and records ``AttemptResult``s.  Every layer speaks
these, so they live here, importing nothing of the gateway (a parser process imports
this module, not SQLAlchemy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class NewMessage:
    """One accepted message for one tenant, as the ingress hands it over."""

    id: str
    tenant_id: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes  # its SHA-256 is taken by the store (see _digests)
    received_at: datetime
    client_address: str
    helo: str
    protocol: str
    trace_header: str
    smtputf8: bool
    direction: str = "inbound"
    submitted_by: str | None = None


@dataclass(frozen=True, slots=True)
class PipelineInput:
    """A claimed message as the pipeline stages need it."""

    id: str
    tenant_id: str
    mail_from: str
    recipients: tuple[str, ...]
    size: int
    tags: tuple[str, ...]
    raw: bytes
    direction: str = "inbound"
    client_address: str = ""  # for SPF
    helo: str = ""
    protocol: str = "ESMTP"  # IMAP: imported from the tenant's own mailbox


@dataclass(frozen=True, slots=True)
class PlannedDelivery:
    kind: str  # cc | bcc | route | rcpt | return
    recipient: str
    destination: str | None  # None: the relay
    rule: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the stages after parsing decided: tags, deliveries, notes for a human."""

    tags: tuple[str, ...] = ()
    deliveries: tuple[PlannedDelivery, ...] = ()
    notes: tuple[str, ...] = ()
    policy_version: str | None = None
    auth_results: dict[str, Any] | None = None  # see messages.auth_results
    auth_header: str | None = None
    # inbound mail to the gateway's privacy.request_address: the recipient it came to
    # (a data-subject request, recorded with the message)
    request: str | None = None
    indexed: bool = True  # into the search index (the tenant's search setting)


@dataclass(frozen=True, slots=True)
class Notice:
    """A change notice to one tenant about one subprocessor, with its email."""

    tenant_id: str
    subprocessor: str
    change: str  # added | removed
    effective_at: datetime
    message: NewMessage | None


@dataclass(frozen=True, slots=True)
class ConsentRows:
    baseline: frozenset[str]
    effective: dict[tuple[str, str], datetime]  # notice delivered: usable from then
    objections: frozenset[tuple[str, str]]
    undelivered: dict[tuple[str, str], str]  # notice not delivered (yet): why


@dataclass(frozen=True, slots=True)
class RetentionGroup:
    """Stored messages of one tenant with one set of tags."""

    tenant_id: str
    tag_key: str
    count: int
    oldest: datetime

    @property
    def tags(self) -> tuple[str, ...]:
        return tags_of(self.tag_key)


def tags_of(tag_key: str) -> tuple[str, ...]:
    """The tags of a ``messages.tag_key`` (sorted, comma-joined, '' for none)."""
    return tuple(tag_key.split(",")) if tag_key else ()


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    id: int
    message_id: str
    tenant_id: str
    kind: str
    recipient: str
    destination: str | None
    mail_from: str
    attempts: int
    created_at: datetime
    direction: str = "inbound"
    tags: tuple[str, ...] = ()  # of the message: subprocessor routing may depend on them
    header_message_id: str | None = None  # the Message-ID field, for logs (hashed)
    # An earlier claim ended without a recorded result (a crash, a lost lease), or an
    # attempt failed after the message may have reached the server (the connection
    # broke before the answer): an IMAP APPEND then looks before it appends again.
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """The outcome of one delivery attempt, to be recorded."""

    delivery_id: int
    status: str
    error: str | None = None
    retry_at: datetime | None = None
    bounce: NewMessage | None = None
    where: str = "none"  # the destination label of the attempt (metrics only, not stored)
    uncertain: bool = False  # it failed after the message may have reached the server


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
    text: str = ""  # the text parts, for the search index (parse.MAX_TEXT at most)


@dataclass(frozen=True)
class QueueStats:
    """Backlog figures read from the database (see ``Store.queue_stats``)."""

    pipeline_waiting: int
    pipeline_oldest: float  # seconds
    deliveries: list[tuple[str, str, int, float]]  # (tenant, state, count, oldest age in s)
    # sub-processor notices not delivered: state (pending, held, failed, unsent) -> (count,
    # oldest age in s)
    notices: dict[str, tuple[int, float]] = field(default_factory=dict)
    # breach notices of open incidents not delivered, and the seconds to the nearest of
    # their deadlines (negative: passed; None: there are none)
    breach_notices: int = 0
    breach_deadline: float | None = None
    # data-subject requests not answered, and the seconds to the nearest deadline
    requests_open: int = 0
    request_deadline: float | None = None


@dataclass
class Removed:
    """What deleting messages took with them."""

    messages: int = 0
    deliveries: int = 0
    pending: int = 0  # deliveries and keep-original jobs that were still to go
    imports: int = 0
    exports: list[str] = field(default_factory=list)  # admin API exports, by id

    def add(self, other: Removed) -> None:
        self.messages += other.messages
        self.deliveries += other.deliveries
        self.pending += other.pending
        self.imports += other.imports
        self.exports += other.exports

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "deliveries": self.deliveries,
                "pending_deliveries": self.pending, "imported": self.imports,
                "exports": self.exports}
