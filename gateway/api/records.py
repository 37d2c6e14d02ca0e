"""The admin API's records of a tenant besides its mail: its users, the addresses its mail
holds, the sub-processors it may use (with the change notices and objections), the
legal holds on its mail, and its audit events."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.api.http import (
    ApiError,
    Context,
    Route,
    actor,
    body_text,
    not_found,
    path_number,
    query_address,
    query_choice,
    query_int,
    query_time,
    read_body,
    reply,
    tenant,
    when,
)
from gateway.api.openapi import MAX_LIMIT, MAX_REQUEST_TEXT
from gateway.policy.subprocessors import Consent
from gateway.privacy import register, requests, subject_address
from gateway.privacy.incident import NoticeError
from gateway.store.holds import HoldStore
from gateway.store.incidents import IncidentStore
from gateway.store.pages import AuditFilter
from gateway.store.requests import KINDS, RequestStore, request_record
from gateway.store.subprocessors import notice_record

_NEWEST = 2**63 - 1


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# RFC 3339 (JSON Schema's date-time): a day, a time and its offset
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                   r"([Zz]|[+-][0-9]{2}:[0-9]{2})")



class RecordRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [Route("GET", "/users", self.users, "read"),
                Route("GET", "/contacts", self.contacts, "read"),
                Route("GET", "/subprocessors", self.subprocessors, "read"),
                Route("GET", "/subprocessors/notices", self.notices, "read"),
                Route("POST", "/subprocessors/{name}/objections", self.object, "admin"),
                Route("GET", "/holds", self.holds, "read"),
                Route("POST", "/holds", self.place_hold, "admin"),
                Route("DELETE", "/holds/{id}", self.release_hold, "admin"),
                Route("GET", "/incidents", self.incidents, "read"),
                Route("GET", "/incidents/{id}", self.incident, "read"),
                Route("GET", "/requests", self.requests, "read"),
                Route("POST", "/requests", self.receive_request, "admin"),
                Route("GET", "/audit", self.audit, "read"),
                Route("GET", "/processing-record", self.processing_record, "read")]

    async def users(self, request: web.Request) -> web.Response:
        """The tenant's submission users: login and the addresses they may send as (the
        password hash stays in the configuration)."""
        config = self.ctx.config.tenants.get(tenant(request))
        users = config.users if config is not None else {}
        return reply({"users": [{"login": login, "send_as": list(u.send_as)}
                                for login, u in sorted(users.items())]})

    async def contacts(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
        after = request.query.get("after", "")
        if len(after) > 1000:
            raise ApiError(400, "after: the 'next' of the previous page")
        rows = await asyncio.to_thread(self.ctx.pages.contacts, tenant(request),
                                       after=after.lower(), limit=limit)
        return reply({"contacts": [{"address": r["address"], "roles": r["roles"],
                                    "messages": r["messages"],
                                    "first_seen": when(r["first_seen"]),
                                    "last_seen": when(r["last_seen"])} for r in rows],
                      "next": rows[-1]["address"] if len(rows) == limit else None})

    # ------------------------------------------------------------ sub-processors
    async def subprocessors(self, request: web.Request) -> web.Response:
        """Every sub-processor of the registry: whether the tenant's mail may go through
        it now, and if not, why (not authorised, objected to, its notice's window...)."""
        policy = self.ctx.policies().subprocessors
        if policy is None:
            return reply({"policy": False, "subprocessors": []})
        rows = await asyncio.to_thread(self.ctx.store.consent_rows)
        consent = Consent.of(rows)
        mine, now = tenant(request), datetime.now(UTC)
        items = []
        for sp in policy.registry.values():
            why = policy.why_not(mine, sp.name, consent, now)
            items.append({"name": sp.name, "purpose": sp.purpose, "entity": sp.entity,
                          "country": sp.country, "region": sp.region,
                          "data_categories": list(sp.data_categories),
                          "added": sp.added.isoformat(), "usable": why is None,
                          "why_not": why})
        return reply({"policy": True, "subprocessors": items})

    async def notices(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self.ctx.store.list_notices, tenant(request))
        return reply({"notices": [notice_record(r) for r in rows]})

    async def object(self, request: web.Request) -> web.Response:
        """Record the tenant's objection to a sub-processor: from now on it does not
        handle the tenant's mail (audited, as ``subprocessors object``)."""
        body = await read_body(request, {"note"})
        note = body_text(body, "note", required=False) or ""
        name = request.match_info["name"]
        policy = self.ctx.policies().subprocessors
        if policy is None or name not in policy.registry:
            raise not_found()
        await asyncio.to_thread(self.ctx.store.record_objection, tenant(request), name,
                                actor(request), note)
        return reply({"subprocessor": name, "note": note, "usable": False}, 201)

    # ------------------------------------------------------------ holds, audit
    async def holds(self, request: web.Request) -> web.Response:
        """The legal holds in force that apply to the tenant's mail: those of the
        gateway's retention policy (its own, and the whole gateway's), and those the
        tenant placed here (with their id, to release them)."""
        mine, now = tenant(request), datetime.now(UTC)
        holds = self.ctx.policies().retention.active_holds(now)
        doc = [{"id": None, "placed_by": "gateway", "name": h.name, "reason": h.reason,
                "address": h.address, "tag": h.tag, "tenant_only": h.tenant is not None,
                "until": h.until.isoformat() if h.until else None}
               for h in holds if h.tenant in (None, mine)]
        placed = await asyncio.to_thread(HoldStore(self.ctx.store).in_force, mine)
        doc += [{"id": r["id"], "placed_by": "tenant", "name": r["name"],
                 "reason": r["reason"], "address": r["address"], "tag": r["tag"],
                 "tenant_only": True, "until": r["until"].isoformat() if r["until"] else None}
                for r in placed if r["until"] is None or r["until"] >= now.date()]
        return reply({"holds": doc})

    async def place_hold(self, request: web.Request) -> web.Response:
        """Place a legal hold on the tenant's mail (all of it, or what carries an address
        or a tag, until a day or until released): retention, erasures and deletions keep
        what it covers (audited)."""
        body = await read_body(request, {"name", "reason", "address", "tag", "until"})
        name = body_text(body, "name", required=True, most=64)
        reason = body_text(body, "reason", required=True)
        address = body.get("address")
        if address is not None:
            address = subject_address(address) if isinstance(address, str) else None
            if address is None:
                raise ApiError(400, "address: an e-mail address is needed")
        tag = body.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise ApiError(400, "tag: the name of a tag is needed")
        if tag is not None and tag not in self.ctx.policies().retention.tags:
            # well formed, but not a tag of the policy in force (which may change)
            raise ApiError(409, f"tag: the retention policy has no tag {tag[:64]!r}")
        until = body.get("until")
        if until is not None:
            try:
                until = date.fromisoformat(until) if isinstance(until, str) and \
                    _DAY.fullmatch(until) else None
            except ValueError:
                until = None
            if until is None:
                raise ApiError(400, "until: a day (YYYY-MM-DD)")
            if until < datetime.now(UTC).date():
                raise ApiError(409, f"until: {until.isoformat()} has passed")
        assert name is not None and reason is not None
        hold_id = await asyncio.to_thread(
            HoldStore(self.ctx.store).place, tenant(request), name=name, reason=reason,
            address=address.lower() if address else None, tag=tag,
            until=until, actor=actor(request))
        if hold_id is None:
            raise ApiError(409, f"a hold named {name!r} is in force")
        return reply({"id": hold_id, "name": name}, 201)

    async def release_hold(self, request: web.Request) -> web.Response:
        hold_id = path_number(request)
        if not await asyncio.to_thread(HoldStore(self.ctx.store).release, tenant(request),
                                       hold_id, actor(request)):
            raise not_found()
        return reply({"id": hold_id, "released": True})

    async def incidents(self, request: web.Request) -> web.Response:
        """The personal-data incidents that affect the tenant, newest first, each with
        the notice to the tenant: queued, delivered, its deadline and whether it was
        kept."""
        rows = await asyncio.to_thread(IncidentStore(self.ctx.store).list, tenant(request))
        return reply({"incidents": [_incident(r) for r in rows]})

    async def incident(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(IncidentStore(self.ctx.store).list, tenant(request),
                                       ids=[path_number(request)])
        if not rows:
            raise not_found()
        return reply(_incident(rows[0]))

    async def requests(self, request: web.Request) -> web.Response:
        """The data-subject requests about the tenant's data that reached the processor:
        forwarded, due, and answered by which export or erasure."""
        rows = await asyncio.to_thread(RequestStore(self.ctx.store).list, tenant(request))
        return reply({"requests": [{k: v for k, v in request_record(r).items()
                                    if k != "tenant"} for r in rows]})

    async def receive_request(self, request: web.Request) -> web.Response:
        """Record a data-subject request that reached the processor through the tenant's
        own channel (a form, a helpdesk) and forward it, quoted, to the tenant's privacy
        contact, as ``request record`` does (audited)."""
        body = await read_body(request, {"kind", "subject", "text", "received_at"})
        kind = body.get("kind")
        if kind not in KINDS:
            raise ApiError(400, f"kind: one of {', '.join(KINDS)}")
        person = body.get("subject")
        person = subject_address(person) if isinstance(person, str) else None
        if person is None:
            raise ApiError(400, "subject: the person's e-mail address is needed")
        text = body_text(body, "text", required=True, most=MAX_REQUEST_TEXT)
        received = body.get("received_at", None)
        now = datetime.now(UTC)
        if received is not None:
            try:
                received = datetime.fromisoformat(received) if isinstance(received, str) \
                    and _TIME.fullmatch(received) else None
            except ValueError:
                received = None
            if received is None:
                raise ApiError(400, "received_at: an RFC 3339 time (with its offset)")
            try:
                received = received.astimezone(UTC)
            except OverflowError:
                received = datetime.min.replace(tzinfo=UTC)
            if received < now - timedelta(days=366):
                raise ApiError(409, "received_at: over a year ago")
        assert text is not None
        try:
            got = await asyncio.to_thread(
                requests.receive, self.ctx.store, self.ctx.config,
                self.ctx.policies().subprocessors, tenant=tenant(request), kind=kind,
                subject=person, subject_hash=self.ctx.key.subject_hash(person), text=text,
                received_at=received or now, now=now, to=None, actor=actor(request))
        except NoticeError as exc:  # no privacy contact; a time to come
            raise ApiError(409, str(exc).replace(": give --to ADDRESS", "")) from None
        rows = await asyncio.to_thread(RequestStore(self.ctx.store).list, tenant(request),
                                       ids=[got.id])
        return reply({k: v for k, v in request_record(rows[0]).items() if k != "tenant"},
                     201)

    async def processing_record(self, request: web.Request) -> web.Response:
        """The tenant's record of processing (GDPR art. 30): JSON, or ``format=markdown``."""
        form = query_choice(request, "format", ("json", "markdown")) or "json"
        record = await asyncio.to_thread(register.build, self.ctx.config,
                                         self.ctx.policies(), self.ctx.store,
                                         tenant(request), datetime.now(UTC))
        if form == "markdown":
            return web.Response(text=register.as_markdown(record),
                                content_type="text/markdown")
        return reply(record.as_dict())

    async def audit(self, request: web.Request) -> web.Response:
        """The tenant's audit events, a page at a time in either direction: the newest
        page, then ``before`` the first of a page for older ones, or ``after`` the last
        for newer ones (both: the first page between them)."""
        limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
        after = query_int(request, "after", -1, 0, _NEWEST)
        before = query_int(request, "before", -1, 1, _NEWEST)
        action = request.query.get("action")
        if action is not None and not 0 < len(action) <= 64:
            raise ApiError(400, "action: 1 to 64 characters")
        subject = query_address(request, "subject")
        person = subject_address(subject) if subject else None
        where = AuditFilter(action=action,
                            subject=self.ctx.key.subject_hash(person) if person else None,
                            since=query_time(request, "since"),
                            until=query_time(request, "until"))
        page = await asyncio.to_thread(
            self.ctx.pages.audit_page, tenant(request), after=after if after >= 0 else None,
            before=before if before >= 0 else None, limit=limit, where=where)
        events = [{k: r[k] for k in ("id", "at", "actor", "action", "message_id", "detail",
                                     "hash")} for r in page.events]
        return reply({"events": events,
                      "older": events[0]["id"] if events and page.older else None,
                      "newer": events[-1]["id"] if events and page.newer else None})


def _incident(r: dict[str, Any]) -> dict[str, Any]:
    """An incident as its tenant sees it: no other tenant's name or notice, and not who
    opened it."""
    [mine] = r["tenants"]
    return {"id": r["id"], "status": r["status"], "description": r["description"],
            "discovered_at": when(r["discovered_at"]), "deadline": when(r["deadline"]),
            "closed_at": when(r["closed_at"]), "closing_note": r["closing_note"],
            "notice": {"message": mine["message_id"], "state": mine["state"],
                       "queued_at": when(mine["notified_at"]),
                       "delivered_at": when(mine["delivered_at"]),
                       "in_time": mine["in_time"]}}

