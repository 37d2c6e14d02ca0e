"""``erase`` and ``export``: data-subject requests (erasure, access, portability);
``processing-record``: a tenant's record of processing (GDPR art. 30)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Progress,
    Subcommands,
    actor,
    config_arg,
    confirm,
    known_tenant,
    load_policies,
    open_privacy,
    print_json,
    subject_address,
)
from gateway.clock import utcnow
from gateway.privacy import erasure, register
from gateway.privacy.export import export


def add_parsers(sub: Subcommands) -> None:
    p = sub.add_parser("erase", help="erase every message of one person from one tenant")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--subject", required=True, type=subject_address, metavar="ADDRESS",
                   help="the person's e-mail address (sender or recipient, any case)")
    p.add_argument("--dry-run", action="store_true", help="count, erase nothing")
    p.add_argument("--override-hold", action="store_true",
                   help="erase even what a legal hold covers (needs --reason)")
    p.add_argument("--reason", help="why the holds are overridden (kept in the audit log)")
    p.add_argument("--yes", action="store_true", help="do not ask (when run from a terminal)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_erase)

    what = ("write everything held about a tenant, or one person of it, to a tar archive "
            "(.eml, mbox, JSON, manifest)")
    p = sub.add_parser("export", help=what, description=what)
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--out", "-o", required=True, metavar="FILE.tar",
                   help="the archive to write (never over an existing file)")
    p.add_argument("--subject", type=subject_address, metavar="ADDRESS",
                   help="only this person's data (an access or portability request)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("processing-record",
                       help="a tenant's record of processing (GDPR art. 30), from the "
                            "configuration and the data: Markdown, or JSON")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_processing_record)


def cmd_erase(args: argparse.Namespace) -> int:
    if args.override_hold and not (args.reason or "").strip():
        raise CommandError("--override-hold needs --reason TEXT (it is kept in the audit log)")
    config, key, store = open_privacy(args)
    known_tenant(config, store, args.tenant)
    retention = load_policies(config).retention
    started = time.monotonic()
    p = erasure.plan(store, retention, config, args.tenant, args.subject, utcnow())
    result: dict[str, Any] = {
        "tenant": args.tenant, "dry_run": args.dry_run, "messages": len(p.found),
        "held": p.held, "still_in_configuration": p.config_mentions, "exports": p.exports,
    }
    if args.dry_run:
        pass
    else:
        confirm(f"This erases {len(p.found)} messages of {args.subject} in tenant "
                f"{args.tenant} for good.", args.subject, args.yes)
        shown = Progress("erase", f"of {len(p.found)} messages deleted")
        try:
            removed = erasure.erase(store, key, p, actor=actor(),
                                    exports=config.admin_api.export_directory,
                                    override_reason=args.reason if args.override_hold else None,
                                    progress=shown)
        except erasure.ErasureRefused as exc:
            raise CommandError(str(exc)) from None
        finally:
            shown.done()
        result.update(removed.as_dict())
    result["seconds"] = round(time.monotonic() - started, 3)
    if config.logging.personal_data:
        result["note"] = ("logging.personal_data is on: the journal may still hold this "
                          "address; it is outside what erase can reach")
    if args.json:
        print_json(result)
        return EXIT_OK
    if args.dry_run:
        print(f"would erase {len(p.found)} messages of tenant {args.tenant} "
              f"({sum(1 for f in p.found if f.status == 'received')} not yet processed) "
              f"and remove its {len(p.exports)} stored exports")
        for name, count in sorted(p.held.items()):
            print(f"  legal hold {name} covers {count} of them: erase would refuse "
                  "without --override-hold")
    else:
        print(f"erased {result['messages']} messages of tenant {args.tenant}: "
              f"{result['deliveries']} deliveries ({result['pending_deliveries']} still to go, "
              f"now cancelled), {result['imported']} import records, "
              f"{len(result['exports'])} stored exports, in {result['seconds']:.1f} s")
        if p.held:
            print(f"  legal holds overridden: {', '.join(sorted(p.held))}")
    for where in p.config_mentions:
        print(f"  the address is still in the configuration at {where}: remove it there")
    if "note" in result:
        print(f"  {result['note']}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise CommandError(f"{out}: exists; an export never overwrites a file")
    if not out.parent.is_dir():
        raise CommandError(f"{out.parent}: no such directory")
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant)
    shown = Progress("export")
    try:
        result = export(store, config, args.tenant, out, actor=actor(), subject=args.subject,
                        progress=lambda n, size: shown(n, f", {size / 1e6:.1f} MB"))
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror or exc}") from None
    finally:
        shown.done()
    rate = result.size / 1e6 / result.seconds if result.seconds else 0.0
    if args.json:
        print_json({"path": str(out), "messages": result.messages, "files": result.files,
                   "bytes": result.size, "seconds": round(result.seconds, 3),
                   "manifest_sha256": result.manifest_sha256, "counts": result.counts})
        return EXIT_OK
    print(f"{out}: {result.messages} messages, {result.files} files, {result.size} bytes "
          f"in {result.seconds:.1f} s ({rate:.1f} MB/s)")
    return EXIT_OK


def cmd_processing_record(args: argparse.Namespace) -> int:
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    record = register.build(config, load_policies(config), store.store, args.tenant, utcnow())
    if args.json:
        print_json(record.as_dict(), ensure_ascii=False)
    else:
        sys.stdout.write(register.as_markdown(record))
    return EXIT_OK

