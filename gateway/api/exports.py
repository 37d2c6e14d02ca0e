"""The admin API's exports and erasures.

Exports run in the background, at most ``admin_api.max_exports_per_tenant`` of a tenant
at once, into ``admin_api.export_directory``, and are downloaded when done, until an
erasure removes them or they expire (``admin_api.export_expiry``); every few seconds the
archives removed elsewhere go from this instance's disk too (``export.tidy``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from gateway import files
from gateway.api.http import (
    ApiError,
    Context,
    Route,
    actor,
    body_subject,
    not_found,
    path_id,
    read_body,
    reply,
    tenant,
)
from gateway.errors import one_line
from gateway.privacy import erasure
from gateway.privacy.export import export, tidy
from gateway.store.ids import new_id
from gateway.store.privacy import EXPORT_DONE, EXPORT_REMOVED

log = logging.getLogger("gateway.api")

EXPORT_RETRY_AFTER = 10  # seconds: a small tenant's export is done by then
TIDY_INTERVAL = 2.0  # seconds between looks for archives an erasure removed
EXPIRE_INTERVAL = 60.0  # seconds between looks for expired exports


class ExportRoutes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.directory = ctx.config.admin_api.export_directory
        self._exports: set[asyncio.Task[None]] = set()
        self._running: Counter[str] = Counter()  # exports per tenant, running or starting
        # what each export running here has written so far: messages, bytes
        self._written: dict[str, tuple[int, int]] = {}
        self._tidying: asyncio.Task[None] | None = None

    def routes(self) -> list[Route]:
        return [Route("POST", "/exports", self.start_export, "export"),
                Route("GET", "/exports/{id}", self.get_export, "read"),
                Route("GET", "/exports/{id}/archive", self.download, "export"),
                Route("POST", "/erasures", self.erase, "erase")]

    def start(self) -> None:
        self._tidying = asyncio.create_task(self._tidy(), name="export-tidy")

    async def close(self) -> None:
        tasks = [*self._exports, *([self._tidying] if self._tidying else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ exports
    async def start_export(self, request: web.Request) -> web.Response:
        body = await read_body(request, {"subject"})
        subject = body_subject(body, required=False)
        mine = tenant(request)
        limit = self.ctx.config.admin_api.max_exports_per_tenant
        if self._running[mine] >= limit:
            raise ApiError(429, f"{limit} exports of this tenant are running; start another "
                                f"when one is done (GET /api/v1/exports/ID)",
                           {"Retry-After": str(EXPORT_RETRY_AFTER)})
        self._running[mine] += 1  # taken before the first await: a parallel request sees it
        try:
            export_id = new_id()
            await asyncio.to_thread(files.make_folders, self.directory / mine)
            await asyncio.to_thread(self.ctx.privacy.record_export, export_id, mine,
                                    self.ctx.key.subject_hash(subject) if subject else None)
        except BaseException:
            self._running[mine] -= 1
            raise
        task = asyncio.create_task(self._run_export(export_id, mine, subject,
                                                    actor(request)))
        self._exports.add(task)
        task.add_done_callback(self._exports.discard)
        task.add_done_callback(lambda _: self._running.subtract([mine]))
        return reply({"id": export_id, "status": "running"}, 202)

    async def _run_export(self, export_id: str, mine: str, subject: str | None,
                          by: str) -> None:
        path = self.directory / mine / f"{export_id}.tar"
        error: str | None = None
        size = 0
        def written(messages: int, size: int) -> None:  # in the export's thread
            self._written[export_id] = (messages, size)

        self._written[export_id] = (0, 0)
        try:
            size = (await asyncio.to_thread(
                export, self.ctx.privacy, self.ctx.config, mine, path, actor=by,
                subject=subject, audit_detail={"export": export_id}, progress=written)).size
        except Exception as exc:
            error = one_line(exc)
        finally:
            self._written.pop(export_id, None)
        if not await asyncio.to_thread(self.ctx.privacy.finish_export, export_id,
                                       None if error else str(path), size, error):
            # an erasure came while it was written (and may have deleted it half-way):
            # the archive may hold what was erased
            await asyncio.to_thread(path.unlink, missing_ok=True)
            log.info("export %s of tenant %s was removed while it was written",
                     export_id, mine)
        elif error:
            log.error("export %s of tenant %s failed: %s", export_id, mine, error)

    async def _tidy(self) -> None:
        """Every few seconds: delete the archives on this instance's disk that an
        erasure removed (one that ran on another instance, or the command line), or that
        expired (``admin_api.export_expiry``, looked for every minute)."""
        expiry = self.ctx.config.admin_api.export_expiry
        last_expiry = 0.0
        while True:
            await asyncio.sleep(TIDY_INTERVAL)
            try:
                if time.monotonic() - last_expiry >= min(EXPIRE_INTERVAL, expiry):
                    expired = await asyncio.to_thread(
                        self.ctx.privacy.expire_exports,
                        datetime.now(UTC) - timedelta(seconds=expiry))
                    last_expiry = time.monotonic()
                    if expired:
                        log.info("%d exports expired: %s", len(expired), " ".join(expired))
                gone = await asyncio.to_thread(tidy, self.ctx.privacy, self.directory)
            except (SQLAlchemyError, OSError) as exc:  # tried again next time
                log.warning("export archives not tidied: %s", one_line(exc))
                continue
            except Exception:  # the loop goes on whatever failed
                log.exception("export archives not tidied")
                continue
            if gone:
                log.info("deleted %d export archives that an erasure removed", len(gone))

    async def _own_export(self, request: web.Request) -> dict[str, Any]:
        row = await asyncio.to_thread(self.ctx.privacy.get_export, path_id(request),
                                      tenant(request))
        if row is None:
            raise not_found()
        return row

    async def get_export(self, request: web.Request) -> web.Response:
        row = await self._own_export(request)
        messages, size = self._written.get(row["id"], (None, row["size"]))
        return reply({"id": row["id"], "status": row["status"], "created_at": row["created_at"],
                      "finished_at": row["finished_at"], "bytes": size,
                      "messages": messages if row["status"] == "running" else None,
                      "error": row["error"],
                      "archive": f"/api/v1/exports/{row['id']}/archive"
                      if row["status"] == "done" else None})

    async def download(self, request: web.Request) -> web.Response:
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
        body = await read_body(request, {"subject", "dry_run"})
        subject = body_subject(body, required=True)
        assert subject is not None
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(400, "dry_run: true or false")
        mine = tenant(request)
        started = time.monotonic()
        plan = await asyncio.to_thread(erasure.plan, self.ctx.privacy,
                                       self.ctx.policies().retention, self.ctx.config, mine,
                                       subject, datetime.now(UTC))
        doc: dict[str, Any] = {"dry_run": dry_run, "messages": len(plan.found),
                               "held": plan.held, "exports": plan.exports}
        if not dry_run:
            try:
                removed = await asyncio.to_thread(erasure.erase, self.ctx.privacy,
                                                  self.ctx.key, plan, actor=actor(request),
                                                  exports=self.directory)
            except erasure.ErasureRefused as exc:
                raise ApiError(409, str(exc).replace(
                    " (--override-hold --reason TEXT erases it anyway)", "")) from None
            doc.update(removed.as_dict())
        doc["seconds"] = round(time.monotonic() - started, 3)
        return reply(doc)
