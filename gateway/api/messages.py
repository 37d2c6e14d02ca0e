"""The admin API's messages: listed, found by a full-text query, one in full (what the
gateway did with it and why), the original (.eml), and deleted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import query
from gateway.api.deliveries import delivery_doc
from gateway.api.http import (
    ApiError,
    Context,
    Route,
    actor,
    not_found,
    owner,
    path_id,
    query_address,
    query_id,
    query_int,
    query_time,
    reply,
    tenant,
    when,
)
from gateway.api.openapi import MAX_LIMIT
from gateway.clock import aware
from gateway.htmltext import readable
from gateway.policyset import retention_in_force
from gateway.privacy import erasure
from gateway.query import MAX_PAGE, MAX_PAGES
from gateway.store.privacy import Found


class MessageRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [Route("GET", "/messages", self.list, "read"),
                Route("GET", "/search", self.search, "read"),
                Route("GET", "/messages/{id}", self.get, "read"),
                Route("GET", "/messages/{id}/eml", self.eml, "read"),
                Route("GET", "/messages/{id}/text", self.text, "read"),
                Route("DELETE", "/messages/{id}", self.delete, "erase")]

    async def list(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
        after = query_id(request, "after")
        address = query_address(request, "address")
        since, until = query_time(request, "since"), query_time(request, "until")
        rows = await asyncio.to_thread(
            self.ctx.privacy.search, tenant(request), after=after, limit=limit,
            address=address, since=since, until=until)
        return reply({"messages": [summary(r) for r in rows],
                      "next": rows[-1]["id"] if len(rows) == limit else None})

    async def search(self, request: web.Request) -> web.Response:
        """A page of the tenant's messages that match ``q`` (gateway.query), best first."""
        text = request.query.get("q")
        if text is None:
            raise ApiError(400, "q: the query is missing")
        try:
            asked = query.parse(text)
        except query.QueryError as exc:
            raise ApiError(400, f"q: {exc}") from None
        limit = query_int(request, "limit", 20, 1, MAX_PAGE)
        page = query_int(request, "page", 1, 1, MAX_PAGES)
        mine = tenant(request)
        rows = await asyncio.to_thread(self.ctx.store.search_for, actor(request), mine,
                                       asked, limit, (page - 1) * limit)
        return reply({"results": rows,
                      "next": page + 1 if len(rows) == limit and page < MAX_PAGES
                      else None})

    async def _own(self, request: web.Request) -> dict[str, Any]:
        row = await asyncio.to_thread(self.ctx.store.get_message, path_id(request),
                                      tenant(request))
        if row is None:
            raise not_found()
        return row

    async def get(self, request: web.Request) -> web.Response:
        row = await self._own(request)
        copies = await asyncio.to_thread(self.ctx.pages.copies, tenant(request), row["id"])
        doc = summary(row)
        doc.update({"header_addresses": [{"role": role, "address": a}
                                         for role, a in row["addresses"]],
                    "attachments": row["attachments"] or [], "sha256": row["sha256"],
                    "defects": row["defects"] or [], "direction": row["direction"],
                    "processed_at": when(row["processed_at"]),
                    "rules": sorted({c["rule"] for c in copies}),
                    "deliveries": [delivery_doc(c) for c in copies],
                    "authentication": row["auth_results"] or {},
                    "retention": self._retention(row)})
        return reply(doc)

    def _retention(self, row: dict[str, Any]) -> dict[str, Any]:
        """The retention rule that keeps the message, when it expires, the holds on it."""
        policy = retention_in_force(self.ctx.policies().retention, self.ctx.store)
        s = policy.standing(row["tenant_id"], row["tags"] or [],
                            {a.lower() for _, a in row["addresses"]},
                            aware(row["received_at"]), row["status"] != "received",
                            datetime.now(UTC))
        return {"rule": s.rule, "expires_at": when(s.expires_at), "held_by": s.held_by}

    async def eml(self, request: web.Request) -> web.Response:
        row = await self._own(request)
        raw = await asyncio.to_thread(self.ctx.store.raw, row["id"])
        if raw is None:
            raise not_found()
        await asyncio.to_thread(self.ctx.store.audit, actor(request), "message.export",
                                tenant_id=row["tenant_id"], message_id=row["id"],
                                detail={"bytes": len(raw)})
        return web.Response(body=raw, content_type="message/rfc822", headers={
            "Content-Disposition": f'attachment; filename="{row["id"]}.eml"'})

    async def text(self, request: web.Request) -> web.Response:
        """What a person reads of the message: never its HTML as HTML."""
        row = await self._own(request)
        raw = await asyncio.to_thread(self.ctx.store.raw, row["id"])
        if raw is None:
            raise not_found()
        text, source = await asyncio.to_thread(readable, raw)
        return reply({"id": row["id"], "text": text[:MAX_READABLE], "source": source,
                      "truncated": len(text) > MAX_READABLE})

    async def delete(self, request: web.Request) -> web.Response:
        """Delete one message (with the tenant's exports made before it); 409 under a
        legal hold, unless a token with the admin scope gives ``override_hold``."""
        message_id, mine = path_id(request), tenant(request)
        reason = request.query.get("override_hold")
        if reason is not None:
            if not owner(request).may("admin"):
                raise ApiError(403, "override_hold needs a token with the admin scope")
            if not reason.strip() or len(reason) > 500:
                raise ApiError(400, "override_hold: the reason, 1 to 500 characters")
        found: Found | None = await asyncio.to_thread(self.ctx.privacy.find_message, mine,
                                                      message_id)
        if found is None:
            raise not_found()
        try:
            removed = await asyncio.to_thread(
                erasure.delete_message, self.ctx.privacy, self.ctx.policies().retention,
                found, mine, datetime.now(UTC), actor=actor(request),
                exports=self.ctx.config.admin_api.export_directory, override_reason=reason)
        except erasure.ErasureRefused as exc:
            raise ApiError(409, str(exc)) from None
        return reply({"id": message_id, **removed.as_dict()})


def summary(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "received_at": row["received_at"], "status": row["status"],
            "sender": row["mail_from"], "recipients": row.get("recipients", []),
            "message_id": row["message_id"], "from": row["header_from"],
            "to": row["header_to"], "cc": row["header_cc"], "subject": row["subject"],
            "date": row["date"], "size": row["size"], "tags": row["tags"] or []}


MAX_READABLE = 1 << 20  # characters of a message's text the API gives to read
