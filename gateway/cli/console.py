"""``console user add|list|remove``: the people who log in to the web console."""

from __future__ import annotations

import argparse
import re

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Subcommands,
    actor,
    config_arg,
    jsonable,
    known_tenant,
    open_privacy,
    open_store,
    print_json,
    printable,
    read_password,
)
from gateway.passwords import hash_password
from gateway.store.console import ConsoleStore
from gateway.store.tokens import SCOPES, parse_scopes

_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,253}")


def add_parsers(sub: Subcommands) -> None:
    console = sub.add_parser("console", help="the web console's users")
    csub = console.add_subparsers(dest="console_command", required=True, parser_class=Parser)
    user = csub.add_parser("user", help="people of a tenant who log in with a password")
    usub = user.add_subparsers(dest="user_command", required=True, parser_class=Parser)
    p = usub.add_parser("add", help="add a user; the password is asked for (or read from "
                                    "stdin's first line)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--scope", default="read", metavar="SCOPES",
                   help=f"what the user may do, comma-separated: {', '.join(SCOPES)} "
                        "(every scope); default: read")
    p.add_argument("login", help="the login, e.g. an e-mail address; unique in the gateway")
    p.set_defaults(func=cmd_user_add)
    p = usub.add_parser("list", help="users, without their password hashes")
    config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_user_list)
    p = usub.add_parser("remove", help="remove a user and end its sessions")
    config_arg(p)
    p.add_argument("login")
    p.set_defaults(func=cmd_user_remove)


def cmd_user_add(args: argparse.Namespace) -> int:
    try:
        scopes = parse_scopes(args.scope)
    except ValueError as exc:
        raise CommandError(f"--scope: {exc}") from None
    if not _LOGIN.fullmatch(args.login):
        raise CommandError("login: letters, digits and . _ @ + - (1 to 254), starting "
                           "with a letter or digit")
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    password_hash = hash_password(read_password())
    if not ConsoleStore(store.store).add_user(args.tenant, args.login, password_hash, scopes):
        raise CommandError(f"there is a console user {args.login!r} already")
    listed = " ".join(s for s in SCOPES if s in scopes)
    store.store.audit(actor(), "console.user.add", tenant_id=args.tenant,
                      detail={"login": args.login, "scopes": listed})
    print(f"console user {args.login} of tenant {args.tenant}, scopes {listed}")
    return EXIT_OK


def cmd_user_list(args: argparse.Namespace) -> int:
    rows = ConsoleStore(open_store(args)).users(args.tenant)
    items = [{"login": r["login"], "tenant": r["tenant_id"], "scopes": r["scopes"].split(),
              "created_at": jsonable(r["created_at"])} for r in rows]
    if args.json:
        print_json(items)
        return EXIT_OK
    if not items:
        print("no console users")
        return EXIT_OK
    width = max(len("LOGIN"), *(len(printable(i["login"])) for i in items))
    print(f"{'LOGIN':{width}} {'TENANT':16} {'SCOPES':22} CREATED")
    for i in items:
        print(f"{printable(i['login']):{width}} {printable(i['tenant'], 16):16} "
              f"{','.join(i['scopes']):22} {i['created_at']}")
    return EXIT_OK


def cmd_user_remove(args: argparse.Namespace) -> int:
    store = open_store(args)
    if not ConsoleStore(store).remove_user(args.login):
        raise CommandError(f"no console user {args.login!r}")
    store.audit(actor(), "console.user.remove", detail={"login": args.login})
    print(f"console user {args.login} removed, its sessions ended")
    return EXIT_OK
