"""Every read and write of the database goes through ``Store``: one object passed to
every part, made of one class per family of tables (intake, messages, deliveries,
retention, subprocessors, audit, search; tokens, mailboxes and privacy have their own wrappers).
The pipeline's calls (claim, finish_many, quarantine) and the command line's reads are
plain synchronous methods, run off the event loop by their callers.
"""

from __future__ import annotations

from gateway.store.audit import AuditStore
from gateway.store.deliveries import DeliveryStore
from gateway.store.intake import IntakeStore
from gateway.store.messages import MessageStore
from gateway.store.retention import RetentionStore
from gateway.store.search import SearchStore
from gateway.store.subprocessors import SubprocessorStore


class Store(IntakeStore, MessageStore, DeliveryStore, RetentionStore, SubprocessorStore,
            AuditStore, SearchStore):
    """The gateway's database, behind one object passed to every part.

    One object passed to every part; each family of tables has its own module."""
