"""The admin API's deliveries: every copy the gateway made of the tenant's mail, where it
went and how each attempt ended; retried or dropped as ``queue retry|drop`` do."""

from __future__ import annotations

import asyncio
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
    query_id,
    query_int,
    read_body,
    reply,
    tenant,
    when,
)
from gateway.api.openapi import DELIVERY_STATUSES, MAX_LIMIT
from gateway.store.models import SENT
from gateway.store.pages import DeliveryFilter


class DeliveryRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [Route("GET", "/deliveries", self.list, "read"),
                Route("GET", "/deliveries/{id}", self.get, "read"),
                Route("POST", "/deliveries/{id}/retry", self.retry, "admin"),
                Route("POST", "/deliveries/{id}/drop", self.drop, "admin")]

    async def list(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
        after = query_int(request, "after", 0, 0, 2**63 - 1)
        where = DeliveryFilter(status=query_choice(request, "status", DELIVERY_STATUSES),
                               message_id=query_id(request, "message"),
                               recipient=query_address(request, "recipient"))
        rows = await asyncio.to_thread(self.ctx.pages.deliveries, tenant(request),
                                       after=after, limit=limit, where=where)
        return reply({"deliveries": [delivery_doc(r) for r in rows],
                      "next": rows[-1]["id"] if len(rows) == limit else None})

    async def _own(self, request: web.Request) -> dict[str, Any]:
        row = await asyncio.to_thread(self.ctx.pages.delivery, tenant(request),
                                      path_number(request))
        if row is None:
            raise not_found()
        return row

    async def get(self, request: web.Request) -> web.Response:
        """A delivery with its attempts: each that did not deliver it (the newest 100),
        then the one that did."""
        row = await self._own(request)
        history = [{"at": when(a["at"]), "status": a["status"], "reason": a["error"]}
                   for a in row["tried"]]
        if row["status"] == SENT:
            history.append({"at": when(row["last_attempt_at"]), "status": SENT,
                            "reason": None})
        return reply({**delivery_doc(row), "history": history})

    async def retry(self, request: web.Request) -> web.Response:
        row = await self._own(request)
        if not await asyncio.to_thread(self.ctx.pages.retry_delivery, tenant(request),
                                       row["id"], actor(request)):
            raise ApiError(409, f"the delivery is {row['status']}: nothing to retry")
        return reply(delivery_doc(await self._own(request)))

    async def drop(self, request: web.Request) -> web.Response:
        body = await read_body(request, {"reason"})
        reason = body_text(body, "reason", required=False, most=500) or "by the tenant"
        row = await self._own(request)
        if not await asyncio.to_thread(self.ctx.pages.drop_delivery, tenant(request),
                                       row["id"], actor(request), reason):
            raise ApiError(409, f"the delivery is {row['status']}: only a pending or held "
                                "one can be dropped")
        return reply(delivery_doc(await self._own(request)))


def delivery_doc(row: dict[str, Any]) -> dict[str, Any]:
    """A delivery as the API shows it.  Its attempts: how many, the last one's time and
    outcome (``reason``: the remote server's reply or why it is held), the next one's."""
    return {"id": row["id"], "message": row["message_id"], "kind": row["kind"],
            "recipient": row["recipient"], "destination": row["destination"] or "relay",
            "rule": row["rule"], "status": row["status"], "attempts": row["attempts"],
            "created_at": when(row["created_at"]),
            "last_attempt_at": when(row["last_attempt_at"]),
            "next_attempt_at": when(row["next_attempt_at"])
            if row["status"] == "pending" else None,
            "reason": row["last_error"], "uncertain": bool(row["uncertain"])}
