"""``incident open|notify|list|show|close``: personal-data incidents as records, and the
breach notice to each affected tenant's privacy contact, due 48 hours after discovery."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    jsonable,
    known_tenant,
    load_policies,
    open_privacy,
    open_store,
    positive_int,
    print_json,
    printable,
    subject_address,
    when,
)
from gateway.clock import utcnow
from gateway.privacy import incident
from gateway.store.incidents import IncidentStore


def add_parsers(sub: Subcommands) -> None:
    group = sub.add_parser("incident", help="personal-data incidents and breach notices")
    isub = group.add_subparsers(dest="incident_command", required=True, parser_class=Parser)
    p = isub.add_parser("open", help="record an incident: when it was discovered, the "
                                     "tenants it affects (audited)")
    config_arg(p)
    p.add_argument("--tenant", required=True, action="append", dest="tenants",
                   metavar="T", help="a tenant affected (again for each)")
    p.add_argument("--discovered", required=True, type=when, metavar="TIME",
                   help="when the incident was discovered (ISO 8601, e.g. 2026-11-24T09:30Z)")
    p.add_argument("--description", required=True, help="what happened (kept in the record)")
    p.set_defaults(func=cmd_incident_open)

    p = isub.add_parser("notify", help="send a breach notice to the tenant's privacy contact "
                                       "through the delivery queue (audited)")
    config_arg(p)
    p.add_argument("--incident", type=positive_int, metavar="ID",
                   help="the incident (without it, one is opened for this tenant)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--file", required=True, metavar="NOTICE.txt", help="the notice (UTF-8)")
    p.add_argument("--discovered", type=when, metavar="TIME",
                   help="when the incident was discovered (ISO 8601, e.g. 2026-11-24T09:30Z); "
                        "needed without --incident")
    p.add_argument("--title", default="Notice of a personal data breach",
                   help="the subject of the mail")
    p.add_argument("--to", type=subject_address, metavar="ADDRESS",
                   help="instead of the privacy_contact in subprocessors.yaml")
    p.add_argument("--from", dest="sender", type=subject_address, metavar="ADDRESS",
                   help="the sender (default: notice.from of subprocessors.yaml)")
    p.set_defaults(func=cmd_incident_notify)

    p = isub.add_parser("list", help="incidents, newest first, with each tenant's notice")
    config_arg(p)
    p.add_argument("--open", action="store_true", help="only those not closed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_incident_list)
    p = isub.add_parser("show", help="one incident and each tenant's notice")
    config_arg(p)
    p.add_argument("id", type=positive_int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_incident_show)
    p = isub.add_parser("close", help="close an incident (audited)")
    config_arg(p)
    p.add_argument("id", type=positive_int)
    p.add_argument("--note", required=True, help="how it ended (kept in the record)")
    p.set_defaults(func=cmd_incident_close)


def cmd_incident_open(args: argparse.Namespace) -> int:
    config, _key, store = open_privacy(args)
    tenants = sorted(set(args.tenants))
    for t in tenants:
        known_tenant(config, store, t, active=True)
    if args.discovered > utcnow():
        raise CommandError(f"--discovered {args.discovered.isoformat()} is in the future")
    if not args.description.strip():
        raise CommandError("--description: say what happened")
    incident_id = IncidentStore(store.store).open(args.discovered, tenants,
                                                  args.description[:10_000], actor())
    deadline = args.discovered + timedelta(hours=incident.PROMISE_HOURS)
    print(f"incident {incident_id} opened for {', '.join(tenants)}; notices are due by "
          f"{deadline.isoformat()}: incident notify --incident {incident_id} --tenant T "
          "--file NOTICE.txt")
    return EXIT_OK


def cmd_incident_notify(args: argparse.Namespace) -> int:
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    incidents = IncidentStore(store.store)
    if args.incident is None and args.discovered is None:
        raise CommandError("--discovered TIME is needed without --incident ID")
    discovered = args.discovered
    if args.incident is not None:
        found = incidents.list(ids=[args.incident])
        if not found:
            raise CommandError(f"no incident {args.incident}")
        discovered = found[0]["discovered_at"]
    routing = load_policies(config).subprocessors
    try:
        to = incident.recipient(routing, args.tenant, args.to)
    except incident.NoticeError as exc:
        raise CommandError(str(exc)) from None
    sender = args.sender or incident.notice_sender(routing, config.smtp.hostname)
    tenant = config.tenants.get(args.tenant)
    try:
        notice = incident.build(
            tenant=args.tenant, tenant_name=(tenant.name if tenant else "") or args.tenant,
            sender=sender, to=to, text=incident.read_file(args.file), title=args.title,
            discovered_at=discovered, now=utcnow(), hostname=config.smtp.hostname)
    except incident.NoticeError as exc:
        raise CommandError(str(exc)) from None
    incident_id = args.incident
    if incident_id is None:
        incident_id = incidents.open(discovered, [args.tenant], args.title, actor())
    if not incidents.notify(incident_id, notice.message, actor(), notice.audit_detail()):
        raise CommandError(f"incident {incident_id} is closed or does not affect tenant "
                           f"{args.tenant}")
    print(f"incident {incident_id}: notice {notice.message.id} queued for {to}, "
          f"{notice.hours:.1f} hours after discovery; follow it with: incident show "
          f"{incident_id}")
    if notice.hours > incident.PROMISE_HOURS:
        print(f"mailflowr-gateway: warning: this is later than the {incident.PROMISE_HOURS} "
              "hours promised; the audit log records it", file=sys.stderr)
    return EXIT_OK


def _incident_json(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "status": r["status"], "description": r["description"],
            "discovered_at": jsonable(r["discovered_at"]),
            "opened_at": jsonable(r["opened_at"]), "opened_by": r["opened_by"],
            "deadline": jsonable(r["deadline"]), "closed_at": jsonable(r["closed_at"]),
            "closing_note": r["closing_note"],
            "tenants": [{k: jsonable(v) for k, v in t.items()} for t in r["tenants"]]}


def _print(items: list[dict[str, Any]]) -> None:
    for r in items:
        print(f"incident {r['id']} ({r['status']}): discovered {r['discovered_at']}, "
              f"notices due by {r['deadline']}")
        print(f"  {printable(r['description'], 100)}")
        for t in r["tenants"]:
            kept = {True: "in time", False: "LATE", None: "not yet"}[t["in_time"]]
            print(f"  {printable(t['tenant'], 16):16} {t['state']:12} queued "
                  f"{(t['notified_at'] or '-')[:19]:19} delivered "
                  f"{(t['delivered_at'] or '-')[:19]:19} {kept}"
                  + (f" ({printable(t['why'], 80)})" if t["why"] else ""))
        if r["closed_at"]:
            print(f"  closed {r['closed_at']}: {printable(r['closing_note'] or '', 100)}")


def cmd_incident_list(args: argparse.Namespace) -> int:
    items = [_incident_json(r) for r in
             IncidentStore(open_store(args)).list(open_only=args.open)]
    if args.json:
        print_json(items)
    else:
        _print(items)
    return EXIT_OK


def cmd_incident_show(args: argparse.Namespace) -> int:
    found = IncidentStore(open_store(args)).list(ids=[args.id])
    if not found:
        raise CommandError(f"no incident {args.id}")
    if args.json:
        print_json(_incident_json(found[0]))
    else:
        _print([_incident_json(found[0])])
    return EXIT_OK


def cmd_incident_close(args: argparse.Namespace) -> int:
    if not args.note.strip():
        raise CommandError("--note: say how it ended")
    if not IncidentStore(open_store(args)).close(args.id, args.note[:10_000], actor()):
        raise CommandError(f"no open incident {args.id}")
    print(f"incident {args.id} closed")
    return EXIT_OK
