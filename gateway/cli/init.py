"""``init DIR``: write the example configuration, policies, systemd unit and monitoring
rules into a new folder, from the installed package (a wheel puts them in
``share/mailflowr-gateway`` under its prefix) or from the source tree."""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from gateway.cli.common import EXIT_OK, CommandError, Subcommands

# What init writes, as folders of the source tree: the same layout in DIR, so that the
# example's relative paths (../policies, ../var) hold there too.
FOLDERS = ("config", "policies", "systemd", "monitoring")
SHARE = Path("share") / "mailflowr-gateway"


def add_parsers(sub: Subcommands) -> None:
    p = sub.add_parser("init", help="write the example configuration, policies, systemd unit "
                                    "and monitoring rules into a new folder")
    p.add_argument("directory", metavar="DIR",
                   help="where (config/, policies/, systemd/, monitoring/ in it)")
    p.set_defaults(func=cmd_init)


def examples() -> Path:
    """The folder holding the examples: the installation's share/mailflowr-gateway, or
    the source tree of an editable install."""
    for base in (Path(sysconfig.get_path("data")) / SHARE, Path(sys.prefix) / SHARE,
                 Path(__file__).resolve().parents[2]):
        if (base / "config" / "gateway.yaml").is_file():
            return base
    raise CommandError("the examples are not installed here (share/mailflowr-gateway): "
                       "install the package from its wheel or its source tree")


def cmd_init(args: argparse.Namespace) -> int:
    source, target = examples(), Path(args.directory)
    files = [path.relative_to(source) for folder in FOLDERS
             for path in sorted((source / folder).glob("*")) if path.is_file()]
    there = [str(target / f) for f in files if (target / f).exists()]
    if there:
        more = f" (and {len(there) - 1} more)" if there[1:] else ""
        raise CommandError(f"{there[0]} exists{more}: nothing written (init never replaces "
                           "a file)")
    for f in files:
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        (target / f).write_bytes((source / f).read_bytes())
    config = target / "config" / "gateway.yaml"
    print(f"wrote {len(files)} files to {target}; the state goes to {target / 'var'}\n"
          f"  edit {config} (tenants, listeners) and {target / 'policies'}, then:\n"
          f"  mailflowr-gateway check --config {config}\n"
          f"  mailflowr-gateway serve --config {config}")
    return EXIT_OK
