"""The subprocessor registry, change notices and objections, as policy reloads
record them and delivery reads them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import (
    insert,
    select,
    update,
)

from gateway.clock import aware, utcnow
from gateway.records import (
    ConsentRows,
    Notice,
)
from gateway.store import audit as audit_chain
from gateway.store import database
from gateway.store.base import StoreBase
from gateway.store.deliveries import notice_deliveries
from gateway.store.intake import _insert_messages
from gateway.store.models import (
    SENT,
    subprocessor_notices,
    subprocessor_objections,
    subprocessor_registry,
)


class SubprocessorStore(StoreBase):
    """The subprocessor registry, change notices and objections, as policy reloads."""

    def sync_subprocessors(
        self, current: Collection[str], now: datetime,
        notices: Callable[[list[str], list[str], list[tuple[str, str]]], list[Notice]],
        authorised: Mapping[tuple[str, str], bool] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Compare the registry in force with the one remembered, in one transaction.

        The first time, everything present is the baseline (covered by the agreement).
        After that, each subprocessor added or removed gets the notices
        ``notices(added, removed, pairs)`` returns, with their emails, written together
        with the registry change: a change is never remembered without its notices, nor
        notified twice.

        ``authorised``: (tenant, subprocessor) -> whether the tenant has a privacy
        contact, for every subprocessor each tenant authorises now.  The pairs present
        when they are first seen are the baseline of each tenant; a pair that appears
        later (a tenant added, or authorising one more subprocessor) gets its own notice
        (``pairs``), and so does a pair whose notice could not be sent for want of a
        privacy contact, once the tenant has one.
        """
        pairs = dict(authorised or {})
        with self.writing() as conn:
            # Instances that start (or reload) together: one notices the change.
            database.take_turn(conn, "subprocessor registry")
            known = {r.name: r for r in conn.execute(select(subprocessor_registry))}
            if not known:
                if current:
                    conn.execute(insert(subprocessor_registry), [
                        {"name": n, "first_seen_at": now, "baseline": True} for n in current])
                    _track_pairs(conn, pairs, now, set(current))
                return [], []
            added = sorted(n for n in current
                           if n not in known or known[n].removed_at is not None)
            removed = sorted(n for n, r in known.items()
                             if n not in current and r.removed_at is None)
            for name in added:
                if name in known:
                    conn.execute(update(subprocessor_registry)
                                 .where(subprocessor_registry.c.name == name)
                                 .values(first_seen_at=now, removed_at=None, baseline=False))
                else:
                    conn.execute(insert(subprocessor_registry).values(
                        name=name, first_seen_at=now, baseline=False))
            if removed:
                conn.execute(update(subprocessor_registry)
                             .where(subprocessor_registry.c.name.in_(removed))
                             .values(removed_at=now))
            baseline = {n for n, r in known.items() if r.baseline and r.removed_at is None}
            later = _track_pairs(conn, {p: c for p, c in pairs.items() if p[1] not in added},
                                 now, baseline)
            if added or removed or later:
                made = notices(added, removed, later)
                emails = [n.message for n in made if n.message is not None]
                if emails:
                    _insert_messages(conn, emails, self.keystore)
                if made:
                    conn.execute(insert(subprocessor_notices), [
                        {"tenant_id": n.tenant_id, "subprocessor": n.subprocessor,
                         "change": n.change, "created_at": now, "effective_at": n.effective_at,
                         "message_id": n.message.id if n.message else None} for n in made])
                for n in made:
                    audit_chain.append(conn, self.audit_key, actor="daemon",
                                       action="subprocessor.notice", tenant_id=n.tenant_id,
                                       message_id=n.message.id if n.message else None, at=now,
                                       detail={"subprocessor": n.subprocessor,
                                               "change": n.change,
                                               "effective_at": n.effective_at.isoformat(),
                                               "emailed": n.message is not None})
        return added, removed

    def consent_rows(self) -> ConsentRows:
        """What delivery needs to know: the baseline, and per (tenant, subprocessor) the
        time from which an added one is usable (its notice's delivery plus the window,
        never before the end the notice states) or why it is not (the notice is not
        delivered), and the objections."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            tracked = conn.execute(select(subprocessor_notices.c.id).where(
                subprocessor_notices.c.tenant_id == _TRACKING[0],
                subprocessor_notices.c.subprocessor == _TRACKING[1]).limit(1)).first()
            # once pairs are tracked, a baseline subprocessor is usable by the tenants
            # whose pair is in the baseline (below), not by every tenant
            baseline = frozenset() if tracked else frozenset(conn.execute(
                select(subprocessor_registry.c.name)
                .where(subprocessor_registry.c.baseline.is_(True),
                       subprocessor_registry.c.removed_at.is_(None))).scalars())
            effective: dict[tuple[str, str], datetime] = {}
            undelivered: dict[tuple[str, str], str] = {}
            for n in _notices(conn):
                key = (n["tenant_id"], n["subprocessor"])
                if n["change"] == "removed":
                    continue
                # the newest notice of a pair decides (a subprocessor removed and added
                # again is notified again)
                if n["usable_from"] is not None:
                    effective[key] = n["usable_from"]
                    undelivered.pop(key, None)
                else:
                    effective.pop(key, None)
                    undelivered[key] = n["why"]
            objections = frozenset(
                (r.tenant_id, r.subprocessor)
                for r in conn.execute(select(subprocessor_objections)))
        return ConsentRows(baseline, effective, objections, undelivered)

    def list_notices(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The change notices (oldest first), each with its delivery: ``state`` (sent,
        pending, held, failed, unsent), ``delivered_at``, ``why`` it is not, and
        ``usable_from`` (an added subprocessor, for that tenant, once delivered)."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [n for n in _notices(conn, tenant=tenant) if n["change"] != BASELINE]

    def undelivered_notices(self, now: datetime) -> dict[str, tuple[int, float]]:
        """Notices not delivered: state -> (how many, age of the oldest in seconds)."""
        out: dict[str, tuple[int, float]] = {}
        with self.engine.connect().execution_options(readonly=True) as conn:
            for n in _notices(conn):
                if n["state"] not in (SENT, BASELINE):
                    count, oldest = out.get(n["state"], (0, 0.0))
                    age = max((now - n["created_at"]).total_seconds(), 0.0)
                    out[n["state"]] = (count + 1, max(oldest, age))
        return out

    def record_objection(self, tenant: str, subprocessor: str, actor: str, note: str) -> None:
        with self.writing() as conn:
            conn.execute(insert(subprocessor_objections).values(
                tenant_id=tenant, subprocessor=subprocessor, recorded_at=utcnow(),
                actor=actor, note=note))
            audit_chain.append(conn, self.audit_key, actor=actor,
                               action="subprocessor.objection", tenant_id=tenant,
                               detail={"subprocessor": subprocessor, "note": note[:500]})


UNSENT = "unsent"  # a notice without an email: the tenant had no privacy contact
BASELINE = "baseline"  # a notice row's change: the pair was covered by the agreement
_TRACKING = ("*", "*")  # the row that says pairs are tracked (written with the first)


def _track_pairs(conn: Any, pairs: Mapping[tuple[str, str], bool], now: datetime,
                 baseline: set[str]) -> list[tuple[str, str]]:
    """Record the pairs covered by the agreement and return those that need a notice
    of their own (see ``sync_subprocessors``).  The first time pairs are tracked (a new
    database, or one from before they were), every pair of a baseline subprocessor is
    covered; after that, only notices make a pair usable."""
    rows = conn.execute(select(subprocessor_notices.c.tenant_id,
                               subprocessor_notices.c.subprocessor,
                               subprocessor_notices.c.change,
                               subprocessor_notices.c.message_id)
                        .where(subprocessor_notices.c.change.in_(("added", BASELINE)))).all()
    noticed = {(r.tenant_id, r.subprocessor) for r in rows
               if r.change == BASELINE or r.message_id is not None}
    unsent = {(r.tenant_id, r.subprocessor) for r in rows} - noticed
    first = _TRACKING not in noticed
    covered = [p for p in pairs if first and p[1] in baseline and p not in noticed]
    if first or covered:
        conn.execute(insert(subprocessor_notices), [
            {"tenant_id": t, "subprocessor": n, "change": BASELINE, "created_at": now,
             "effective_at": now, "message_id": None}
            for t, n in [*covered, *([_TRACKING] if first else [])]])
    return sorted(p for p, contact in pairs.items()
                  if p not in noticed and p not in covered and (p not in unsent or contact))


def _notices(conn: Any, tenant: str | None = None, change: str | None = None,
             ) -> list[dict[str, Any]]:
    """Notice rows with the state of their email's delivery (see ``list_notices``)."""
    q = (select(subprocessor_notices).order_by(subprocessor_notices.c.id)
         .where(subprocessor_notices.c.tenant_id != _TRACKING[0]))
    if tenant is not None:
        q = q.where(subprocessor_notices.c.tenant_id == tenant)
    if change is not None:
        q = q.where(subprocessor_notices.c.change == change)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    sent = notice_deliveries(conn, [r["message_id"] for r in rows if r["message_id"]])
    for r in rows:
        r["created_at"], r["effective_at"] = aware(r["created_at"]), aware(r["effective_at"])
        delivery = sent.get(r["message_id"] or "")
        r["delivered_at"] = delivery.delivered_at if delivery else None
        r["usable_from"] = None
        if r["change"] == BASELINE:
            r["state"], r["why"], r["usable_from"] = BASELINE, None, r["created_at"]
        elif r["delivered_at"] is not None:
            r["state"], r["why"] = SENT, None
            window = r["effective_at"] - r["created_at"]
            r["usable_from"] = max(r["effective_at"], r["delivered_at"] + window)
        elif delivery is None:
            r["state"] = UNSENT
            r["why"] = (f"no notice could be sent to tenant {r['tenant_id']}: it has no "
                        "privacy_contact")
        else:
            r["state"] = delivery.state
            reason = f" ({delivery.reason})" if delivery.reason else ""
            r["why"] = (f"the notice to tenant {r['tenant_id']}'s privacy contact is "
                        f"{delivery.state}{reason}: the objection window starts when it is "
                        "delivered")
    return rows


def notice_record(r: dict[str, Any]) -> dict[str, Any]:
    """A change notice as ``subprocessors notices --json`` and the admin API show it: for
    an added subprocessor the window ends ``window_days`` after the notice's delivery
    (None while it is not delivered, with ``why``)."""
    ends = r["usable_from"] if r["change"] == "added" else r["effective_at"]
    return {"subprocessor": r["subprocessor"], "change": r["change"],
            "queued_at": r["created_at"].isoformat(),
            "delivered_at": r["delivered_at"].isoformat() if r["delivered_at"] else None,
            "objection_window_ends": ends.isoformat() if ends else None,
            "state": r["state"], "why": r["why"], "message": r["message_id"]}

