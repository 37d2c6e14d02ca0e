"""Erasure of one person's mail from one tenant (GDPR art. 17), on the controller's request.

``plan()`` finds every message of the tenant in which the address appears
(envelope sender or recipient, an address header, the recipient of a copy)
and the legal holds of the retention policy that cover any of them.
``erase()`` then deletes them completely (see ``store.privacy``) unless a hold
covers one: then nothing is deleted, unless the operator overrides the holds
with a reason.  With them go all export archives of the tenant that were made
before: each is a snapshot of the tenant's mail that may hold the person, also
through mail that retention has deleted since and the erasure no longer sees.
The audit event names the person only by a keyed hash and records the counts,
the exports removed, the holds overridden and the reason.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig
from gateway.logs import mask
from gateway.policy.retention import RetentionPolicy
from gateway.policyset import retention_in_force
from gateway.privacy import requests
from gateway.privacy.export import tidy
from gateway.privacy.keys import PrivacyKey
from gateway.records import Removed
from gateway.store import keystore
from gateway.store.privacy import Found, PrivacyStore, Progress

log = logging.getLogger(__name__)


class ErasureRefused(Exception):
    """Legal holds cover some of the messages and no override was given."""


@dataclass
class Plan:
    tenant: str
    subject: str
    found: list[Found]
    held: dict[str, int] = field(default_factory=dict)  # hold name -> messages it covers
    config_mentions: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)  # the tenant's stored exports, by id

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.found]


def plan(store: PrivacyStore, policy: RetentionPolicy | None, config: GatewayConfig,
         tenant: str, subject: str, now: datetime) -> Plan:
    found = store.find_subject(tenant, subject)
    result = Plan(tenant, subject, found, config_mentions=config_mentions(config, tenant,
                                                                          subject),
                  exports=store.stored_exports(tenant))
    if policy is not None:
        policy = retention_in_force(policy, store.store)
        held: Counter[str] = Counter()
        for f in found:
            held.update(policy.held_by(tenant, f.tags, f.addresses, now))
        result.held = dict(held)
    return result


def erase(store: PrivacyStore, key: PrivacyKey, p: Plan, *, actor: str, exports: Path,
          override_reason: str | None = None, progress: Progress | None = None) -> Removed:
    """Carry out the plan; ``exports``: the directory of the admin API's exports, whose
    archives of the tenant go at once when this machine holds them (every daemon
    deletes those on its own disk within seconds, see ``export.tidy``)."""
    if p.held and override_reason is None:
        holds = ", ".join(f"{name} ({n} messages)" for name, n in sorted(p.held.items()))
        raise ErasureRefused(f"legal hold {holds} covers mail of this person: nothing erased "
                             "(--override-hold --reason TEXT erases it anyway)")
    detail: dict[str, object] = {"subject": key.subject_hash(p.subject)}
    if p.held:
        detail["holds_overridden"] = sorted(p.held)
        detail["reason"] = mask(override_reason or "")[:500]
    removed = store.erase(p.tenant, p.ids, {
        "actor": actor, "action": "subject.erase", "tenant_id": p.tenant, "detail": detail},
        progress)
    requests.fulfilled(store.store, p.tenant, p.subject, "erasure", "erasure", actor)
    store.scrub()
    _tidy(store, exports, p.tenant)
    return removed


def delete_message(store: PrivacyStore, policy: RetentionPolicy, found: Found, tenant: str,
                   now: datetime, *, actor: str, exports: Path,
                   override_reason: str | None = None) -> Removed:
    """Delete one message of ``tenant`` as an erasure would (the tenant's exports made
    before go with it: they hold it), unless a legal hold covers it."""
    held = retention_in_force(policy, store.store).held_by(tenant, found.tags,
                                                            found.addresses, now)
    if held and override_reason is None:
        raise ErasureRefused(f"legal hold {', '.join(held)} covers this message: "
                             "it is not deleted")
    detail: dict[str, object] = {}
    if held:
        detail["holds_overridden"] = held
        detail["reason"] = mask(override_reason or "")[:500]
    removed = store.erase(tenant, [found.id], {
        "actor": actor, "action": "message.delete", "tenant_id": tenant,
        "message_id": found.id, "detail": detail})
    store.scrub()
    _tidy(store, exports, tenant)
    return removed


def _tidy(store: PrivacyStore, exports: Path, tenant: str) -> None:
    try:
        tidy(store, exports)
    except (OSError, SQLAlchemyError) as exc:  # the erasure is done; the daemons' own tidy
        # (every few seconds, gateway.api) deletes the removed archives on their disks
        log.warning("export archives of tenant %s not deleted here: %s", tenant, exc)


def tenant_holds(store: PrivacyStore, policy: RetentionPolicy, tenant: str, now: datetime,
                 ) -> dict[str, int]:
    """The legal holds in force on a tenant's mail: hold name -> messages it covers."""
    held: Counter[str] = Counter()
    policy = retention_in_force(policy, store.store)
    if not policy.active_holds(now):
        return {}
    for page in store.tenant_messages(tenant):
        for f in page:
            held.update(policy.held_by(tenant, f.tags, f.addresses, now))
    return dict(held)


@dataclass
class Purged:
    removed: Removed
    shredded: bool  # its data key was destroyed here and now
    scrubbed: bool  # SQLite's WAL truncated (False: a reader kept it; the next checkpoint)


def purge_tenant(store: PrivacyStore, config: GatewayConfig, tenant: str, actor: str,
                 progress: Progress | None = None) -> Purged:
    """Everything of a deactivated tenant, wherever the gateway put it: its data in the
    database, its data key (crypto-shredding), the exports made over the API.  Run by
    `tenant deactivate`, and by every daemon when it sees the tenant inactive (for
    anything stored meanwhile); doing it twice does no harm."""
    if store.store.keystore is not None:
        store.store.keystore.forget(tenant)
    removed = store.purge_tenant(tenant, actor, progress)
    shredded = keystore.shred(config.privacy.keystore, tenant)
    shutil.rmtree(config.admin_api.export_directory / tenant, ignore_errors=True)
    return Purged(removed, shredded, store.scrub() if removed.messages else True)


def shred_tenant(store: PrivacyStore, config: GatewayConfig, tenant: str, actor: str,
                 progress: Progress | None = None) -> Purged:
    """``purge_tenant``, then the audit event that records it and whether the data key
    went with it: what `tenant deactivate` does once the tenant is inactive."""
    purged = purge_tenant(store, config, tenant, actor, progress)
    store.store.audit(actor, "tenant.shred", tenant_id=tenant,
                      detail={"data_key_destroyed": purged.shredded})
    return purged


def config_mentions(config: GatewayConfig, tenant: str, subject: str) -> list[str]:
    """Where gateway.yaml itself names the address (erasure cannot edit the file)."""
    t = config.tenants.get(tenant)
    if t is None:
        return []
    address = subject.strip().lower()
    found = []
    if address in (a.lower() for a in t.addresses):
        found.append(f"tenants.{tenant}.addresses")
    for login, user in t.users.items():
        if login.lower() == address or address in (a.lower() for a in user.send_as):
            found.append(f"tenants.{tenant}.users.{login}")
    for name, pull in t.imap_pull.items():
        if pull.recipient.lower() == address:
            found.append(f"tenants.{tenant}.imap_pull.{name}.recipient")
    return found
