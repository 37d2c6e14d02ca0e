"""``incident notify``: a personal-data breach notice to the tenant's privacy contact."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    known_tenant,
    load_policies,
    open_privacy,
    subject_address,
)
from gateway.clock import utcnow
from gateway.privacy import incident


def add_parsers(sub: Subcommands) -> None:
    group = sub.add_parser("incident", help="personal-data breach notices")
    isub = group.add_subparsers(dest="incident_command", required=True, parser_class=Parser)
    p = isub.add_parser("notify", help="send a breach notice to the tenant's privacy contact "
                                       "through the delivery queue (audited)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--file", required=True, metavar="NOTICE.txt", help="the notice (UTF-8)")
    p.add_argument("--discovered", required=True, type=_when, metavar="TIME",
                   help="when the incident was discovered (ISO 8601, e.g. 2026-11-24T09:30Z)")
    p.add_argument("--title", default="Notice of a personal data breach",
                   help="the subject of the mail")
    p.add_argument("--to", type=subject_address, metavar="ADDRESS",
                   help="instead of the privacy_contact in subprocessors.yaml")
    p.add_argument("--from", dest="sender", type=subject_address, metavar="ADDRESS",
                   help="the sender (default: notice.from of subprocessors.yaml)")
    p.set_defaults(func=cmd_incident_notify)


def _when(text: str) -> datetime:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (ISO 8601): {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_incident_notify(args: argparse.Namespace) -> int:
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    routing = load_policies(config).subprocessors
    to = args.to or incident.privacy_contact(routing, args.tenant)
    if not to:
        raise CommandError(f"tenant {args.tenant} has no privacy_contact in "
                           "subprocessors.yaml: give --to ADDRESS")
    sender = args.sender or incident.notice_sender(routing, config.smtp.hostname)
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"{args.file}: {exc.strerror}") from None
    tenant = config.tenants.get(args.tenant)
    try:
        notice = incident.build(
            tenant=args.tenant, tenant_name=(tenant.name if tenant else "") or args.tenant,
            sender=sender, to=to, text=incident.read_text(data, args.file), title=args.title,
            discovered_at=args.discovered, now=utcnow(), hostname=config.smtp.hostname)
    except incident.NoticeError as exc:
        raise CommandError(str(exc)) from None
    store.queue_notice(notice.message, actor(), "incident.notify", notice.audit_detail())
    print(f"notice {notice.message.id} queued for {to}, {notice.hours:.1f} hours after "
          "discovery; follow it with: queue list --all")
    if notice.hours > incident.PROMISE_HOURS:
        print(f"mailflowr-gateway: warning: this is later than the {incident.PROMISE_HOURS} "
              "hours promised; the audit log records it", file=sys.stderr)
    return EXIT_OK
