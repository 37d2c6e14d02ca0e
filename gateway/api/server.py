"""The admin HTTP API: a tenant's own data, for the tenant's own tools (aiohttp).

Every request but ``GET /api/v1/openapi.json`` carries ``Authorization: Bearer
TOKEN``; the token (``token create --tenant T``) belongs to one tenant, and
every query is limited to that tenant.  Anything of another tenant answers
404 exactly as something that does not exist, so a token cannot even learn
what exists elsewhere, nor from the time the answer takes: the lookup is
scoped to the tenant in the query itself.  Errors are JSON: ``{"error": "..."}``
with 400, 401, 404, 405 (with ``Allow``), 409, 413, 415, 429 (with
``Retry-After``) or 500; never a traceback, also for what aiohttp's HTTP parser
refuses before any of our code runs.  Request headers are never logged.  Every
call is an audit event (``api.*``, naming the token, never the content).

The database work runs in threads; exports run in the background, at most
``admin_api.max_exports_per_tenant`` of a tenant at once, into
``admin_api.export_directory``, and are downloaded when done, until an erasure
removes them; every few seconds the archives removed by an erasure elsewhere
go from this instance's disk too (``export.tidy``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from sqlalchemy.exc import SQLAlchemyError

from gateway import files
from gateway.api.openapi import MAX_LIMIT, openapi_document
from gateway.clock import aware
from gateway.config import GatewayConfig
from gateway.errors import one_line
from gateway.privacy import erasure, subject_address
from gateway.privacy import keys as privacy_keys
from gateway.privacy.export import export, tidy
from gateway.privacy.keys import PrivacyKey
from gateway.store.ids import new_id
from gateway.store.privacy import EXPORT_DONE, EXPORT_REMOVED, PrivacyStore
from gateway.store.repository import Store
from gateway.store.tokens import TokenOwner, TokenStore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OWNER = web.RequestKey("owner", TokenOwner)
# Matched whole (fullmatch) and before upper(), which makes a dotless i an ASCII "I"
_ID = re.compile(r"[0-9A-Za-z]{26}")
EXPORT_RETRY_AFTER = 10  # seconds: a small tenant's export is done by then
TIDY_INTERVAL = 2.0  # seconds between looks for archives an erasure removed


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None,
          ) -> web.Response:
    return web.json_response(doc, status=status, headers=headers, dumps=lambda d: json.dumps(
        d, default=_default, ensure_ascii=False, sort_keys=True))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return aware(value).isoformat()
    return str(value)


def _id(text: str) -> str | None:
    """The id (of a message or an export) that ``text`` names in any case, or None."""
    return text.upper() if _ID.fullmatch(text) else None


def _not_found() -> ApiError:
    return ApiError(404, "not found")


class _Connection(web.RequestHandler):
    """aiohttp's handler of one connection, answering in the API's JSON shape what its
    HTTP parser refuses before any middleware runs: a request line or header too long,
    a bad Content-Length, Transfer-Encoding beside Content-Length...  aiohttp's own
    answer is a text/plain page, and it logs the parser's message at ERROR, which
    quotes the offending bytes: an Authorization header among them."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None,
                     ) -> web.StreamResponse:
        self.log_exception("answered %d to a request from %s", status, request.remote,
                           exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp does: too late for an answer
            raise ConnectionError("the response had begun when the request failed")
        response = _json({"error": _refusal(status, exc)}, status)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # The exception's class only, never its text or traceback: a parser error quotes
        # the request's bytes, and so does a broken body that aiohttp reads on after the
        # answer (to let the client finish sending) and logs as "Unhandled exception".
        exc = kw.get("exc_info")
        log.warning("admin API: " + args[0] + " (%s)", *args[1:],
                    type(exc).__name__ if exc else "no exception")


def _refusal(status: int, exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):  # its message quotes the line: maybe a token
        return "the request line or a header is too long"
    if isinstance(exc, BadHttpMessage):  # the parser's reason, before the quoted bytes
        reason = exc.message.split(":\n")[0]
        return f"malformed request: {reason[:200]}"
    return HTTPStatus(status).phrase.lower()


class AdminAPI:
    def __init__(self, config: GatewayConfig, store: Store,
                 retention: Callable[[], Any]) -> None:
        self.config = config
        self.store = store
        self.privacy = PrivacyStore(store)
        self.tokens = TokenStore(store)
        self.key: PrivacyKey = privacy_keys.load_or_create(config.privacy.key_file)
        self.retention = retention  # the retention policy in force (legal holds)
        self.exports_dir = config.admin_api.export_directory
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self._exports: set[asyncio.Task[None]] = set()
        self._running: Counter[str] = Counter()  # exports per tenant, running or starting
        self._tidying: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ serving
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth],
                              client_max_size=self.config.admin_api.max_body)
        r = app.router
        r.add_get("/api/v1/openapi.json", self.openapi)
        r.add_get("/api/v1/messages", self.list_messages)
        r.add_get("/api/v1/messages/{id}", self.get_message)
        r.add_get("/api/v1/messages/{id}/eml", self.get_eml)
        r.add_post("/api/v1/exports", self.start_export)
        r.add_get("/api/v1/exports/{id}", self.get_export)
        r.add_get("/api/v1/exports/{id}/archive", self.download_export)
        r.add_post("/api/v1/erasures", self.erase)
        r.add_get("/api/v1/audit", self.audit)
        return app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.runner = web.AppRunner(self.app(), handle_signals=False)
        await self.runner.setup()
        server = self.runner.server
        assert server is not None, "set up above"
        loop = asyncio.get_running_loop()
        # Our own listener rather than a TCPSite: only it lets each connection be a
        # _Connection.  aiohttp's keep-alive timer runs from the connection's start (and
        # from each response) until a whole request head has arrived, and is not reset by
        # data: that makes it the header timeout.  No access log: it would hold headers.
        timeout = self.config.admin_api.header_timeout
        self.listener = await loop.create_server(
            lambda: _Connection(server, loop=loop, keepalive_timeout=timeout,
                                access_log=None),  # type: ignore[arg-type]  # None: off
            host, port, ssl=tls, reuse_address=True)
        self._tidying = asyncio.create_task(self._tidy(), name="export-tidy")

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        tasks = [*self._exports, *([self._tidying] if self._tidying else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            return _json({"error": str(exc)}, exc.status, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            return _json({"error": "the request body is too large"}, 413)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _json({"error": exc.reason.lower()}, exc.status, allow)
        except Exception as exc:  # a request fails, the daemon goes on
            log.error("admin API %s %s failed: %s", request.method, request.path,
                      one_line(exc))
            return _json({"error": "internal error"}, 500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/api/v1/openapi.json":
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        owner = None
        if scheme.lower() == "bearer" and token:
            owner = await asyncio.to_thread(self.tokens.verify, token.strip())
        if owner is None:
            raise ApiError(401, "a valid API token is needed: Authorization: Bearer TOKEN")
        request[OWNER] = owner
        status = 500
        try:
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
            resource = request.match_info.route.resource
            await asyncio.to_thread(
                self.store.audit, f"api:{owner.id}", f"api.{request.method.lower()}",
                tenant_id=owner.tenant_id,
                detail={"path": resource.canonical if resource else request.path[:200],
                        "status": status})

    # ------------------------------------------------------------ input
    @staticmethod
    def _tenant(request: web.Request) -> str:
        tenant: str = request[OWNER].tenant_id
        return tenant

    @staticmethod
    def _message_id(request: web.Request) -> str:
        value = _id(request.match_info["id"])
        if value is None:
            raise _not_found()
        return value

    @staticmethod
    def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
        text = request.query.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ApiError(400, f"{name}: not a whole number: {text[:40]!r}") from None
        if not low <= value <= high:
            raise ApiError(400, f"{name}: must be {low} to {high}")
        return value

    @staticmethod
    def _time(request: web.Request, name: str) -> datetime | None:
        text = request.query.get(name)
        if text is None:
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ApiError(400, f"{name}: not an ISO 8601 time: {text[:40]!r}") from None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @staticmethod
    async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
        try:
            body = await request.json()
        except RecursionError:  # the decoder's depth limit: no body of ours nests
            raise ApiError(400, "the body is nested too deeply") from None
        except LookupError:  # a charset parameter Python has no codec for
            raise ApiError(415, f"unknown charset {request.charset!r}") from None
        except web.RequestPayloadError:  # a broken chunk or Content-Encoding
            raise ApiError(400, "the body cannot be read as its headers say") from None
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = set(body) - allowed
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r} (known: "
                                f"{', '.join(sorted(allowed))})")
        return body

    @staticmethod
    def _subject(body: dict[str, Any], required: bool) -> str | None:
        if "subject" not in body and not required:
            return None
        value = body.get("subject")
        address = subject_address(value) if isinstance(value, str) else None
        if address is None:
            raise ApiError(400, "subject: an e-mail address is needed")
        return address

    # ------------------------------------------------------------ messages
    async def list_messages(self, request: web.Request) -> web.Response:
        limit = self._int(request, "limit", 100, 1, MAX_LIMIT)
        after = request.query.get("after")
        if after is not None and (after := _id(after)) is None:
            raise ApiError(400, "after: a message id is needed")
        address = request.query.get("address")
        if address is not None and subject_address(address) is None:
            raise ApiError(400, "address: an e-mail address is needed")
        since, until = self._time(request, "since"), self._time(request, "until")
        rows = await asyncio.to_thread(
            self.privacy.search, self._tenant(request), after=after, limit=limit,
            address=address, since=since, until=until)
        return _json({"messages": [_summary(r) for r in rows],
                      "next": rows[-1]["id"] if len(rows) == limit else None})

    async def _own(self, request: web.Request) -> dict[str, Any]:
        row = await asyncio.to_thread(self.store.get_message, self._message_id(request),
                                      self._tenant(request))
        if row is None:
            raise _not_found()
        return row

    async def get_message(self, request: web.Request) -> web.Response:
        row = await self._own(request)
        doc = _summary(row)
        doc.update({"header_addresses": [{"role": role, "address": a}
                                         for role, a in row["addresses"]],
                    "attachments": row["attachments"] or [], "sha256": row["sha256"],
                    "defects": row["defects"] or [], "direction": row["direction"]})
        return _json(doc)

    async def get_eml(self, request: web.Request) -> web.Response:
        row = await self._own(request)
        raw = await asyncio.to_thread(self.store.raw, row["id"])
        if raw is None:
            raise _not_found()
        return web.Response(body=raw, content_type="message/rfc822", headers={
            "Content-Disposition": f'attachment; filename="{row["id"]}.eml"'})

    # ------------------------------------------------------------ exports
    async def start_export(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"subject"})
        subject = self._subject(body, required=False)
        tenant = self._tenant(request)
        limit = self.config.admin_api.max_exports_per_tenant
        if self._running[tenant] >= limit:
            raise ApiError(429, f"{limit} exports of this tenant are running; start another "
                                f"when one is done (GET /api/v1/exports/ID)",
                           {"Retry-After": str(EXPORT_RETRY_AFTER)})
        self._running[tenant] += 1  # taken before the first await: a parallel request sees it
        try:
            export_id = new_id()
            directory = self.exports_dir / tenant
            await asyncio.to_thread(files.make_folders, directory)
            await asyncio.to_thread(self.privacy.record_export, export_id, tenant,
                                    self.key.subject_hash(subject) if subject else None)
        except BaseException:
            self._running[tenant] -= 1
            raise
        task = asyncio.create_task(self._run_export(export_id, tenant, subject,
                                                    request[OWNER].id))
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)
        task.add_done_callback(lambda _: self._running.subtract([tenant]))
        return _json({"id": export_id, "status": "running"}, 202)

    async def _run_export(self, export_id: str, tenant: str, subject: str | None,
                          token: str) -> None:
        path = self.exports_dir / tenant / f"{export_id}.tar"
        error: str | None = None
        size = 0
        try:
            size = (await asyncio.to_thread(
                export, self.privacy, self.config, tenant, path, actor=f"api:{token}",
                subject=subject, audit_detail={"export": export_id})).size
        except Exception as exc:
            error = one_line(exc)
        if not await asyncio.to_thread(self.privacy.finish_export, export_id,
                                       None if error else str(path), size, error):
            # an erasure came while it was written (and may have deleted it half-way):
            # the archive may hold what was erased
            await asyncio.to_thread(path.unlink, missing_ok=True)
            log.info("export %s of tenant %s was removed while it was written",
                     export_id, tenant)
        elif error:
            log.error("export %s of tenant %s failed: %s", export_id, tenant, error)

    async def _tidy(self) -> None:
        """Every few seconds: delete the archives on this instance's disk that an
        erasure removed (one that ran on another instance, or the command line)."""
        while True:
            await asyncio.sleep(TIDY_INTERVAL)
            try:
                gone = await asyncio.to_thread(tidy, self.privacy, self.exports_dir)
            except (SQLAlchemyError, OSError) as exc:  # tried again next time
                log.warning("export archives not tidied: %s", one_line(exc))
                continue
            except Exception:  # the loop goes on whatever failed
                log.exception("export archives not tidied")
                continue
            if gone:
                log.info("deleted %d export archives that an erasure removed", len(gone))

    async def _own_export(self, request: web.Request) -> dict[str, Any]:
        export_id = self._message_id(request)
        row = await asyncio.to_thread(self.privacy.get_export, export_id,
                                      self._tenant(request))
        if row is None:
            raise _not_found()
        return row

    async def get_export(self, request: web.Request) -> web.Response:
        row = await self._own_export(request)
        return _json({"id": row["id"], "status": row["status"], "created_at": row["created_at"],
                      "finished_at": row["finished_at"], "bytes": row["size"],
                      "error": row["error"],
                      "archive": f"/api/v1/exports/{row['id']}/archive"
                      if row["status"] == "done" else None})

    async def download_export(self, request: web.Request) -> web.Response:
        row = await self._own_export(request)
        if row["status"] == EXPORT_REMOVED:
            raise ApiError(404, f"the archive is gone: {row['error']}")
        if row["status"] != EXPORT_DONE:
            raise ApiError(409, f"the export is {row['status']}")
        try:
            archive = await asyncio.to_thread(open, row["path"], "rb")
        except FileNotFoundError:
            raise ApiError(404, "the archive is not on this instance (or was removed)") from None
        # The whole file, streamed, always a 200: FileResponse would also act on Range and
        # If-* headers, with 206, 304, 412 and 416 answers (empty tar pages for the errors).
        return web.Response(body=archive, headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": f'attachment; filename="{row["tenant_id"]}-{row["id"]}.tar"'})

    # ------------------------------------------------------------ erasure
    async def erase(self, request: web.Request) -> web.Response:
        body = await self._body(request, {"subject", "dry_run"})
        subject = self._subject(body, required=True)
        assert subject is not None
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(400, "dry_run: true or false")
        tenant = self._tenant(request)
        started = time.monotonic()
        plan = await asyncio.to_thread(erasure.plan, self.privacy, self.retention(),
                                       self.config, tenant, subject, datetime.now(UTC))
        doc: dict[str, Any] = {"dry_run": dry_run, "messages": len(plan.found),
                               "held": plan.held, "exports": plan.exports}
        if not dry_run:
            try:
                removed = await asyncio.to_thread(erasure.erase, self.privacy, self.key, plan,
                                                  actor=f"api:{request[OWNER].id}",
                                                  exports=self.exports_dir)
            except erasure.ErasureRefused as exc:
                raise ApiError(409, str(exc).replace(
                    " (--override-hold --reason TEXT erases it anyway)", "")) from None
            doc.update(removed.as_dict())
        doc["seconds"] = round(time.monotonic() - started, 3)
        return _json(doc)

    # ------------------------------------------------------------ audit
    async def audit(self, request: web.Request) -> web.Response:
        limit = self._int(request, "limit", 100, 1, MAX_LIMIT)
        since = self._time(request, "since")
        rows = await asyncio.to_thread(self.store.audit_events, self._tenant(request),
                                       since=since, limit=limit)
        return _json({"events": [{k: r[k] for k in ("id", "at", "actor", "action",
                                                     "message_id", "detail", "hash")}
                                 for r in rows]})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "received_at": row["received_at"], "status": row["status"],
            "sender": row["mail_from"], "recipients": row.get("recipients", []),
            "message_id": row["message_id"], "from": row["header_from"],
            "to": row["header_to"], "cc": row["header_cc"], "subject": row["subject"],
            "date": row["date"], "size": row["size"], "tags": row["tags"] or []}
