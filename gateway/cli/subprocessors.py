"""``subprocessors list|notices|object``: the registry, the change notices sent,
and tenants' objections."""

from __future__ import annotations

import argparse

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    load_config,
    load_policies,
    open_store,
    print_json,
    printable,
)
from gateway.clock import utcnow
from gateway.config import GatewayConfig
from gateway.policy.subprocessors import Consent, SubprocessorPolicy
from gateway.store.subprocessors import notice_record


def add_parsers(sub: Subcommands) -> None:
    sps = sub.add_parser("subprocessors", help="the subprocessor registry and objections")
    ssub = sps.add_subparsers(dest="subprocessors_command", required=True, parser_class=Parser)
    p = ssub.add_parser("list", help="the registry, and which relays each tenant may use now")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_subprocessors_list)
    p = ssub.add_parser("notices", help="change notices sent, with their objection windows")
    config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_subprocessors_notices)
    p = ssub.add_parser("object", help="record a tenant's objection to a subprocessor")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("name")
    p.add_argument("--note", default="", help="e.g. how and when the objection arrived")
    p.set_defaults(func=cmd_subprocessors_object)


def _routing(config: GatewayConfig, args: argparse.Namespace) -> SubprocessorPolicy:
    policies = load_policies(config)
    if policies.subprocessors is None:
        raise CommandError(f"no {config.policies.directory / 'subprocessors.yaml'}: copies go "
                           "through delivery.relay without a subprocessor policy")
    return policies.subprocessors


def cmd_subprocessors_list(args: argparse.Namespace) -> int:
    config = load_config(args)
    routing = _routing(config, args)
    rows = open_store(args).consent_rows()
    consent = Consent.of(rows)
    now = utcnow()
    registry = [{"name": sp.name, "purpose": sp.purpose, "entity": sp.entity,
                 "country": sp.country, "region": sp.region,
                 "data_categories": list(sp.data_categories), "added": sp.added.isoformat()}
                for sp in routing.registry.values()]
    tenants = {tid: {name: routing.why_not(tid, name, consent, now) or "usable"
                     for name in routing.registry}
               for tid in sorted(config.tenants)}
    if args.json:
        print_json({"registry": registry, "tenants": tenants})
        return EXIT_OK
    print(f"{'NAME':16} {'PURPOSE':15} {'REGION':7} {'COUNTRY':7} {'ADDED':10}  ENTITY")
    for r in registry:
        print(f"{r['name']:16} {r['purpose']:15} {r['region']:7} {r['country']:7} "
              f"{r['added']:10}  {printable(r['entity'])}")
    for tid, status in tenants.items():
        print(f"\ntenant {tid}:")
        for name, why in status.items():
            print(f"  {name:16} {why}")
    return EXIT_OK


def cmd_subprocessors_notices(args: argparse.Namespace) -> int:
    rows = open_store(args).list_notices(args.tenant)
    items = [notice_record(r) | {"tenant": r["tenant_id"]} for r in rows]
    if args.json:
        print_json(items)
        return EXIT_OK
    print(f"{'TENANT':16} {'SUBPROCESSOR':16} {'CHANGE':8} {'QUEUED':19} {'DELIVERED':19} "
          f"{'WINDOW ENDS':19} {'STATE':8} MESSAGE")
    for n in items:
        print(f"{printable(n['tenant'], 16):16} {n['subprocessor']:16} {n['change']:8} "
              f"{n['queued_at'][:19]:19} {(n['delivered_at'] or '-')[:19]:19} "
              f"{(n['objection_window_ends'] or '-')[:19]:19} {n['state']:8} "
              f"{n['message'] or '-'}")
    for n in items:
        if n["why"]:
            print(f"  {printable(n['tenant'], 16)} {n['subprocessor']}: {n['why']}")
    return EXIT_OK


def cmd_subprocessors_object(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.tenant not in config.tenants:
        raise CommandError(f"no tenant {args.tenant!r} in {args.config}")
    routing = _routing(config, args)
    if args.name not in routing.registry:
        raise CommandError(f"no subprocessor {args.name!r} in the registry "
                           f"(known: {', '.join(sorted(routing.registry))})")
    open_store(args).record_objection(args.tenant, args.name,
                                  actor(), args.note[:1000])
    print(f"objection of tenant {args.tenant} to {args.name} recorded: "
          f"{args.name} will not handle its mail")
    return EXIT_OK
