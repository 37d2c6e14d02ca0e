"""``config show``: the effective settings after environment overrides, each with where
it came from (``file:line``, ``environment NAME`` or ``default``), as ``postconf`` shows
Postfix's; secrets as set or unset."""

from __future__ import annotations

import argparse
import json

from gateway.cli.common import EXIT_OK, Parser, Subcommands, config_arg, print_json
from gateway.config import explain


def add_parsers(sub: Subcommands) -> None:
    group = sub.add_parser("config", help="the effective configuration")
    csub = group.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    p = csub.add_parser("show", help="every setting in force, with where it came from "
                                     "(file:line, environment, default)")
    config_arg(p)
    p.add_argument("--changed", action="store_true",
                   help="only those whose value is not the default (wherever set)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = [(key, value, origin) for key, value, origin, default in explain(args.config)
                if not (args.changed and (default or origin == "default"))]
    if args.json:
        print_json([{"key": k, "value": v, "from": o} for k, v, o in settings])
        return EXIT_OK
    for key, value, origin in settings:
        shown = value if isinstance(value, str) else json.dumps(value)
        print(f"{key} = {shown}  # {origin}")
    return EXIT_OK
