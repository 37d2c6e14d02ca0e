"""``token create|list|revoke``: the admin API's tokens."""

from __future__ import annotations

import argparse

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
)
from gateway.store.tokens import SCOPES, TokenStore, parse_scopes


def add_parsers(sub: Subcommands) -> None:
    token = sub.add_parser("token", help="admin API tokens")
    tsub2 = token.add_subparsers(dest="token_command", required=True, parser_class=Parser)
    p = tsub2.add_parser("create", help="make a token for one tenant (shown once)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", default="", help="what it is for, e.g. the tool that uses it")
    p.add_argument("--scope", default="read", metavar="SCOPES",
                   help=f"what it may do, comma-separated: {', '.join(SCOPES)} (every "
                        "scope); default: read")
    p.add_argument("--json", action="store_true", help="the token and its id as JSON")
    p.set_defaults(func=cmd_token_create)
    p = tsub2.add_parser("list", help="tokens, without their secrets")
    config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token_list)
    p = tsub2.add_parser("revoke", help="refuse a token from now on")
    config_arg(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_token_revoke)


def cmd_token_create(args: argparse.Namespace) -> int:
    try:
        scopes = parse_scopes(args.scope)
    except ValueError as exc:
        raise CommandError(f"--scope: {exc}") from None
    config, _key, store = open_privacy(args)
    known_tenant(config, store, args.tenant, active=True)
    token_id, token = TokenStore(store.store).create(args.tenant, args.name, scopes)
    listed = " ".join(s for s in SCOPES if s in scopes)
    store.store.audit(actor(), "token.create", tenant_id=args.tenant,
                      detail={"token": token_id, "name": args.name[:200], "scopes": listed})
    if args.json:
        print_json({"id": token_id, "tenant": args.tenant, "scopes": listed.split(),
                   "token": token})
        return EXIT_OK
    print(f"token {token_id} for tenant {args.tenant}, scopes {listed}; it is shown only now:")
    print(token)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    rows = TokenStore(open_store(args)).list(args.tenant)
    items = [{"id": r["id"], "tenant": r["tenant_id"], "name": r["name"],
              "scopes": r["scopes"].split(),
              "created_at": jsonable(r["created_at"]),
              "last_used_at": jsonable(r["last_used_at"]),
              "revoked_at": jsonable(r["revoked_at"])} for r in rows]
    if args.json:
        print_json(items)
        return EXIT_OK
    print(f"{'ID':12} {'TENANT':16} {'SCOPES':22} {'CREATED':25} {'LAST USED':25} "
          f"{'REVOKED':25} NAME")
    for t in items:
        print(f"{t['id']:12} {printable(t['tenant'], 16):16} {','.join(t['scopes']):22} "
              f"{t['created_at'][:25]:25} "
              f"{(t['last_used_at'] or '-')[:25]:25} {(t['revoked_at'] or '-')[:25]:25} "
              f"{printable(t['name'])}")
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    store = open_store(args)
    if not TokenStore(store).revoke(args.id):
        raise CommandError(f"no token {args.id} that could be revoked (unknown, or revoked)")
    store.audit(actor(), "token.revoke", detail={"token": args.id})
    print(f"token {args.id} revoked")
    return EXIT_OK
