"""``users hash-password``: the password hash of a submission user."""

from __future__ import annotations

import argparse

from gateway.cli.common import EXIT_OK, Parser, Subcommands, read_password
from gateway.passwords import hash_password


def add_parsers(sub: Subcommands) -> None:
    users = sub.add_parser("users", help="users of the submission service")
    usub = users.add_subparsers(dest="users_command", required=True, parser_class=Parser)
    p = usub.add_parser("hash-password",
                        help="print the password_hash for a password read from stdin")
    p.set_defaults(func=cmd_users_hash_password)


def cmd_users_hash_password(args: argparse.Namespace) -> int:
    print(hash_password(read_password()))
    return EXIT_OK
