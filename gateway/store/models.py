"""The database schema, as SQLAlchemy Core tables (one MetaData, no ORM state).

Raw originals live in their own table so that listing messages never reads
message bodies, and so that erasure later removes them with the row.  Every
address a message carries (envelope and, once parsed, headers) is a row of
``message_addresses``: one index answers "which messages mention X".
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import TSVECTOR

from gateway.clock import add_months

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Message states: received (stored, 250 sent) -> processed; quarantined when a
# stage failed unexpectedly (kept for a human to look at; only retention deletes it).
RECEIVED = "received"
PROCESSED = "processed"
QUARANTINED = "quarantined"

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", Text, nullable=False, default=""),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # set by `tenant deactivate`: its mail is refused and its data deleted for good
    Column("deactivated_at", DateTime(timezone=True)),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(26), primary_key=True),  # time-ordered, see store.ids
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("mail_from", Text, nullable=False),  # '' for the null sender <>
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("client_address", String(64), nullable=False),
    Column("helo", Text, nullable=False),
    Column("protocol", String(16), nullable=False),
    Column("trace_header", Text, nullable=False),  # our Received:, kept apart from the original
    Column("smtputf8", Boolean, nullable=False, default=False),
    # inbound: received as MX/forwarding target; outbound: sent by an internal user
    Column("direction", String(8), nullable=False, default="inbound",
           server_default="inbound"),
    Column("submitted_by", Text),  # the login of the user who sent an outbound message
    # Filled by the pipeline's parse stage:
    Column("message_id", Text),
    Column("header_from", Text),
    Column("header_to", Text),
    Column("header_cc", Text),
    Column("subject", Text),
    Column("date", Text),
    Column("attachments", JSON),  # [{"filename", "content_type", "size"}]
    Column("tags", JSON, nullable=False),
    # The tags sorted and comma-joined ('' for none): what the retention sweep selects by.
    Column("tag_key", Text, nullable=False, default="", server_default=""),
    Column("policy_version", String(16)),  # the policy set the pipeline applied
    # {"dkim": [{result, domain, selector, algorithm, reason, header_b}, ...]}
    Column("auth_results", JSON),
    Column("auth_header", Text),  # our Authentication-Results field, added to what we deliver
    Column("defects", JSON),
    Column("parse_failed", Boolean, nullable=False, default=False),
    Column("processed_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_error", Text),
    Index("ix_messages_status_id", "status", "id"),
    Index("ix_messages_tenant_id_id", "tenant_id", "id"),
    Index("ix_messages_tenant_id_tag_key_received_at", "tenant_id", "tag_key", "received_at"),
)

message_blobs = Table(
    "message_blobs",
    metadata,
    Column(
        "message_id", String(26), ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("data", LargeBinary, nullable=False),
    # the data key that sealed it (store.keystore); NULL: stored in clear
    Column("key_id", String(90)),
)

# role: mail_from | rcpt_to (envelope, written at acceptance) and
#       from | sender | reply_to | to | cc | bcc (headers, written by the parser)
message_addresses = Table(
    "message_addresses",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        String(26),
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("role", String(16), nullable=False),
    Column("address", Text, nullable=False),  # as written; looked up in lower case
)
Index("ix_message_addresses_lower_address", func.lower(message_addresses.c.address))

# The search index (store/search.py), written with the parse results. On PostgreSQL
# this table: the text of each field, and ``document``, their words weighted by field
# (A subject, B sender, C recipients, D the rest) under a GIN index. On SQLite an FTS5
# table of the same name and text columns, its rowids those of message_search_rows
# (migration 0015), which this table does not describe.
message_search = Table(
    "message_search",
    metadata,
    Column("message_id", String(26), ForeignKey("messages.id", ondelete="CASCADE"),
           nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("subject", Text, nullable=False),
    Column("sender", Text, nullable=False),
    Column("recipients", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("attachments", Text, nullable=False),
    Column("facets", Text, nullable=False),  # search.facets: "attachment", tag tokens
    Column("document", TSVECTOR, nullable=False),
    # A tenant's entries newest first (ids are time-ordered): the only ordered index, so
    # that the newest matches of a common word are walked to through the tenant's own
    # entries, never through every newer entry of the others.  Lookups by id (deletes,
    # the cascade from messages) take a hash index, which has no order to walk.
    PrimaryKeyConstraint("tenant_id", "message_id", name="pk_message_search"),
    Index("ix_message_search_message_id", "message_id", postgresql_using="hash"),
)


# Entries indexed before revision 0018 that lack their facets (and on PostgreSQL their
# fields' lexemes): ``messages reindex`` gives them theirs (gateway.store.search).
search_backfill = Table(
    "search_backfill",
    metadata,
    Column("message_id", String(26), ForeignKey("messages.id", ondelete="CASCADE"),
           primary_key=True),
)

# Delivery states: pending (due at next_attempt_at; deferred ones carry last_error),
# held (waiting for something an operator must provide, reason in last_error),
# sent, failed (permanent: 5xx, expired or dropped by an operator).
PENDING = "pending"
HELD = "held"
SENT = "sent"
FAILED = "failed"

# kind: cc | bcc (copies a rule asked for) | route (the message to a named destination)
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        String(26),
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("tenant_id", String(64), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("recipient", Text, nullable=False),
    Column("destination", String(64)),  # a configured destination, or NULL for the relay
    Column("rule", Text, nullable=False),
    Column("status", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    # The last attempt failed after the message may have reached the server (IMAP
    # APPEND: the connection broke before the answer): the next one looks first.
    Column("uncertain", Boolean, nullable=False, default=False, server_default="0"),
    Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
)
Index("ix_deliveries_lower_recipient", func.lower(deliveries.c.recipient))

# Each attempt of a delivery that did not deliver it (deferred, held, failed), with the
# reply or the reason; the delivery's own row tells of the attempt that did. Only the
# slow path writes here: a copy sent at the first attempt adds no row.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"),
           nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("status", String(8), nullable=False),  # the delivery's status after it
    Column("error", Text),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("tenant_id", String(64)),
    Column("actor", Text, nullable=False),
    Column("action", String(64), nullable=False),
    Column("message_id", String(26)),
    Column("detail", JSON, nullable=False),
    # the chain (store.audit): HMAC of the event and prev_hash; NULL before it began
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
)

# Admin API tokens (store.tokens): one tenant each; only the secret's SHA-256 is kept;
# scopes: what it may do, space-separated (read, export, erase, admin).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String(12), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("name", Text, nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("scopes", Text, nullable=False, server_default="read export erase"),
)

# The web console's users: people of a tenant (its privacy officer) who log in with a
# password; the login is unique across the gateway, the password kept as a scrypt hash
console_users = Table(
    "console_users",
    metadata,
    Column("login", String(254), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("password_hash", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The console's sessions: the cookie's secret kept as its SHA-256 only; a session of a
# user or of an API token, which must still be valid on every request
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("secret_sha256", String(64), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("login", String(254)),
    Column("token_id", String(12)),
    Column("csrf", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
)

# Exports started over the admin API: status running | done | failed | removed (by an
# erasure in the tenant, with its archive); path on the instance that wrote it.
api_exports = Table(
    "api_exports",
    metadata,
    Column("id", String(26), primary_key=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("subject", String(64)),  # the keyed hash of a subject export's address
    Column("status", String(8), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("path", Text),
    Column("size", BigInteger),
    Column("error", Text),
)

# Subprocessors as the database remembers them.  baseline: in the registry when
# notices began to be kept (covered by the agreement; usable without a notice).
subprocessor_registry = Table(
    "subprocessor_registry",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
    Column("baseline", Boolean, nullable=False),
)

# change: added | removed.  An added subprocessor becomes usable for the tenant at
# effective_at (the end of the objection window) unless the tenant objects.
subprocessor_notices = Table(
    "subprocessor_notices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("subprocessor", String(64), nullable=False),
    Column("change", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("effective_at", DateTime(timezone=True), nullable=False),
    Column("message_id", String(26)),  # the notice email, a stored outbound message
)

subprocessor_objections = Table(
    "subprocessor_objections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False),
    Column("subprocessor", String(64), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("actor", Text, nullable=False),
    Column("note", Text, nullable=False),
)


# A folder of a mailbox the gateway imports from (tenants.ID.imap_pull): where the
# import stands.  last_uid: every message up to it is imported (or skipped, see
# last_error) under uidvalidity; done_uid: the after_import handling on the server
# is done up to it.  uidvalidity NULL: never looked at yet.
imap_folders = Table(
    "imap_folders",
    metadata,
    Column("tenant_id", String(64), primary_key=True),
    Column("source", String(64), primary_key=True),
    Column("folder", String(255), primary_key=True),
    Column("uidvalidity", BigInteger),
    Column("last_uid", BigInteger, nullable=False, default=0),
    Column("done_uid", BigInteger, nullable=False, default=0),
    Column("imported", Integer, nullable=False, default=0),
    Column("backlog", Integer, nullable=False, default=0),  # not yet imported, at last look
    Column("last_success_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("last_error_at", DateTime(timezone=True)),
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
)

# One row per message imported from a folder: what a UIDVALIDITY change is resynced
# against (by content hash and Message-ID hash, never by the address or subject),
# and which UIDs the after_import handling applies to.
imap_imports = Table(
    "imap_imports",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False),
    Column("source", String(64), nullable=False),
    Column("folder", String(255), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("message_id", String(26), nullable=False),  # ours (messages.id)
    Column("sha256", String(64), nullable=False),
    Column("msgid_hash", String(64)),  # SHA-256 of the Message-ID field, if any
    Index("ix_imap_imports_folder_uid", "tenant_id", "source", "folder", "uidvalidity", "uid"),
    Index("ix_imap_imports_sha256", "tenant_id", "source", "sha256"),
    Index("ix_imap_imports_msgid_hash", "tenant_id", "source", "msgid_hash"),
    Index("ix_imap_imports_message_id", "message_id"),
)

# Personal-data incidents (store.incidents): opened with the time of discovery; each
# tenant affected gets a notice (a stored outbound message) whose delivery is its record.
INCIDENT_OPEN, INCIDENT_CLOSED = "open", "closed"
incidents = Table(
    "incidents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("discovered_at", DateTime(timezone=True), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    Column("opened_by", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("status", String(8), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    Column("closing_note", Text),
)
incident_tenants = Table(
    "incident_tenants",
    metadata,
    Column("incident_id", Integer, ForeignKey("incidents.id"), primary_key=True),
    Column("tenant_id", String(64), primary_key=True),
    Column("message_id", String(26)),  # the notice, once queued
    Column("notified_at", DateTime(timezone=True)),  # when it was queued
    Index("ix_incident_tenants_tenant_id", "tenant_id"),
)

# Data-subject requests (store.requests) that reached the processor: forwarded to the
# tenant's privacy contact, due a month after they arrived (GDPR art. 12(3)), fulfilled
# by an export or an erasure of the person (or closed by hand with a note).
# Data-subject request states: received (by mail, not read yet), unassigned (by mail,
# naming no tenant), open (forwarded to the tenant), fulfilled, closed.
REQUEST_RECEIVED, UNASSIGNED = "received", "unassigned"
OPEN, FULFILLED, CLOSED = "open", "fulfilled", "closed"
ANSWER_MONTHS = 1  # GDPR art. 12(3): a request is answered within a month of receipt


def request_due(received_at: datetime) -> datetime:
    return add_months(received_at, ANSWER_MONTHS)


subject_requests = Table(
    "subject_requests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # access | erasure | portability | other
    Column("subject", Text, nullable=False),  # the person's address, to act on it
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("message_id", String(26)),  # the forward to the privacy contact
    Column("status", String(12), nullable=False),  # above; tenant_id "" until one is known
    Column("fulfilled_at", DateTime(timezone=True)),
    Column("fulfilled_by", Text),  # "export ID", "erasure", or the note of a hand close
    # a request that came by mail to privacy.request_address: that message
    Column("source_id", String(26)),
    Index("ux_subject_requests_source_id", "source_id", unique=True),
)

# Legal holds a tenant placed through the admin API (beside those of retention.yaml):
# always on its own mail; released, not deleted, so the record stays.
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant_id", String(64), nullable=False, index=True),
    Column("name", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("address", Text),
    Column("tag", String(64)),
    Column("until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", Text, nullable=False),
    Column("released_at", DateTime(timezone=True)),
    Column("released_by", Text),
)
