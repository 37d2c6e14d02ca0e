"""``init DIR``: write the example configuration, policies, systemd unit and monitoring
rules into a new folder, from the installed package (a wheel puts them in
``share/mailflowr-gateway`` under its prefix) or from the source tree."""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

from gateway import files
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
    names = [path.relative_to(source) for folder in FOLDERS
             for path in sorted((source / folder).glob("*")) if path.is_file()]
    linked = [str(target / f) for f in FOLDERS if (target / f).is_symlink()]
    there = [str(target / f) for f in names if os.path.lexists(target / f)]
    if linked or there:
        found = linked or there
        more = f" (and {len(found) - 1} more)" if found[1:] else ""
        raise CommandError(f"{found[0]} {'is a link' if linked else 'exists'}{more}: nothing "
                           "written (init never writes through a link nor over a file)")
    try:
        for name in names:  # 0600 files in 0700 folders, as everything the commands make
            files.make_folders((target / name).parent)
            fd = files.create(target / name, os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW)
            with os.fdopen(fd, "wb") as out:
                out.write((source / name).read_bytes())
    except OSError as exc:  # made meanwhile, a link, no room, no permission
        raise CommandError(f"{exc.filename or target}: {exc.strerror or exc} (init stopped "
                           "there)") from None
    config = target / "config" / "gateway.yaml"
    print(f"wrote {len(names)} files to {target}; the state goes to {target / 'var'}\n"
          f"  edit {config} (tenants, listeners) and {target / 'policies'}, then:\n"
          f"  mailflowr-gateway check --config {config}\n"
          f"  mailflowr-gateway serve --config {config}")
    return EXIT_OK
