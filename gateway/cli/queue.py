"""``queue list|retry|drop``: the delivery queue."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    jsonable,
    open_store,
    positive_int,
    print_json,
    printable,
)


def add_parsers(sub: Subcommands) -> None:
    queue = sub.add_parser("queue", help="the delivery queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, parser_class=Parser)
    p = qsub.add_parser("list", help="deliveries with their state, reason and next attempt")
    config_arg(p)
    p.add_argument("--status", choices=["pending", "held", "sent", "failed"])
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="include sent deliveries")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_list)
    p = qsub.add_parser("retry", help="make deferred, held or failed deliveries due now")
    config_arg(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=positive_int)
    which.add_argument("--all", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_retry)
    p = qsub.add_parser("drop", help="give up a delivery (it is kept as failed)")
    config_arg(p)
    p.add_argument("id", type=positive_int)
    p.add_argument("--reason", default="by an operator")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_drop)


def _delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "message": row["message_id"], "tenant": row["tenant_id"],
        "kind": row["kind"], "recipient": row["recipient"],
        "destination": row["destination"] or "relay", "rule": row["rule"],
        "status": row["status"], "attempts": row["attempts"],
        "next_attempt_at": jsonable(row["next_attempt_at"]) if row["status"] == "pending"
        else None,
        "reason": row["last_error"],
    }


def cmd_queue_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = [r for r in store.list_deliveries(status=args.status, tenant=args.tenant)
            if args.all or args.status == "sent" or r["status"] != "sent"]
    items = [_delivery_json(r) for r in rows]
    if args.json:
        print_json(items)
        return EXIT_OK
    if not items:  # as postqueue -p says, rather than a heading over nothing
        print("the queue is empty" + ("" if args.all or args.status else
                                      " (sent deliveries are listed with --all)"))
        return EXIT_OK
    print(f"{'ID':>6} {'MESSAGE':26} {'KIND':6} {'STATUS':7} {'TRIES':>5} {'NEXT ATTEMPT':19} "
          f"{'RECIPIENT':30} REASON")
    for d in items:
        # a kept original's "recipient" is a folder of an IMAP account
        to = f"{d['destination']}:{d['recipient']}" if d["kind"] == "append" else d["recipient"]
        print(f"{d['id']:>6} {d['message']:26} {d['kind']:6} {d['status']:7} {d['attempts']:>5} "
              f"{(d['next_attempt_at'] or '-')[:19]:19} {printable(to, 30):30} "
              f"{printable(d['reason'] or '-', 80)}")
    return EXIT_OK


def cmd_queue_retry(args: argparse.Namespace) -> int:
    store = open_store(args)
    count = store.retry_deliveries(None if args.all else args.id)
    if not args.all and count == 0:
        raise CommandError(f"no delivery {args.id} waiting to be retried")
    if args.json:
        print_json({"due_now": count, "delivery": None if args.all else args.id})
    else:
        print(f"{count} deliveries due now")
    return EXIT_OK


def cmd_queue_drop(args: argparse.Namespace) -> int:
    store = open_store(args)
    if not store.drop_delivery(args.id, args.reason):
        raise CommandError(f"no delivery {args.id} that could be dropped (unknown, or sent)")
    store.audit(actor(), "delivery.drop",
                detail={"delivery": args.id, "reason": args.reason[:200]})
    if args.json:
        print_json({"delivery": args.id, "status": "failed", "reason": args.reason})
    else:
        print(f"delivery {args.id} dropped")
    return EXIT_OK

