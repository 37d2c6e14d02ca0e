"""``serve``: the daemon in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import Subcommands, config_arg, load_config, load_policies


def add_parsers(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="run the daemon in the foreground until SIGTERM")
    config_arg(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    # loaded only here: gateway.daemon brings the SMTP stack and every runner, which the
    # other commands do without (see common.open_store)
    from gateway.daemon import serve

    config = load_config(args)
    policies = load_policies(config)  # a policy set that does not validate stops the start
    return serve(config, policies, Path(args.config))
