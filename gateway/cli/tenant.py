"""``tenant deactivate``: the end of a tenant: its mail refused, its data deleted."""

from __future__ import annotations

import argparse

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Progress,
    Subcommands,
    actor,
    config_arg,
    confirm,
    jsonable,
    known_tenant,
    load_policies,
    open_privacy,
)
from gateway.clock import utcnow
from gateway.logs import mask
from gateway.privacy import erasure
from gateway.privacy.erasure import shred_tenant


def add_parsers(sub: Subcommands) -> None:
    tenant = sub.add_parser("tenant", help="the tenant lifecycle")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, parser_class=Parser)
    p = tsub.add_parser("deactivate", help="refuse the tenant's mail from now on and delete "
                                           "all its data (cannot be undone)")
    config_arg(p)
    p.add_argument("tenant")
    p.add_argument("--yes", action="store_true", help="do not ask (when run from a terminal)")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    p.add_argument("--override-hold", action="store_true",
                   help="deactivate even when legal holds cover its mail (needs --reason)")
    p.add_argument("--reason", help="why the holds are overridden (kept in the audit log)")
    p.set_defaults(func=cmd_tenant_deactivate)


def cmd_tenant_deactivate(args: argparse.Namespace) -> int:
    if args.override_hold and not (args.reason or "").strip():
        raise CommandError("--override-hold needs --reason TEXT (it is kept in the audit log)")
    config, _key, store = open_privacy(args)
    row = known_tenant(config, store, args.tenant)
    held = erasure.tenant_holds(store, load_policies(config).retention, args.tenant, utcnow())
    holds = ", ".join(f"{name} ({n} messages)" for name, n in sorted(held.items()))
    if args.dry_run:
        print(f"would refuse mail for tenant {args.tenant} and delete its "
              f"{store.count_messages(args.tenant)} messages, their deliveries, import state, "
              "consent records, export archives, API tokens and data key")
        if held:
            print(f"  legal hold {holds} covers its mail: deactivate would refuse without "
                  "--override-hold")
        return EXIT_OK
    if held and not args.override_hold:
        raise CommandError(f"legal hold {holds} covers mail of tenant {args.tenant}: nothing "
                           "changed (--override-hold --reason TEXT deactivates anyway)")
    if held:
        store.store.audit(actor(), "tenant.hold_override", tenant_id=args.tenant,
                          detail={"holds_overridden": sorted(held),
                                  "reason": mask(args.reason)[:500]})
    if row is not None and not row["active"]:
        print(f"tenant {args.tenant} was deactivated at {jsonable(row['deactivated_at'])}; "
              "deleting whatever is left")
    else:
        confirm(f"This deletes all data of tenant {args.tenant} for good.", args.tenant,
                args.yes)
        if row is None:
            store.store.sync_tenants({args.tenant: config.tenants[args.tenant].name})
        store.deactivate(args.tenant, actor())
        print(f"tenant {args.tenant} deactivated: its mail is refused (550 5.1.1) "
              "once the daemon notices, within seconds")
    shown = Progress(f"deleting tenant {args.tenant}", "messages deleted")
    try:
        purged = shred_tenant(store, config, args.tenant, actor(), shown)
    finally:
        shown.done()
    removed = purged.removed
    print(f"deleted {removed.messages} messages, {removed.deliveries} deliveries "
          f"({removed.pending} still to go, now cancelled), {removed.imports} import records")
    if purged.shredded:
        print("  its data key is destroyed: copies of its mail in database backups can no "
              "longer be opened")
    elif store.store.keystore is None:
        print("  encryption at rest is off: copies of its mail in database backups stay "
              "readable until those backups expire")
    if not purged.scrubbed:
        print("  the database's write-ahead log could not be truncated now (a reader was "
              "busy); the old pages go at its next checkpoint")
    if args.tenant in config.tenants:
        print(f"  tenant {args.tenant} is still in {args.config}: remove it there; "
              "while it stays, its mail is refused")
    return EXIT_OK
