"""``db upgrade``: apply pending schema migrations."""

from __future__ import annotations

import argparse

from sqlalchemy.exc import SQLAlchemyError

from gateway.cli.common import EXIT_OK, CommandError, Parser, Subcommands, config_arg, load_config
from gateway.store import database


def add_parsers(sub: Subcommands) -> None:
    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, parser_class=Parser)
    p = dbsub.add_parser("upgrade", help="apply pending schema migrations")
    config_arg(p)
    p.set_defaults(func=cmd_db_upgrade)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    config = load_config(args)
    engine = database.create(config.database.url)
    try:
        before, after = database.upgrade(engine)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise CommandError(f"database: {first[0] if first else exc}") from None
    finally:
        engine.dispose()
    change = "" if before == after else f" (was {before or 'empty'})"
    print(f"database schema at {after}{change}")
    return EXIT_OK
