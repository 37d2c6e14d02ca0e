"""``rules test``: which workflow rules match a message, and the plan (sends nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    config_arg,
    load_config,
    load_policies,
    print_json,
    printable,
)
from gateway.pipeline.parse import parse_message
from gateway.workflow.rules import MessageView, evaluate


def add_parsers(sub: Subcommands) -> None:
    rules = sub.add_parser("rules", help="workflow rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True, parser_class=Parser)
    p = rsub.add_parser("test", help="which rules match a message, and the plan (sends nothing)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("file", metavar="FILE.eml")
    p.add_argument("--direction", choices=["inbound", "outbound"], default="inbound")
    p.add_argument("--sender", help="envelope sender (default: the From address)")
    p.add_argument("--recipient", action="append",
                   help="envelope recipient, repeatable (default: To and Cc addresses)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_test)


def cmd_rules_test(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.tenant not in config.tenants:
        raise CommandError(f"no tenant {args.tenant!r} in {args.config}")
    policies = load_policies(config)
    retention = policies.retention
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"{args.file}: {exc.strerror}") from None
    parsed = parse_message(raw, retention.classifier_for(args.tenant))
    roles = parsed["addresses"]
    sender = args.sender or next((a for r, a in roles if r == "from"), "")
    recipients = args.recipient or [a for r, a in roles if r in ("to", "cc")]
    view = MessageView(
        direction=args.direction, sender=sender, recipients=tuple(recipients),
        headers=tuple(parsed["headers"]),
        attachments=tuple((a["filename"] or "", a["content_type"] or "")
                          for a in parsed["attachments"]),
        size=len(raw), tags=frozenset(retention.tags_for(args.tenant, parsed["findings"])),
    )
    plan = evaluate(policies.workflows.for_tenant(args.tenant), view)
    tags = tuple(dict.fromkeys((*sorted(view.tags), *plan.tags)))
    if args.json:
        outcome = ("rejected" if plan.reject else "discarded" if plan.discard
                   else "delivered")
        print_json({"message": args.file, "size": len(raw), "direction": args.direction,
                   "sender": sender, "recipients": recipients,
                   "parse_defects": parsed["defects"] if parsed["parse_failed"] else [],
                   "found": parsed["findings"], "pre_tags": sorted(view.tags),
                   "matched": [{"rule": name, "why": why} for name, why in plan.matched],
                   "stopped_by": plan.stopped_by, "outcome": outcome, "reject": plan.reject,
                   "cc": list(plan.cc), "bcc": list(plan.bcc), "routes": list(plan.routes),
                   "tags": list(tags), "retention": retention.decide(args.tenant, tags).rule})
        return EXIT_OK
    print(f"message:    {args.file} ({len(raw)} bytes, {args.direction})")
    print(f"envelope:   from <{sender}> to {', '.join(f'<{r}>' for r in recipients) or '-'}")
    if parsed["parse_failed"]:
        print(f"parse:      {'; '.join(parsed['defects'])}")
    print(f"found:      {', '.join(parsed['findings']) or '-'}")
    if view.tags:
        print(f"pre-tags:   {', '.join(sorted(view.tags))} (tenant defaults and classifier)")
    if not plan.matched:
        print("matched:    no rule")
    for name, why in plan.matched:
        print(f"matched:    {name}: {printable(why)}")
    if plan.stopped_by:
        print(f"stopped by: {plan.stopped_by}")
    if plan.reject:
        print(f"outcome:    rejected at end of DATA: {plan.reject}")
    elif plan.discard:
        print("outcome:    discarded (accepted, then dropped without a bounce)")
    else:
        print("outcome:    delivered")
        print(f"cc copies:  {', '.join(plan.cc) or '-'}")
        print(f"bcc copies: {', '.join(plan.bcc) or '-'}")
        print(f"routes:     {', '.join(plan.routes) or '-'}")
    print(f"tags:       {', '.join(tags) or '-'}")
    print(f"retention:  {retention.decide(args.tenant, tags).rule}")
    return EXIT_OK
