"""``messages list|show|search|export``: stored messages, what is known about each,
the full-text search of a tenant's mail, and the stored original."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

from gateway import files, query
from gateway.cli import reindex
from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    jsonable,
    load_config,
    load_policies,
    open_store,
    positive_int,
    print_json,
    printable,
)
from gateway.cli.status import ask_daemon
from gateway.clock import aware, utcnow
from gateway.config import GatewayConfig
from gateway.policyset import PolicyError, retention_in_force
from gateway.store.pages import Pages
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store


def add_parsers(sub: Subcommands) -> None:
    msgs = sub.add_parser("messages", help="stored messages")
    msub = msgs.add_subparsers(dest="messages_command", required=True, parser_class=Parser)
    p = msub.add_parser("list", help="list stored messages, oldest first")
    config_arg(p)
    p.add_argument("--tenant", help="only this tenant's messages")
    p.add_argument("--status", choices=["received", "processed", "quarantined"])
    p.add_argument("--limit", type=positive_int, help="at most this many")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=cmd_messages_list)

    p = msub.add_parser("show", help="everything stored about one message")
    config_arg(p)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_messages_show)

    p = msub.add_parser("search", help="a tenant's messages that match a query, best first",
                        description=query.__doc__.split("\n\n", 1)[1].strip()
                        if query.__doc__ else None)
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("query", type=_query,
                   help='words, "a phrase", prefix*, from: to: subject: tag: '
                        "before:YYYY-MM-DD after:YYYY-MM-DD has:attachment")
    p.add_argument("--limit", type=_page_size, default=20,
                   help=f"results a page (20, at most {query.MAX_PAGE})")
    p.add_argument("--page", type=positive_int, default=1, help="which page (1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_messages_search)

    p = msub.add_parser("reindex", help="put mail stored before the search index existed "
                                        "into it (beside a running daemon)")
    config_arg(p)
    reindex.add_arguments(p)
    p.set_defaults(func=reindex.cmd_messages_reindex)

    p = msub.add_parser("export", help="write the stored original as .eml")
    config_arg(p)
    p.add_argument("id")
    p.add_argument("--out", "-o", metavar="FILE",
                   help="write here instead of stdout (not over an existing file)")
    p.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    p.add_argument("--with-trace", action="store_true",
                   help="prepend the Received header the gateway added")
    p.set_defaults(func=cmd_messages_export)


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant": row["tenant_id"],
        "status": row["status"],
        "received_at": jsonable(row["received_at"]),
        "message_id": row["message_id"],
        "sender": row["mail_from"],
        "recipients": row["recipients"],
        "subject": row["subject"],
        "size": row["size"],
        "tags": row["tags"],
        "parse_failed": row["parse_failed"],
    }


def cmd_messages_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = store.list_messages(tenant=args.tenant, limit=args.limit, status=args.status)
    if args.json:
        print_json([_summary(r) for r in rows])
        return EXIT_OK
    print(f"{'ID':26}  {'RECEIVED (UTC)':19} {'TENANT':12} {'STATUS':11} {'SIZE':>8}  "
          f"{'SENDER':30} SUBJECT")
    for r in rows:
        received = aware(r["received_at"]).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r['id']:26}  {received:19} {printable(r['tenant_id'], 12):12} "
              f"{r['status']:11} {r['size']:>8}  {printable(r['mail_from'] or '<>', 30):30} "
              f"{printable(r['subject'], 60)}")
    return EXIT_OK


def _query(text: str) -> query.Query:
    try:
        return query.parse(text)
    except query.QueryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _page_size(text: str) -> int:
    size = positive_int(text)
    if size > query.MAX_PAGE:
        raise argparse.ArgumentTypeError(f"at most {query.MAX_PAGE}")
    return size


def cmd_messages_search(args: argparse.Namespace) -> int:
    store = open_store(args)
    if PrivacyStore(store).tenant_row(args.tenant) is None:
        raise CommandError(f"no tenant {args.tenant} in the database")
    rows = store.search_for(actor(), args.tenant, args.query, args.limit,
                            (args.page - 1) * args.limit)
    found = [{**r, "received_at": jsonable(r["received_at"])} for r in rows]
    if args.json:
        print_json(found)
        return EXIT_OK
    if not found:
        print("no message matches" + (f" on page {args.page}" if args.page > 1 else ""))
        return EXIT_OK
    print(f"{'ID':26}  {'RECEIVED (UTC)':19} {'SENDER':30} SUBJECT")
    for r in found:
        received = r["received_at"][:19].replace("T", " ")
        print(f"{r['id']:26}  {received:19} {printable(r['sender'] or '<>', 30):30} "
              f"{printable(r['subject'], 60)}")
        shown = "".join(f"[{s['text']}]" if s["match"] else str(s["text"])
                        for s in r["snippet"])
        if shown.strip():
            print(f"{'':28}{printable(' '.join(shown.split()), 100)}")
    return EXIT_OK


def _get(store: Store, message_id: str) -> dict[str, Any]:
    row = store.get_message(message_id.upper())
    if row is None:
        raise CommandError(f"no message with id {message_id}")
    result: dict[str, Any] = row
    return result


def cmd_messages_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    row = _get(store, args.id)
    data = _summary(row)
    data.update(
        {
            "header_from": row["header_from"], "header_to": row["header_to"],
            "header_cc": row["header_cc"], "date": row["date"],
            "attachments": row["attachments"] or [], "defects": row["defects"] or [],
            "sha256": row["sha256"], "client_address": row["client_address"],
            "helo": row["helo"], "protocol": row["protocol"],
            "processed_at": jsonable(row["processed_at"]), "last_error": row["last_error"],
            "attempts": row["attempts"], "policy_version": row["policy_version"],
            **_auth_summary(row["auth_results"] or {}),
        }
    )
    data.update(_retention_of(load_config(args), store, row))
    copies = Pages(store).copies(row["tenant_id"], row["id"])
    data["rules"] = sorted({c["rule"] for c in copies})  # those that made copies or routes
    data["deliveries"] = [
        {"id": c["id"], "kind": c["kind"], "recipient": c["recipient"],
         "destination": c["destination"] or "relay", "rule": c["rule"],
         "status": c["status"], "attempts": c["attempts"], "reason": c["last_error"]}
        for c in copies]
    store.audit(actor(), "message.show", tenant_id=row["tenant_id"], message_id=row["id"])
    if args.json:
        print_json(data)
        return EXIT_OK
    width = max(map(len, data)) + 2  # the values in one column
    for key, value in data.items():
        if key == "deliveries":  # one line each
            lines = [f"{d['id']} {d['kind']} {d['recipient']} via {d['destination']}: "
                     f"{d['status']} after {d['attempts']} attempts"
                     + (f" ({d['reason']})" if d["reason"] and d["status"] != "sent" else "")
                     for d in value] or ["-"]
            for n, line in enumerate(lines):
                print(f"{'deliveries:' if n == 0 else '':{width}}{printable(line)}")
            continue
        if isinstance(value, list):
            value = ", ".join(json.dumps(v) if isinstance(v, dict) else str(v)
                              for v in value) or "-"
        print(f"{key + ':':{width}}{printable(value)}")
    return EXIT_OK


def _auth_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The stored authentication results, one line per check."""
    def line(r: dict[str, str], detail: str) -> str:
        return r["result"] + detail + (f" ({r['reason']})" if r.get("reason") else "")

    out: dict[str, Any] = {"dkim": [
        line(r, f" d={r['domain']} s={r['selector']}" if r["domain"] else "")
        for r in results.get("dkim", [])]}
    if "spf" in results:
        spf = results["spf"]
        out["spf"] = line(spf, f" {spf['identity']}={spf['domain']}" if spf["domain"] else "")
    if "arc" in results:
        out["arc"] = line(results["arc"], "")
    if "dmarc" in results:
        d = results["dmarc"]
        out["dmarc"] = line(d, (f" from={d['domain']}" if d["domain"] else "")
                            + (f" p={d['policy']} disposition={d['disposition']}"
                               if d["policy"] else ""))
    return out


def _retention_of(config: GatewayConfig, store: Store, row: dict[str, Any]
                  ) -> dict[str, Any]:
    """Which retention rule applies to a stored message, when it expires and what holds
    it: under the policy files on disk, which are the policy in force when the running
    daemon has the same version (asked over its metrics port); otherwise it says so."""
    try:
        in_force: str | None = ask_daemon(config, timeout=3)["policy"]["version"]
    except (CommandError, KeyError, TypeError):
        in_force = None
    try:
        files = load_policies(config)
    except PolicyError as exc:
        kept = f"; the daemon keeps policy {in_force} in force" if in_force else ""
        return {"retention": f"unknown: the policy files do not validate "
                             f"({exc.problems[0]}){kept}"}
    policy = retention_in_force(files.retention, store)
    s = policy.standing(row["tenant_id"], row["tags"] or [],
                        {a.lower() for _, a in row.get("addresses", [])},
                        aware(row["received_at"]), row["status"] != "received", utcnow())
    result: dict[str, Any] = {
        "retention": s.rule, "held_by": s.held_by,
        **({"expires_at": s.expires_at.isoformat()} if s.expires_at else {}),
        "retention_policy": files.version}
    if in_force is None:
        result["retention_note"] = (f"no daemon answered: this is policy {files.version} of "
                                    "the files on disk")
    elif in_force != files.version:
        result["retention_note"] = (f"the daemon has policy {in_force} in force, not "
                                    f"{files.version} of the files on disk (not reloaded "
                                    "yet, or refused: see status)")
    return result


def cmd_messages_export(args: argparse.Namespace) -> int:
    store = open_store(args)
    row = _get(store, args.id)
    raw = store.raw(row["id"])
    if raw is None:
        raise CommandError(f"message {row['id']}: the stored original is missing")
    if hashlib.sha256(raw).hexdigest() != row["sha256"]:
        raise CommandError(f"message {row['id']}: the stored original fails its checksum")
    data = (row["trace_header"].encode() if args.with_trace else b"") + raw
    if args.out:
        out = Path(args.out)
        try:
            if out.exists() and not out.is_file():
                # a device or a pipe (/dev/stdout, a FIFO) is written to, never replaced
                with out.open("ab") as f:
                    f.write(data)
            elif out.exists() and not args.force:
                raise CommandError(f"{args.out}: exists; --force replaces it")
            else:  # a file appears whole or not at all
                tmp = out.with_name(f".{out.name}.tmp")
                with os.fdopen(files.create(tmp), "wb") as f:  # personal data: 0600
                    f.write(data)
                tmp.replace(out)
        except OSError as exc:
            raise CommandError(f"{args.out}: {exc.strerror}") from None
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    store.audit(
        actor(), "message.export",
        tenant_id=row["tenant_id"], message_id=row["id"], detail={"bytes": len(data)},
    )
    return EXIT_OK
