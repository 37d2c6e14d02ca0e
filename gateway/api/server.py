"""The admin HTTP API: a tenant's own data, for the tenant's own tools (aiohttp).

Every request but ``GET /api/v1/openapi.json`` carries ``Authorization: Bearer
TOKEN``; the token (``token create --tenant T --scope S``) belongs to one tenant, and
every query is limited to that tenant.  Anything of another tenant answers 404
exactly as something that does not exist, so a token cannot even learn what exists
elsewhere, nor from the time the answer takes: the lookup is scoped to the tenant in
the query itself.  A route needs a scope of the token (``store.tokens``): without it,
403.  A refused token is logged with the client's address (never the token) and
counted, for fail2ban and alerts.  Errors are JSON: ``{"error": "..."}`` with 400,
401, 403, 404, 405 (with ``Allow``), 409, 413, 415, 429 (with ``Retry-After``) or 500;
never a traceback, also for what aiohttp's HTTP parser refuses before any of our code
runs.  Request headers are never logged.  Every call is an audit event (``api.*``,
naming the token, never the content).  The database work runs in threads.

The routes live beside this module, one group each: ``messages``, ``deliveries``,
``exports`` (and erasures), ``records`` (users, contacts, sub-processors, holds, audit).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from gateway.api.console import COOKIE, HEADERS, ConsoleRoutes
from gateway.api.deliveries import DeliveryRoutes
from gateway.api.exports import ExportRoutes
from gateway.api.http import OWNER, ApiError, Connection, Context, Handler, Route, reply
from gateway.api.messages import MessageRoutes
from gateway.api.openapi import openapi_document
from gateway.api.records import RecordRoutes
from gateway.config import GatewayConfig
from gateway.errors import one_line
from gateway.metrics import Metrics
from gateway.policyset import PolicySet
from gateway.privacy import keys as privacy_keys
from gateway.store.pages import Pages
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store
from gateway.store.tokens import TokenRefused, TokenStore

log = logging.getLogger("gateway.api")

PREFIX = "/api/v1"
TOKEN_NEEDED = "a valid API token is needed: Authorization: Bearer TOKEN"


class AdminAPI:
    def __init__(self, config: GatewayConfig, store: Store,
                 policies: Callable[[], PolicySet], metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.tokens = TokenStore(store)
        self.ctx = Context(config, store, PrivacyStore(store), Pages(store),
                           privacy_keys.load_or_create(config.privacy.key_file), policies)
        self.exports = ExportRoutes(self.ctx)
        self.console = ConsoleRoutes(store, self.tokens, metrics)
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self._scopes: dict[AbstractRoute, str] = {}

    def routes(self) -> list[Route]:
        return [Route("GET", "/openapi.json", self.openapi, None),
                *MessageRoutes(self.ctx).routes(), *DeliveryRoutes(self.ctx).routes(),
                *self.exports.routes(), *RecordRoutes(self.ctx).routes()]

    # ------------------------------------------------------------ serving
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth],
                              client_max_size=self.config.admin_api.max_body)
        app.on_response_prepare.append(_secure_headers)
        routes = [(PREFIX + r.path, r) for r in self.routes()]
        for path, route in [*routes, *((r.path, r) for r in self.console.routes())]:
            added = app.router.add_route(route.method, path, route.handler)
            if route.scope is not None:
                self._scopes[added] = route.scope
            if route.method == "GET":  # as add_get does: HEAD answers as GET does
                head = app.router.add_route("HEAD", path, route.handler)
                if route.scope is not None:
                    self._scopes[head] = route.scope
        return app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.runner = web.AppRunner(self.app(), handle_signals=False)
        await self.runner.setup()
        server = self.runner.server
        assert server is not None, "set up above"
        loop = asyncio.get_running_loop()
        # Our own listener rather than a TCPSite: only it lets each connection be a
        # Connection.  aiohttp's keep-alive timer runs from the connection's start (and
        # from each response) until a whole request head has arrived, and is not reset by
        # data: that makes it the header timeout.  No access log: it would hold headers.
        timeout = self.config.admin_api.header_timeout
        self.listener = await loop.create_server(
            lambda: Connection(server, loop=loop, keepalive_timeout=timeout,
                               access_log=None),  # type: ignore[arg-type]  # None: off
            host, port, ssl=tls, reuse_address=True)
        self.exports.start()

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await self.exports.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.listener is not None:
            await self.listener.wait_closed()

    # ------------------------------------------------------------ middlewares
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return reply({"error": str(exc)}, exc.status, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            return reply({"error": "the request body is too large"}, 413)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return reply({"error": exc.reason.lower()}, exc.status, allow)
        except Exception as exc:  # a request fails, the daemon goes on
            log.error("admin API %s %s failed: %s", request.method, request.path,
                      one_line(exc))
            return reply({"error": "internal error"}, 500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route
        if not request.path.startswith(PREFIX + "/") or (
                route.resource is not None
                and route.resource.canonical == PREFIX + "/openapi.json"):
            return await handler(request)  # the console's pages and its login
        header = request.headers.get("Authorization")
        scheme, _, token = (header or "").partition(" ")
        try:
            if header is None and COOKIE in request.cookies:
                owner = await self.console.caller(request)
            elif scheme.lower() != "bearer" or not token.strip():
                raise TokenRefused("missing", "no bearer token")
            else:
                owner = await asyncio.to_thread(self.tokens.verify, token.strip())
        except TokenRefused as refused:
            self.metrics.api_auth_failures.labels(refused.reason).inc()
            log.warning("admin API: authentication failed from %s: %s", request.remote,
                        refused)
            raise ApiError(401, TOKEN_NEEDED) from None
        request[OWNER] = owner
        status = 500
        try:
            scope = self._scopes.get(route)
            if scope is not None and not owner.may(scope):
                raise ApiError(403, f"this token lacks the scope {scope!r} "
                                    f"(it has: {', '.join(sorted(owner.scopes))})")
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:  # refusals are audited too: a token probing for ids shows
            status = exc.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = route.resource
            await asyncio.to_thread(
                self.store.audit, owner.actor, f"api.{request.method.lower()}",
                tenant_id=owner.tenant_id,
                detail={"path": resource.canonical if resource else request.path[:200],
                        "status": status})

    async def openapi(self, request: web.Request) -> web.Response:
        return reply(openapi_document())


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, the console's pages and the API's JSON alike: nothing framed,
    sniffed, cached or run but the console's own files."""
    response.headers.update(HEADERS)
