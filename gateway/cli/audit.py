"""``audit verify|list``: the tamper-evident audit log."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime

from gateway.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Parser,
    Subcommands,
    config_arg,
    jsonable,
    open_privacy,
    open_store,
    positive_int,
    print_json,
    printable,
    subject_address,
)


def add_parsers(sub: Subcommands) -> None:
    audit = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=Parser)
    p = asub.add_parser("verify", help="check that no event was changed, removed or inserted")
    config_arg(p)
    p.add_argument("--anchor", metavar="HASH", type=_hash,
                   help="a head printed by an earlier verify: it must still be in the chain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_verify)
    p = asub.add_parser("list", help="audit events, oldest first")
    config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--action", help="e.g. subject.erase, or a prefix such as tenant")
    p.add_argument("--subject", type=subject_address, metavar="ADDRESS",
                   help="only events about this person (erasures, exports)")
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD")
    p.add_argument("--limit", type=positive_int, help="the newest this many")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_list)


def _hash(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError("an event hash is 64 hexadecimal digits")
    return text


def _day(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def cmd_audit_verify(args: argparse.Namespace) -> int:
    verdict = open_store(args).verify_audit(args.anchor)
    if args.json:
        print_json({"ok": verdict.ok, "events": verdict.events, "unchained": verdict.unchained,
                   "head": verdict.head, "problem": verdict.problem,
                   "anchor_found": verdict.anchor_found})
        return EXIT_OK if verdict.ok else EXIT_FAILURE
    if verdict.problem:
        print(f"audit log TAMPERED: {verdict.problem}", file=sys.stderr)
        return EXIT_FAILURE
    if verdict.anchor_found is False:
        print(f"audit log TAMPERED: the anchor {args.anchor} is not in the chain: events "
              "were removed from its end", file=sys.stderr)
        return EXIT_FAILURE
    before = f" ({verdict.unchained} from before the chain began)" if verdict.unchained else ""
    print(f"audit log intact: {verdict.events} events{before}, head {verdict.head or '-'}")
    return EXIT_OK


def cmd_audit_list(args: argparse.Namespace) -> int:
    subject_hash = None
    if args.subject:
        _config, key, _store = open_privacy(args)
        subject_hash = key.subject_hash(args.subject)
    rows = open_store(args).audit_events(args.tenant, action=args.action,
                                         subject_hash=subject_hash, since=args.since,
                                         limit=args.limit)
    items = [{"id": r["id"], "at": jsonable(r["at"]), "tenant": r["tenant_id"],
              "actor": r["actor"], "action": r["action"], "message": r["message_id"],
              "detail": r["detail"], "hash": r["hash"]} for r in rows]
    if args.json:
        print_json(items)
        return EXIT_OK
    print(f"{'ID':>6} {'AT':32} {'TENANT':14} {'ACTOR':18} {'ACTION':24} DETAIL")
    for e in items:
        detail = json.dumps(e["detail"], sort_keys=True, ensure_ascii=False)
        if e["message"]:
            detail = f"message={e['message']} {detail}"
        print(f"{e['id']:>6} {e['at']:32} {printable(e['tenant'], 14):14} "
              f"{printable(e['actor'], 18):18} {e['action']:24} {printable(detail, 100)}")
    return EXIT_OK
