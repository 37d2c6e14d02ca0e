"""``check``: validate the configuration and the policies without starting, and say
what works but should not stay so (encryption off, IMAP in clear, short DKIM keys)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

from gateway import keyfiles
from gateway.auth import keys, signing
from gateway.auth.verify import dns_lookup
from gateway.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    Subcommands,
    config_arg,
    load_config,
    load_policies,
    print_json,
)
from gateway.config import GatewayConfig, parse_hostport
from gateway.keyfiles import KeyFileError
from gateway.passwords import N, is_weak
from gateway.store.keystore import master_id

Say = Callable[[str], None]


def add_parsers(sub: Subcommands) -> None:
    p = sub.add_parser("check", help="validate the configuration without starting")
    config_arg(p)
    p.add_argument("--dns", action="store_true",
                   help="also check that DNS publishes each DKIM key (delivery.dns_servers)")
    p.add_argument("--policies", metavar="DIR",
                   help="validate the policy files of DIR (e.g. an edited copy, before it is "
                        "renamed into place) instead of policies.directory")
    p.add_argument("--json", action="store_true",
                   help="the result as JSON: counts, the policy version, each finding and "
                        "the warnings among them")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args)
    found: list[str] = []  # what check says, a line each: printed, or kept for --json
    say: Say = found.append if args.json else print
    say(f"{args.config}: ok ({len(config.tenants)} tenants, "
          f"{sum(len(t.domains) for t in config.tenants.values())} domains)")
    directory = Path(args.policies) if args.policies else config.policies.directory
    policies = load_policies(config, directory)
    if "workflows.yaml" in policies.files:
        count = sum(len(r) for r in policies.workflows.rules.values())
        say(f"{directory / 'workflows.yaml'}: ok ({count} rules)")
    retention = policies.retention
    if "retention.yaml" in policies.files:
        say(f"{directory / 'retention.yaml'}: ok ({len(retention.tags)} tags, "
              f"default {retention.default}, {len(retention.holds)} holds)")
    else:
        say(f"{directory / 'retention.yaml'}: absent: all mail is kept {retention.default}")
    routing = policies.subprocessors
    if routing is not None:
        say(f"{directory / 'subprocessors.yaml'}: ok ({len(routing.registry)} subprocessors, "
              f"{len(routing.tenants)} tenants, {len(routing.routing)} routing rules)")
    else:
        say(f"{directory / 'subprocessors.yaml'}: absent: copies go through delivery.relay")
    say(f"policy version {policies.version}")
    _check_privacy(config, say)
    _check_passwords(config, say)
    _check_imap(config, say)
    status = _check_dkim(config, args.dns, say)
    if args.json:
        print_json({"config": args.config, "ok": status == EXIT_OK,
                   "tenants": len(config.tenants),
                   "domains": sum(len(t.domains) for t in config.tenants.values()),
                   "policy_version": policies.version, "policy_files": list(policies.files),
                   "findings": found,
                   "warnings": [line for line in found
                                if "warning" in line or "NOT IN DNS" in line]})
    return status


def _check_passwords(config: GatewayConfig, say: Say) -> None:
    """Users whose password hash costs less than a new one (they still log in)."""
    for tid, tenant in config.tenants.items():
        for login, user in tenant.users.items():
            if is_weak(user.password_hash):
                say(f"tenant {tid}: user {login}: warning: the password hash costs less than "
                      f"scrypt N={N}; make a new one with users hash-password")


def _check_privacy(config: GatewayConfig, say: Say) -> None:
    """Whether originals are encrypted at rest, and with which master key."""
    privacy = config.privacy
    try:
        master = privacy.master_key()
    except KeyFileError as exc:  # only a missing variable gets this far
        say(f"encryption at rest: warning: {exc} here; the daemon does not start without it")
        return
    if master is None:
        say("encryption at rest: off; warning: originals are stored in clear "
              "(privacy.master_key_file or master_key_env)")
    else:
        say(f"encryption at rest: on (master key {master_id(master)}, data keys in "
              f"{privacy.keystore})")


def _check_imap(config: GatewayConfig, say: Say) -> None:
    """Each IMAP account, with warnings for what works but should not stay so."""
    used: dict[str, list[str]] = {}
    for tid, tenant in config.tenants.items():
        if tenant.keep_original is not None and tenant.keep_original.imap is not None:
            used.setdefault(tenant.keep_original.imap, []).append(f"{tid} keep_original")
        for name, source in tenant.imap_pull.items():
            used.setdefault(source.account, []).append(f"{tid} imap_pull {name}")
    for name, account in config.imap_accounts.items():
        where = f"{account.host}:{account.server_port}"
        roles = ", ".join(used.get(name, [])) or "not used"
        line = f"imap {name} ({where}, tls {account.tls}): {roles}"
        warnings = []
        if account.password_env is not None and not os.environ.get(account.password_env):
            warnings.append(f"password_env {account.password_env} is not set here (the "
                            "daemon needs it in its environment)")
        if account.tls != "none" and not account.verify:
            warnings.append("verify: false: the server's certificate is not checked")
        try:
            local = ipaddress.ip_address(account.host.strip("[]")).is_loopback
        except ValueError:
            local = account.host == "localhost"
        if account.tls == "none" and not local:
            warnings.append("tls: none: the password crosses the network in clear text")
        say(line + "".join(f"; warning: {w}" for w in warnings))


def _check_dkim(config: GatewayConfig, dns: bool, say: Say) -> int:
    signer = signing.from_config(config)  # each key was read and checked while loading
    in_use = {k.record_name for ks in signer.by_domain.values() for k in ks}
    status = EXIT_OK
    lookup = dns_lookup([parse_hostport(s) for s in config.delivery.dns_servers],
                        config.delivery.dns_timeout)
    for setting in config.dkim.keys:
        key = keyfiles.load(setting.key_file, setting.domain, setting.selector, setting.algorithm)
        size = f", {key.bits} bits" if key.algorithm == keyfiles.RSA else ""
        role = "signs" if key.record_name in in_use else "kept (a later key signs)"
        line = f"dkim {key.record_name} ({key.algorithm}{size}): {role}"
        if key.algorithm == keyfiles.RSA and key.bits < keys.GOOD_RSA_BITS:
            line += f"; warning: use {keys.GOOD_RSA_BITS} bits"
        if dns:
            problem = keys.published_problem(key, lookup)
            line += "; DNS publishes it" if problem is None else f"; NOT IN DNS: {problem}"
            if problem is not None:
                status = EXIT_FAILURE
        say(line)
    unsigned = sorted(tid for tid, t in config.tenants.items()
                      if not any(d.lower() in signer.by_domain for d in t.domains))
    if unsigned:
        say(f"dkim: warning: no key for any domain of tenant {', '.join(unsigned)}: "
              "what the gateway sends for them goes out unsigned")
    return status
