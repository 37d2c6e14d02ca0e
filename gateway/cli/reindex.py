"""``messages reindex``: mail stored before the search index existed, put into it, and
entries made before revision 0018 given their tags (gateway.store.search.backfill).

The messages are parsed as the pipeline parses them, in a worker process of their
own (a hostile message overruns ``pipeline.parse_timeout`` there, not here), a few
at a time, and indexed in small transactions beside a running daemon; a message
erased or expired meanwhile is left out.  Run again, it carries on where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Progress,
    actor,
    load_config,
    open_store,
    print_json,
)
from gateway.config import GatewayConfig
from gateway.pipeline.parse import ParserPool, to_fields
from gateway.store.repository import Store
from gateway.workers import WorkerPool

BATCH = 50  # messages a transaction
BACKFILL = 500  # entries completed a transaction
PARSE_CALL = 10  # messages a call to the parser process


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="only this tenant's mail (default: every tenant whose "
                                    "search is on)")
    p.add_argument("--json", action="store_true", help="the counts as JSON")


def cmd_messages_reindex(args: argparse.Namespace) -> int:
    config = load_config(args)
    off = {name for name, tenant in config.tenants.items() if not tenant.search}
    if args.tenant is not None and args.tenant in off:
        raise CommandError(f"tenant {args.tenant} has search: false: its mail is not indexed")
    store = open_store(args, config)
    shown = Progress("messages reindex", "messages indexed")
    indexed, unreadable = asyncio.run(_reindex(config, store, args.tenant, off, shown))
    shown.done()
    # entries of revision 0017 and before: their tags (and fields' lexemes) added
    completed = 0
    shown = Progress("messages reindex", "entries completed")
    while done := store.backfill(BACKFILL, [args.tenant] if args.tenant else None):
        completed += done
        shown(completed)
    shown.done()
    store.audit(actor(), "search.reindex", tenant_id=args.tenant,
                detail={"messages": indexed, "unreadable": unreadable,
                        "completed": completed})
    if args.json:
        print_json({"indexed": indexed, "unreadable": unreadable, "completed": completed})
    else:
        print(f"{indexed} messages indexed" + (
            f" ({unreadable} of them only by their headers: the parser could not read "
            "them)" if unreadable else "")
            + (f"; {completed} entries given their tags" if completed else ""))
    return EXIT_OK


async def _reindex(config: GatewayConfig, store: Store, tenant: str | None,
                   off: set[str], progress: Callable[[int], None]) -> tuple[int, int]:
    timeout = config.pipeline.parse_timeout
    pool: WorkerPool[None] = WorkerPool("reindex", 1, 1, None, timeout)
    await pool.start()
    parser = ParserPool(pool, 1, timeout)
    after, indexed, unreadable = "", 0, 0
    try:
        while True:
            rows = await asyncio.to_thread(store.unindexed, after, BATCH,
                                           [tenant] if tenant else None)
            if not rows:
                return indexed, unreadable
            after = rows[-1]["id"]
            items = []
            for start in range(0, len(rows), PARSE_CALL):
                part = [r for r in rows[start:start + PARSE_CALL] if r["tenant_id"] not in off]
                raws = [(r, await asyncio.to_thread(store.raw, r["id"])) for r in part]
                found = [(r, raw) for r, raw in raws if raw is not None]
                results = await parser.parse_many([(raw, None) for _, raw in found])
                for (r, _), result in zip(found, results, strict=True):
                    unreadable += bool(result.get("parse_failed"))
                    items.append((r["id"], r["tenant_id"], to_fields(result)))
            indexed += await asyncio.to_thread(store.reindex, items)
            progress(indexed)
    finally:
        await pool.close()
