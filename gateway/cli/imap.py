"""``imap status``: each mailbox source and keep-original folder."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import (
    EXIT_OK,
    Parser,
    Subcommands,
    config_arg,
    jsonable,
    load_config,
    open_store,
    print_json,
    printable,
)
from gateway.store.mailboxes import MailboxState


def add_parsers(sub: Subcommands) -> None:
    imap = sub.add_parser("imap", help="mailbox import and kept originals (IMAP)")
    isub = imap.add_subparsers(dest="imap_command", required=True, parser_class=Parser)
    p = isub.add_parser("status", help="each mailbox source and keep-original folder: "
                                       "last success, last error, backlog")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_imap_status)


def cmd_imap_status(args: argparse.Namespace) -> int:
    config = load_config(args)
    state = MailboxState(open_store(args))
    seen = {(r["tenant_id"], r["source"], r["folder"]): r for r in state.status()}
    sources = []
    for tid, tenant in config.tenants.items():  # configured ones, looked at or not yet
        for name, source in tenant.imap_pull.items():
            for folder in source.folders:
                row = seen.get((tid, name, folder), {})
                sources.append({
                    "tenant": tid, "source": name, "folder": folder, "account": source.account,
                    "after_import": source.after_import,
                    "uidvalidity": row.get("uidvalidity"), "last_uid": row.get("last_uid", 0),
                    "imported": row.get("imported", 0), "backlog": row.get("backlog", 0),
                    "last_success_at": jsonable(row.get("last_success_at")),
                    "last_error": row.get("last_error"),
                    "last_error_at": jsonable(row.get("last_error_at")),
                })
    keep = [{k: jsonable(v) for k, v in t.items()} for t in state.keep_targets()]
    if args.json:
        print_json({"sources": sources, "keep_original": keep})
        return EXIT_OK
    def outcome(entry: dict[str, Any]) -> str:
        error = (f"; last error {entry['last_error_at']}: {printable(entry['last_error'], 120)}"
                 if entry["last_error"] else "")
        return f"last success {entry['last_success_at'] or 'never'}{error}"

    print("mailbox import:" if sources else "mailbox import: none configured")
    for s in sources:
        print(f"  {s['tenant']}/{s['source']} {printable(s['folder'], 40)!r} "
              f"({s['account']}, {s['after_import']}): {s['imported']} imported, "
              f"backlog {s['backlog']}, {outcome(s)}")
    print("kept originals:" if keep else "kept originals: none yet")
    for k in keep:
        print(f"  {k['tenant']} {k['account']}:{printable(k['folder'], 40)}: {k['sent']} "
              f"appended, backlog {k['pending'] + k['held']} ({k['held']} held), "
              f"{k['failed']} failed, {outcome(k)}")
    return EXIT_OK
