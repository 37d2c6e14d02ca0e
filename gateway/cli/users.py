"""``users hash-password``: the password hash of a submission user."""

from __future__ import annotations

import argparse
import getpass
import sys

from gateway.cli.common import EXIT_OK, CommandError, Parser, Subcommands
from gateway.passwords import hash_password


def add_parsers(sub: Subcommands) -> None:
    users = sub.add_parser("users", help="users of the submission service")
    usub = users.add_subparsers(dest="users_command", required=True, parser_class=Parser)
    p = usub.add_parser("hash-password",
                        help="print the password_hash for a password read from stdin")
    p.set_defaults(func=cmd_users_hash_password)


def cmd_users_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CommandError("use a password of at least 8 characters")
    print(hash_password(password))
    return EXIT_OK
