"""What every command shares: the parser class and the ``--config`` option, exit
codes, loading the configuration, the policies and the store, and the helpers that
turn stored values into JSON or into text safe for a terminal."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import pwd
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from gateway import policyset as loader
from gateway import privacy
from gateway.clock import aware
from gateway.config import GatewayConfig, load
from gateway.errors import ConfigError
from gateway.policyset import PolicySet
from gateway.privacy import keys as privacy_keys
from gateway.privacy.keys import PrivacyKey
from gateway.startup import StartupError
from gateway.startup import open_store as open_database
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store

DEFAULT_CONFIG = "config/gateway.yaml"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# what add_subparsers() returns: each command module's add_parsers() adds to it
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(Exception):
    """A command cannot do what was asked; the text is shown as it is."""


class Parser(argparse.ArgumentParser):
    """Usage errors exit 2 with a pointer to --help, like an invalid configuration."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def config_arg(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--config``: given before the command (``top``, where its default is set) or
    after it (a subcommand's, which keeps the value given before unless given again)."""
    p.add_argument(
        "--config", "-c", metavar="PATH",
        default=os.environ.get("MAILFLOWR_CONFIG", DEFAULT_CONFIG) if top
        else argparse.SUPPRESS,
        help=f"configuration file (default: $MAILFLOWR_CONFIG or {DEFAULT_CONFIG})",
    )


def print_json(doc: Any, **options: Any) -> None:
    """What ``--json`` prints: the document, indented, on stdout."""
    json.dump(doc, sys.stdout, indent=1, **options)
    print()


class Progress:
    """How far long work has got (a count, and its rate) on one line of stderr that
    redraws itself, four times a second at most; only when stderr is a terminal, so
    scripts and logs get nothing of it."""

    def __init__(self, what: str, unit: str = "messages") -> None:
        self.what, self.unit = what, unit
        self.on = sys.stderr.isatty()
        self.started = time.monotonic()
        self.shown = 0.0  # when the line was last drawn (0: never)
        self.count, self.extra = 0, ""

    def __call__(self, count: int, extra: str = "") -> None:
        self.count, self.extra = count, extra
        if self.on and time.monotonic() - self.shown >= 0.25:
            self._draw()

    def done(self) -> None:
        """The last count, and the end of the line (when anything was drawn)."""
        if self.on and self.shown:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self) -> None:
        self.shown = time.monotonic()
        elapsed = self.shown - self.started
        rate = f", {self.count / elapsed:.0f}/s" if elapsed > 0.5 else ""
        sys.stderr.write(f"\r{self.what}: {self.count} {self.unit}{self.extra}{rate}\033[K")
        sys.stderr.flush()


def confirm(question: str, expected: str, yes: bool) -> None:
    """On a terminal, unless ``yes``: ask ``question`` and go on only when the answer is
    ``expected``; scripts (no terminal) are not asked."""
    if yes or not sys.stdin.isatty():
        return
    try:
        answer = input(f"{question} Type {expected} to go on: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != expected.lower():
        raise CommandError("not confirmed: nothing changed")


def read_password() -> str:
    """A new password: asked twice on a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise CommandError("use a password of at least 8 characters")
    return password


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def subject_address(text: str) -> str:
    value = privacy.subject_address(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not an e-mail address: {text!r}")
    return value


def actor() -> str:
    """Who did it, for the audit log: the operator's login.  Under sudo the login that
    ran sudo (SUDO_USER, which sudo sets for root), else the user of the process's real
    uid; never $USER alone, which anyone can set."""
    uid = os.getuid()
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (a container)
        login = f"uid {uid}"
    sudo = os.environ.get("SUDO_USER", "")
    if uid == 0 and sudo and sudo != "root" and sudo.isprintable():
        return f"cli:{sudo[:64]} (sudo)"
    return f"cli:{login}"


def load_config(args: argparse.Namespace) -> GatewayConfig:
    if args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).exists():
        raise ConfigError([f"{DEFAULT_CONFIG}: no such file in {os.getcwd()} (the default: "
                           "give --config PATH, or set MAILFLOWR_CONFIG)"])
    return load(args.config)


def load_policies(config: GatewayConfig, directory: Path | None = None) -> PolicySet:
    return loader.load(directory or config.policies.directory, config.tenants.keys(),
                       config.destinations.keys())


def open_store(args: argparse.Namespace, config: GatewayConfig | None = None) -> Store:
    """The store of a command, which never makes a database: an SQLite file that is not
    there is an error (a wrong path would otherwise show an empty one)."""
    config = config or load_config(args)
    missing = config.sqlite_path
    try:
        there = missing is None or str(missing).startswith("file:") or missing.exists()
    except OSError as exc:  # a folder this user may not look into
        raise CommandError(f"{missing}: {exc.strerror}") from None
    if not there:
        raise CommandError(f"{missing}: no such database (database.url in {args.config}; "
                           "a relative path is read from its folder): the daemon makes it "
                           "when it first starts, as does 'db upgrade'")
    try:
        return open_database(config, upgrade_sqlite=False, need_keys=False)
    except StartupError as exc:
        raise CommandError(str(exc)) from None


def open_privacy(args: argparse.Namespace) -> tuple[GatewayConfig, PrivacyKey, PrivacyStore]:
    """The configuration, the privacy key and the privacy store."""
    config = load_config(args)
    store = open_store(args, config)  # made the privacy key if there was none, or said why not
    return config, privacy_keys.load_or_create(config.privacy.key_file), PrivacyStore(store)


def known_tenant(config: GatewayConfig, store: PrivacyStore, tenant: str, *,
                 active: bool = False) -> dict[str, Any] | None:
    """The tenant's row (None: configured, no mail stored yet); with ``active``, a
    deactivated tenant is refused too."""
    row = store.tenant_row(tenant)
    if row is None and tenant not in config.tenants:
        raise CommandError(f"no tenant {tenant!r} in the configuration or the database")
    if active and row is not None and not row["active"]:
        raise CommandError(f"tenant {tenant} is deactivated")
    result: dict[str, Any] | None = row
    return result


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return aware(value).isoformat()
    return value


def printable(text: Any, width: int | None = None) -> str:
    """Header text made safe for a terminal: no control characters."""
    if text is None:
        return "-"
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean if width is None or len(clean) <= width else clean[: width - 1] + "…"


def when(text: str) -> datetime:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (ISO 8601): {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
