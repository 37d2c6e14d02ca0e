"""The ``mailflowr-gateway`` command line.

Every command reads the same configuration (``--config``, default
config/gateway.yaml, or $MAILFLOWR_CONFIG).  Errors are one line on stderr and
a non-zero exit: 2 for an invalid configuration or usage, 1 for anything else.

Each command group is a module of this package with an ``add_parsers`` function;
this module builds the parser from them, in the order of ``COMMANDS``, and turns
the errors a command may end with into a message and an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gateway import __version__
from gateway.cli import (
    audit,
    check,
    console,
    db,
    dkim,
    imap,
    incident,
    init,
    keys,
    messages,
    privacy,
    queue,
    requests,
    retention,
    rules,
    serve,
    settings,
    status,
    subprocessors,
    tenant,
    token,
    users,
)
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

# the order of the commands in --help
COMMANDS = (init, serve, check, settings, status, dkim, db, messages, queue, users, retention,
            subprocessors, imap, rules, privacy, requests, tenant, keys, token, console, incident,
            audit)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mailflowr-gateway", description="MailFlowr Gateway")
    parser.add_argument("--version", action="version",
                        version=f"mailflowr-gateway {__version__}")
    config_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS:
        module.add_parsers(sub)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
