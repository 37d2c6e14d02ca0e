"""``retention sweep|preview``: delete what the retention policy says has expired,
or count what a policy directory would delete."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Progress,
    Subcommands,
    actor,
    config_arg,
    load_config,
    load_policies,
    open_store,
    print_json,
    printable,
    when,
)
from gateway.sweeper import Sweeper, SweepReport


def add_parsers(sub: Subcommands) -> None:
    ret = sub.add_parser("retention", help="the retention policy")
    retsub = ret.add_subparsers(dest="retention_command", required=True, parser_class=Parser)
    p = retsub.add_parser("sweep", help="delete what the retention policy says has expired")
    config_arg(p)
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention_sweep)
    p = retsub.add_parser("preview",
                          help="what a sweep would delete: under the policies of DIR, or at "
                               "a time to come (nothing is deleted)")
    config_arg(p)
    p.add_argument("--policies", metavar="DIR",
                   help="a policy directory (e.g. an edited copy), validated first; "
                        "default: policies.directory")
    p.add_argument("--as-of", type=when, metavar="TIME",
                   help="as a sweep at this time would (ISO 8601, e.g. 2027-06-01); "
                        "default: now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention_preview)


def cmd_retention_sweep(args: argparse.Namespace) -> int:
    config = load_config(args)
    policies = load_policies(config)
    sweeper = Sweeper(open_store(args), batch_size=config.retention.batch_size,
                      pause=config.retention.batch_pause)
    shown = Progress("retention sweep", "deleted")
    sweeper.progress = shown
    try:
        report = sweeper.sweep(policies.retention, dry_run=args.dry_run, actor=actor())
    finally:
        shown.done()
    if report.skipped:
        raise CommandError(f"not swept: {report.skipped}")
    _print_sweep(report, args.json, policies.version)
    return EXIT_OK


def cmd_retention_preview(args: argparse.Namespace) -> int:
    config = load_config(args)
    policies = load_policies(config, Path(args.policies) if args.policies else None)
    as_of = args.as_of
    report = Sweeper(open_store(args), clock=(lambda: as_of) if as_of else None).sweep(
        policies.retention, dry_run=True)
    _print_sweep(report, args.json, policies.version)
    return EXIT_OK


def _print_sweep(report: SweepReport, as_json: bool, version: str) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    if as_json:
        print_json({
            "policy_version": version, "dry_run": report.dry_run,
            "expired": report.expired, "held": report.held, "seconds": round(report.seconds, 3),
            "groups": [{"tenant": g.tenant, "tags": list(g.tags), "rule": g.rule,
                        "cutoff": g.cutoff.isoformat() if g.cutoff else None,
                        "expired": g.expired, "held": g.held, "note": g.note}
                       for g in report.groups],
        })
        return
    print(f"{'TENANT':16} {'TAGS':28} {'EXPIRED':>8} {'HELD':>6}  RULE")
    for g in report.groups:
        if g.expired or g.held or g.note:
            print(f"{printable(g.tenant, 16):16} {printable(','.join(g.tags) or '-', 28):28} "
                  f"{g.expired:>8} {g.held:>6}  {g.rule}{'; ' + g.note if g.note else ''}")
    print(f"{verb} {report.expired} messages, {report.held} kept by legal holds "
          f"(policy {version}, {report.seconds:.1f} s)")
