"""The ``mailflowr-gateway`` command line.

Every command reads the same configuration (``--config``, default
config/gateway.yaml, or $MAILFLOWR_CONFIG).  Errors are one line on stderr and
a non-zero exit: 2 for an invalid configuration or usage, 1 for anything else.

Each command group is a module of this package with an ``add_parsers`` function;
this module builds the parser from them, in the order of ``COMMANDS``, and turns
the errors a command may end with into a message and an exit code.  A command
imports only its own module: each module imports what its commands need (``serve``
the daemon, ``messages`` the store's queries, ...), and a sysadmin's ``status``
should not wait for the daemon's and the API's imports, nor a daemon's start for
the commands'.  Without a command (``--help``) or with one not listed, the parser
of every command is built, so help and usage errors read the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from gateway import __version__
from gateway.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    CommandError,
    Parser,
    config_arg,
)
from gateway.errors import ConfigError
from gateway.policyset import PolicyError
from gateway.store.keystore import KeyUnavailable

# each command and the module of this package that defines it, in the order of --help
COMMANDS = {
    "init": "init", "serve": "serve", "check": "check", "config": "settings",
    "status": "status", "dkim": "dkim", "db": "db", "messages": "messages", "queue": "queue",
    "users": "users", "retention": "retention", "subprocessors": "subprocessors",
    "imap": "imap", "rules": "rules", "erase": "privacy", "export": "privacy",
    "processing-record": "privacy", "request": "requests", "tenant": "tenant", "keys": "keys",
    "token": "token", "console": "console", "incident": "incident", "audit": "audit",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command`` alone (importing its module only), or of every one."""
    parser = Parser(prog="mailflowr-gateway", description="MailFlowr Gateway")
    parser.add_argument("--version", action="version",
                        version=f"mailflowr-gateway {__version__}")
    config_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    module = COMMANDS.get(command or "")  # the module of the command named, if listed
    for name in [module] if module else dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"{__name__}.{name}").add_parsers(sub)
    if module:
        return parser
    p = sub.add_parser("completion", help="print the shell completion script: "
                                          "completion bash > /etc/bash_completion.d/"
                                          "mailflowr-gateway")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=lambda args: _completion(parser, args.shell))
    return parser


def _completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """The completion script of every command and option, made from the parser itself."""
    import shtab

    print(shtab.complete(parser, shell=shell))
    return EXIT_OK


def _command(argv: Sequence[str] | None) -> str | None:
    """The command ``argv`` names, past the options that may come before it."""
    first = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    config_arg(first, top=True)
    first.add_argument("command", nargs="?")
    first.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, unknown = first.parse_known_args(argv)
    except argparse.ArgumentError:  # the parser of every command says what is wrong
        return None
    return None if unknown else known.command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_command(argv)).parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PolicyError as exc:  # the configuration is fine; a policy file is not
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except CommandError as exc:
        print(f"mailflowr-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyUnavailable as exc:  # an encrypted original whose key is not here
        print(f"mailflowr-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # e.g. `messages list | head`
        return EXIT_OK
