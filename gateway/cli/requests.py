"""``request record|assign|list|close``: data-subject requests that reached the processor,
forwarded to the tenant's privacy contact and tracked until answered."""

from __future__ import annotations

import argparse

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
    open_store,
    positive_int,
    print_json,
    printable,
    subject_address,
    when,
)
from gateway.clock import utcnow
from gateway.privacy import incident, requests
from gateway.store.models import UNASSIGNED
from gateway.store.requests import KINDS, RequestStore, request_record


def add_parsers(sub: Subcommands) -> None:
    group = sub.add_parser("request", help="data-subject requests that reached the processor")
    rsub = group.add_subparsers(dest="request_command", required=True, parser_class=Parser)
    p = rsub.add_parser("record", help="record a request and forward it, with a copy, to the "
                                       "tenant's privacy contact (audited)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--subject", required=True, type=subject_address, metavar="ADDRESS",
                   help="the person's e-mail address")
    p.add_argument("--received", required=True, type=when, metavar="TIME",
                   help="when it reached us (ISO 8601); it is due a month later")
    p.add_argument("--file", required=True, metavar="REQUEST.txt",
                   help="the request as received (UTF-8 text, e.g. the mail's body)")
    p.add_argument("--to", type=subject_address, metavar="ADDRESS",
                   help="instead of the privacy_contact in subprocessors.yaml")
    p.set_defaults(func=cmd_request_record)
    p = rsub.add_parser("assign", help="say which tenant a request by mail concerns: it is "
                                       "forwarded to that tenant's privacy contact (audited)")
    config_arg(p)
    p.add_argument("id", type=positive_int)
    p.add_argument("--tenant", required=True)
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--subject", type=subject_address, metavar="ADDRESS",
                   help="the person, if not the sender of the mail")
    p.add_argument("--to", type=subject_address, metavar="ADDRESS",
                   help="instead of the privacy_contact in subprocessors.yaml")
    p.set_defaults(func=cmd_request_assign)
    p = rsub.add_parser("list", help="requests, newest first")
    config_arg(p)
    p.add_argument("--open", action="store_true", help="only those not answered")
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_request_list)
    p = rsub.add_parser("close", help="close a request answered another way (audited)")
    config_arg(p)
    p.add_argument("id", type=positive_int)
    p.add_argument("--note", required=True, help="how it was answered")
    p.set_defaults(func=cmd_request_close)


def cmd_request_record(args: argparse.Namespace) -> int:
    config, key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    try:
        text = incident.read_file(args.file)
        got = requests.receive(
            store.store, config, load_policies(config).subprocessors, tenant=args.tenant,
            kind=args.kind, subject=args.subject, subject_hash=key.subject_hash(args.subject),
            text=text, received_at=args.received, now=utcnow(), to=args.to, actor=actor())
    except incident.NoticeError as exc:
        raise CommandError(str(exc).replace("received ", "--received ", 1)) from None
    print(f"request {got.id} ({args.kind}) recorded and forwarded to {got.to}; due by "
          f"{got.due.isoformat()}; an export or erasure of {args.subject} in tenant "
          f"{args.tenant} fulfils it")
    return EXIT_OK


def cmd_request_assign(args: argparse.Namespace) -> int:
    config, key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    rows = RequestStore(store.store).mail_requests(UNASSIGNED, ids=[args.id])
    if not rows:
        raise CommandError(f"no request {args.id} by mail waits for its tenant "
                           "(request list --open)")
    try:
        to = requests.read_mail_request(
            store.store, config, load_policies(config).subprocessors, key, rows[0], UNASSIGNED,
            tenant=args.tenant, kind=args.kind, subject=args.subject, to=args.to,
            actor=actor(), now=utcnow())
    except incident.NoticeError as exc:
        raise CommandError(str(exc)) from None
    if to is None:
        raise CommandError(f"request {args.id} was assigned meanwhile")
    print(f"request {args.id} ({args.kind}) forwarded to {to} for tenant {args.tenant}")
    return EXIT_OK


def cmd_request_list(args: argparse.Namespace) -> int:
    items = [request_record(r) for r in RequestStore(open_store(args)).list(args.tenant,
                                                                    open_only=args.open)]
    if args.json:
        print_json(items)
        return EXIT_OK
    print(f"{'ID':>5} {'TENANT':16} {'KIND':11} {'STATUS':10} {'RECEIVED':19} {'DUE':19} "
          f"{'FORWARD':8} SUBJECT / ANSWERED BY")
    for r in items:
        print(f"{r['id']:>5} {printable(r['tenant'] or '-', 16):16} {r['kind']:11} "
              f"{r['status']:10} "
              f"{r['received_at'][:19]:19} {r['due_at'][:19]:19} {r['forward'][:8]:8} "
              f"{printable(r['subject'], 40)}"
              + (f" / {printable(r['fulfilled_by'], 60)}" if r["fulfilled_by"] else ""))
    return EXIT_OK


def cmd_request_close(args: argparse.Namespace) -> int:
    if not args.note.strip():
        raise CommandError("--note: say how it was answered")
    if not RequestStore(open_store(args)).close(args.id, args.note[:2000], actor()):
        raise CommandError(f"no open request {args.id}")
    print(f"request {args.id} closed")
    return EXIT_OK
