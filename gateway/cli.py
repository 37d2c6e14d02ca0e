"""The ``mailflowr-gateway`` command line.

Every command reads the same configuration (``--config``, default
config/gateway.yaml, or $MAILFLOWR_CONFIG).  Errors are one line on stderr and
a non-zero exit: 2 for an invalid configuration or usage, 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from gateway import files
from gateway.config import GatewayConfig, load, parse_hostport
from gateway.errors import ConfigError

DEFAULT_CONFIG = "config/gateway.yaml"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class CommandError(Exception):
    """A command cannot do what was asked; the text is shown as it is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="PATH",
        default=os.environ.get("MAILFLOWR_CONFIG", DEFAULT_CONFIG),
        help=f"configuration file (default: $MAILFLOWR_CONFIG or {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailflowr-gateway", description="MailFlowr Gateway")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the daemon in the foreground until SIGTERM")
    _config_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate the configuration without starting")
    _config_arg(p)
    p.add_argument("--dns", action="store_true",
                   help="also check that DNS publishes each DKIM key (delivery.dns_servers)")
    p.add_argument("--policies", metavar="DIR",
                   help="validate the policy files of DIR (e.g. an edited copy, before it is "
                        "renamed into place) instead of policies.directory")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("status", help="what the running daemon is doing (from its metrics port)")
    _config_arg(p)
    p.add_argument("--url", metavar="URL",
                   help="the daemon's metrics port (default: http://metrics.listen)")
    p.add_argument("--json", action="store_true", help="the status document as JSON")
    p.set_defaults(func=cmd_status)

    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="dkim_command", required=True, parser_class=_Parser)
    p = dsub.add_parser("keygen", help="write a new private key (mode 0600) and print its "
                                       "DNS record")
    p.add_argument("--domain", required=True, help="the signing domain (d=)")
    p.add_argument("--selector", required=True, help="the selector (s=), e.g. mf2026a")
    p.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    p.add_argument("--bits", type=_positive_int, default=2048, help="RSA key size (2048)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the key (default: DOMAIN.SELECTOR.key here)")
    p.set_defaults(func=cmd_dkim_keygen)

    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    p = dbsub.add_parser("upgrade", help="apply pending schema migrations")
    _config_arg(p)
    p.set_defaults(func=cmd_db_upgrade)

    msgs = sub.add_parser("messages", help="stored messages")
    msub = msgs.add_subparsers(dest="messages_command", required=True, parser_class=_Parser)
    p = msub.add_parser("list", help="list stored messages, oldest first")
    _config_arg(p)
    p.add_argument("--tenant", help="only this tenant's messages")
    p.add_argument("--status", choices=["received", "processed", "quarantined"])
    p.add_argument("--limit", type=_positive_int, help="at most this many")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=cmd_messages_list)

    p = msub.add_parser("show", help="everything stored about one message")
    _config_arg(p)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_messages_show)

    p = msub.add_parser("export", help="write the stored original as .eml")
    _config_arg(p)
    p.add_argument("id")
    p.add_argument("--out", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--with-trace", action="store_true",
                   help="prepend the Received header the gateway added")
    p.set_defaults(func=cmd_messages_export)

    queue = sub.add_parser("queue", help="the delivery queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True, parser_class=_Parser)
    p = qsub.add_parser("list", help="deliveries with their state, reason and next attempt")
    _config_arg(p)
    p.add_argument("--status", choices=["pending", "held", "sent", "failed"])
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="include sent deliveries")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_list)
    p = qsub.add_parser("retry", help="make deferred, held or failed deliveries due now")
    _config_arg(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", type=_positive_int)
    which.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_queue_retry)
    p = qsub.add_parser("drop", help="give up a delivery (it is kept as failed)")
    _config_arg(p)
    p.add_argument("id", type=_positive_int)
    p.add_argument("--reason", default="by an operator")
    p.set_defaults(func=cmd_queue_drop)

    users = sub.add_parser("users", help="users of the submission service")
    usub = users.add_subparsers(dest="users_command", required=True, parser_class=_Parser)
    p = usub.add_parser("hash-password",
                        help="print the password_hash for a password read from stdin")
    p.set_defaults(func=cmd_users_hash_password)

    ret = sub.add_parser("retention", help="the retention policy")
    retsub = ret.add_subparsers(dest="retention_command", required=True, parser_class=_Parser)
    p = retsub.add_parser("sweep", help="delete what the retention policy says has expired")
    _config_arg(p)
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention_sweep)
    p = retsub.add_parser("preview",
                          help="what the next sweep would delete under the policies of DIR")
    _config_arg(p)
    p.add_argument("--policies", metavar="DIR", required=True,
                   help="a policy directory (e.g. an edited copy), validated first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retention_preview)

    sps = sub.add_parser("subprocessors", help="the subprocessor registry and objections")
    ssub = sps.add_subparsers(dest="subprocessors_command", required=True, parser_class=_Parser)
    p = ssub.add_parser("list", help="the registry, and which relays each tenant may use now")
    _config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_subprocessors_list)
    p = ssub.add_parser("notices", help="change notices sent, with their objection windows")
    _config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_subprocessors_notices)
    p = ssub.add_parser("object", help="record a tenant's objection to a subprocessor")
    _config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("name")
    p.add_argument("--note", default="", help="e.g. how and when the objection arrived")
    p.set_defaults(func=cmd_subprocessors_object)

    imap = sub.add_parser("imap", help="mailbox import and kept originals (IMAP)")
    isub = imap.add_subparsers(dest="imap_command", required=True, parser_class=_Parser)
    p = isub.add_parser("status", help="each mailbox source and keep-original folder: "
                                       "last success, last error, backlog")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_imap_status)

    rules = sub.add_parser("rules", help="workflow rules")
    rsub = rules.add_subparsers(dest="rules_command", required=True, parser_class=_Parser)
    p = rsub.add_parser("test", help="which rules match a message, and the plan (sends nothing)")
    _config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("file", metavar="FILE.eml")
    p.add_argument("--direction", choices=["inbound", "outbound"], default="inbound")
    p.add_argument("--sender", help="envelope sender (default: the From address)")
    p.add_argument("--recipient", action="append",
                   help="envelope recipient, repeatable (default: To and Cc addresses)")
    p.set_defaults(func=cmd_rules_test)

    from gateway.privacy import commands as privacy_commands

    privacy_commands.add_parsers(sub, _config_arg)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from gateway.policyset import PolicyError
    from gateway.store.keystore import KeyUnavailable

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


def _config(args: argparse.Namespace) -> GatewayConfig:
    return load(args.config)


def _store(args: argparse.Namespace) -> Any:
    from gateway.startup import StartupError, open_store

    try:
        return open_store(_config(args), upgrade_sqlite=False, need_keys=False)
    except StartupError as exc:
        raise CommandError(str(exc)) from None


# ------------------------------------------------------------------ commands
def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.daemon import serve

    config = _config(args)
    policies = _policies(config)  # a policy set that does not validate stops the start
    return serve(config, policies, Path(args.config))


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from gateway import keyfiles
    from gateway.auth import keys

    algorithm = keyfiles.ED25519 if args.algorithm == "ed25519" else keyfiles.RSA
    domain = args.domain.lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?", domain) or "." not in domain:
        raise CommandError(f"not a domain: {args.domain!r}")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", args.selector):
        raise CommandError(f"not a selector (letters, digits, - and .): {args.selector!r}")
    out = Path(args.out or f"{domain}.{args.selector}.key")
    try:
        data = keys.generate(algorithm, args.bits)
        keyfiles.write_private(out, data)
    except keyfiles.KeyFileError as exc:
        raise CommandError(str(exc)) from None
    except FileExistsError:
        raise CommandError(f"{out}: exists; a key is never overwritten") from None
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror}") from None
    _, public, _ = keyfiles.parse(data, algorithm)
    name = f"{args.selector}._domainkey.{domain}"
    print(f"; private key written to {out} (mode 0600); publish this record:")
    print(keys.txt_zone_line(name, keyfiles.dns_record(algorithm, public)))
    print("; then add to gateway.yaml, after any older key of the domain:")
    print(f"; dkim:\n;   keys:\n;     - {{domain: {domain}, selector: {args.selector}, "
          f"algorithm: {algorithm}, key_file: {out.resolve()}}}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if not url:
        listen = _config(args).metrics.listen
        if not listen:
            raise CommandError(f"{args.config}: metrics.listen is empty, so the daemon serves "
                               "no status; give --url")
        host, port = parse_hostport(listen)
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=10) as reply:
            doc = json.load(reply)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CommandError(f"no daemon answers at {url}: {reason}") from None
    if args.json:
        json.dump(doc, sys.stdout, indent=1, sort_keys=True)
        print()
        return EXIT_OK
    print(f"MailFlowr Gateway {doc['version']}, pid {doc['pid']}, {doc['state']} since "
          f"{doc['started']} ({doc['uptime_seconds']:.0f} s)")
    for name, listener in doc["listeners"].items():
        print(f"  {name:11} {listener['address']:24} {listener['sessions']} sessions")
    database = doc["database"]
    print(f"  database    {database['name']}: {'up' if database['up'] else 'DOWN'}")
    print(f"  policy      {doc['policy']['version']} (loaded {doc['policy']['loaded_at']})")
    for problem in doc["policy"].get("reload_refused", []):
        print(f"              last reload refused: {problem}")
    pipeline = doc["pipeline"]
    print(f"  pipeline    {pipeline['waiting']} to process, oldest "
          f"{pipeline['oldest_seconds']} s")
    d = doc["deliveries"]
    print(f"  deliveries  {d['pending']} pending (oldest {d['oldest_pending_seconds']} s), "
          f"{d['held']} held")
    print(f"  retention   last sweep {doc['retention']['last_sweep'] or 'not yet'}")
    return EXIT_OK


def _policies(config: GatewayConfig, directory: Path | None = None) -> Any:
    from gateway import policyset as loader

    return loader.load(directory or config.policies.directory, config.tenants.keys(),
                       config.destinations.keys())


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    print(f"{args.config}: ok ({len(config.tenants)} tenants, "
          f"{sum(len(t.domains) for t in config.tenants.values())} domains)")
    directory = Path(args.policies) if args.policies else config.policies.directory
    policies = _policies(config, directory)
    if "workflows.yaml" in policies.files:
        count = sum(len(r) for r in policies.workflows.rules.values())
        print(f"{directory / 'workflows.yaml'}: ok ({count} rules)")
    retention = policies.retention
    if "retention.yaml" in policies.files:
        print(f"{directory / 'retention.yaml'}: ok ({len(retention.tags)} tags, "
              f"default {retention.default}, {len(retention.holds)} holds)")
    else:
        print(f"{directory / 'retention.yaml'}: absent: all mail is kept {retention.default}")
    routing = policies.subprocessors
    if routing is not None:
        print(f"{directory / 'subprocessors.yaml'}: ok ({len(routing.registry)} subprocessors, "
              f"{len(routing.tenants)} tenants, {len(routing.routing)} routing rules)")
    else:
        print(f"{directory / 'subprocessors.yaml'}: absent: copies go through delivery.relay")
    print(f"policy version {policies.version}")
    _check_privacy(config)
    _check_imap(config)
    return _check_dkim(config, args.dns)


def _check_privacy(config: GatewayConfig) -> None:
    """Whether originals are encrypted at rest, and with which master key."""
    from gateway.keyfiles import KeyFileError
    from gateway.store.keystore import master_id

    privacy = config.privacy
    try:
        master = privacy.master_key()
    except KeyFileError as exc:  # only a missing variable gets this far
        print(f"encryption at rest: warning: {exc} here; the daemon does not start without it")
        return
    if master is None:
        print("encryption at rest: off; warning: originals are stored in clear "
              "(privacy.master_key_file or master_key_env)")
    else:
        print(f"encryption at rest: on (master key {master_id(master)}, data keys in "
              f"{privacy.keystore})")


def _check_imap(config: GatewayConfig) -> None:
    """Each IMAP account, with warnings for what works but should not stay so."""
    import ipaddress

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
        print(line + "".join(f"; warning: {w}" for w in warnings))


def _check_dkim(config: GatewayConfig, dns: bool) -> int:
    from gateway import keyfiles
    from gateway.auth import keys, signing
    from gateway.auth.verify import dns_lookup

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
        print(line)
    unsigned = sorted(tid for tid, t in config.tenants.items()
                      if not any(d.lower() in signer.by_domain for d in t.domains))
    if unsigned:
        print(f"dkim: no key for any domain of tenant {', '.join(unsigned)}: "
              "what the gateway sends for them goes out unsigned")
    return status


def cmd_imap_status(args: argparse.Namespace) -> int:
    from gateway.store.mailboxes import MailboxState

    config = _config(args)
    state = MailboxState(_store(args))
    seen = {(r["tenant_id"], r["source"], r["folder"]): r for r in state.status()}
    sources = []
    for tid, tenant in config.tenants.items():  # configured ones, looked at or not yet
        for name, source in tenant.imap_pull.items():
            for folder in source.folders:
                row = seen.get((tid, name, folder), {})
                sources.append({
                    "tenant": tid, "source": name, "folder": folder, "account": source.account,
                    "after_import": source.after_import,
                    "uidvalidity": row.get("uidvalidity"), "last_uid": row.get("last_uid", 0),
                    "imported": row.get("imported", 0), "backlog": row.get("backlog", 0),
                    "last_success_at": _jsonable(row.get("last_success_at")),
                    "last_error": row.get("last_error"),
                    "last_error_at": _jsonable(row.get("last_error_at")),
                })
    keep = [{k: _jsonable(v) for k, v in t.items()} for t in state.keep_targets()]
    if args.json:
        json.dump({"sources": sources, "keep_original": keep}, sys.stdout, indent=1)
        print()
        return EXIT_OK
    def outcome(entry: dict[str, Any]) -> str:
        error = (f"; last error {entry['last_error_at']}: {_printable(entry['last_error'], 120)}"
                 if entry["last_error"] else "")
        return f"last success {entry['last_success_at'] or 'never'}{error}"

    print("mailbox import:" if sources else "mailbox import: none configured")
    for s in sources:
        print(f"  {s['tenant']}/{s['source']} {_printable(s['folder'], 40)!r} "
              f"({s['account']}, {s['after_import']}): {s['imported']} imported, "
              f"backlog {s['backlog']}, {outcome(s)}")
    print("kept originals:" if keep else "kept originals: none yet")
    for k in keep:
        print(f"  {k['tenant']} {k['account']}:{_printable(k['folder'], 40)}: {k['sent']} "
              f"appended, backlog {k['pending'] + k['held']} ({k['held']} held), "
              f"{k['failed']} failed, {outcome(k)}")
    return EXIT_OK


def cmd_rules_test(args: argparse.Namespace) -> int:
    from gateway.pipeline.parse import parse_message
    from gateway.workflow.rules import MessageView, evaluate

    config = _config(args)
    if args.tenant not in config.tenants:
        raise CommandError(f"no tenant {args.tenant!r} in {args.config}")
    policies = _policies(config)
    retention = policies.retention
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"{args.file}: {exc.strerror}") from None
    parsed = parse_message(raw, retention.classifier_for(args.tenant))
    roles = parsed["addresses"]
    sender = args.sender or next((a for r, a in roles if r == "from"), "")
    recipients = args.recipient or [a for r, a in roles if r in ("to", "cc")]
    view = MessageView(
        direction=args.direction, sender=sender, recipients=tuple(recipients),
        headers=tuple(parsed["headers"]),
        attachments=tuple((a["filename"] or "", a["content_type"] or "")
                          for a in parsed["attachments"]),
        size=len(raw), tags=frozenset(retention.tags_for(args.tenant, parsed["findings"])),
    )
    plan = evaluate(policies.workflows.for_tenant(args.tenant), view)
    print(f"message:    {args.file} ({len(raw)} bytes, {args.direction})")
    print(f"envelope:   from <{sender}> to {', '.join(f'<{r}>' for r in recipients) or '-'}")
    if parsed["parse_failed"]:
        print(f"parse:      {'; '.join(parsed['defects'])}")
    print(f"found:      {', '.join(parsed['findings']) or '-'}")
    if view.tags:
        print(f"pre-tags:   {', '.join(sorted(view.tags))} (tenant defaults and classifier)")
    if not plan.matched:
        print("matched:    no rule")
    for name, why in plan.matched:
        print(f"matched:    {name}: {_printable(why)}")
    if plan.stopped_by:
        print(f"stopped by: {plan.stopped_by}")
    if plan.reject:
        print(f"outcome:    rejected at end of DATA: {plan.reject}")
    elif plan.discard:
        print("outcome:    discarded (accepted, then dropped without a bounce)")
    else:
        print("outcome:    delivered")
        print(f"cc copies:  {', '.join(plan.cc) or '-'}")
        print(f"bcc copies: {', '.join(plan.bcc) or '-'}")
        print(f"routes:     {', '.join(plan.routes) or '-'}")
    tags = tuple(dict.fromkeys((*sorted(view.tags), *plan.tags)))
    print(f"tags:       {', '.join(tags) or '-'}")
    print(f"retention:  {retention.decide(args.tenant, tags).rule}")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store import database

    config = _config(args)
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


def _jsonable(value: Any) -> Any:
    from gateway.clock import aware

    if isinstance(value, datetime):
        return aware(value).isoformat()
    return value


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant": row["tenant_id"],
        "status": row["status"],
        "received_at": _jsonable(row["received_at"]),
        "message_id": row["message_id"],
        "sender": row["mail_from"],
        "recipients": row["recipients"],
        "subject": row["subject"],
        "size": row["size"],
        "tags": row["tags"],
        "parse_failed": row["parse_failed"],
    }


def _printable(text: Any, width: int | None = None) -> str:
    """Header text made safe for a terminal: no control characters."""
    if text is None:
        return "-"
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean if width is None or len(clean) <= width else clean[: width - 1] + "…"


def cmd_messages_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = store.list_messages(tenant=args.tenant, limit=args.limit, status=args.status)
    if args.json:
        json.dump([_summary(r) for r in rows], sys.stdout, indent=1)
        print()
        return EXIT_OK
    print(f"{'ID':26}  {'TENANT':12} {'STATUS':11} {'SIZE':>8}  {'SENDER':30} SUBJECT")
    for r in rows:
        print(f"{r['id']:26}  {_printable(r['tenant_id'], 12):12} {r['status']:11} "
              f"{r['size']:>8}  {_printable(r['mail_from'] or '<>', 30):30} "
              f"{_printable(r['subject'], 60)}")
    return EXIT_OK


def _get(store: Any, message_id: str) -> dict[str, Any]:
    row = store.get_message(message_id.upper())
    if row is None:
        raise CommandError(f"no message with id {message_id}")
    result: dict[str, Any] = row
    return result


def cmd_messages_show(args: argparse.Namespace) -> int:
    store = _store(args)
    row = _get(store, args.id)
    data = _summary(row)
    data.update(
        {
            "header_from": row["header_from"], "header_to": row["header_to"],
            "header_cc": row["header_cc"], "date": row["date"],
            "attachments": row["attachments"] or [], "defects": row["defects"] or [],
            "sha256": row["sha256"], "client_address": row["client_address"],
            "helo": row["helo"], "protocol": row["protocol"],
            "processed_at": _jsonable(row["processed_at"]), "last_error": row["last_error"],
            "attempts": row["attempts"], "policy_version": row["policy_version"],
            **_auth_summary(row["auth_results"] or {}),
        }
    )
    data.update(_retention_of(_config(args), row))
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        print()
        return EXIT_OK
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)
        print(f"{key + ':':16}{_printable(value)}")
    return EXIT_OK


def _auth_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The stored authentication results, one line per check."""
    def line(r: dict[str, str], detail: str) -> str:
        return r["result"] + detail + (f" ({r['reason']})" if r.get("reason") else "")

    out: dict[str, Any] = {"dkim": [
        line(r, f" d={r['domain']} s={r['selector']}" if r["domain"] else "")
        for r in results.get("dkim", [])]}
    if "spf" in results:
        spf = results["spf"]
        out["spf"] = line(spf, f" {spf['identity']}={spf['domain']}" if spf["domain"] else "")
    if "arc" in results:
        out["arc"] = line(results["arc"], "")
    if "dmarc" in results:
        d = results["dmarc"]
        out["dmarc"] = line(d, (f" from={d['domain']}" if d["domain"] else "")
                            + (f" p={d['policy']} disposition={d['disposition']}"
                               if d["policy"] else ""))
    return out


def _retention_of(config: GatewayConfig, row: dict[str, Any]) -> dict[str, Any]:
    """Which retention rule applies to a stored message under the policy on disk,
    when it expires, and what holds it."""
    from gateway.clock import aware, utcnow
    from gateway.policyset import PolicyError

    try:
        policy = _policies(config).retention
    except PolicyError as exc:
        return {"retention": f"unknown: the policy does not validate ({exc.problems[0]})"}
    if row["status"] == "received":
        return {"retention": "decided once the pipeline has processed the message"}
    now = utcnow()
    tags = row["tags"] or []
    unknown = policy.unknown_tags(tags)
    if unknown:
        return {"retention": f"kept: tag {', '.join(unknown)} is not in the retention policy"}
    decision = policy.decide(row["tenant_id"], tags)
    addresses = {a for _, a in row.get("addresses", [])}
    holds = [h.name for h in policy.active_holds(now)
             if h.covers(row["tenant_id"], tags) and (h.address is None or h.address in addresses)]
    received = aware(row["received_at"])
    return {"retention": decision.rule,
            "expires_at": decision.expires(received).isoformat(),
            "held_by": holds}


def cmd_retention_sweep(args: argparse.Namespace) -> int:
    from gateway.sweeper import Sweeper

    config = _config(args)
    policies = _policies(config)
    sweeper = Sweeper(_store(args), batch_size=config.retention.batch_size,
                      pause=config.retention.batch_pause)
    report = sweeper.sweep(policies.retention, dry_run=args.dry_run,
                           actor=f"cli:{os.environ.get('USER', 'unknown')}")
    if report.skipped:
        raise CommandError(f"not swept: {report.skipped}")
    _print_sweep(report, args.json, policies.version)
    return EXIT_OK


def cmd_retention_preview(args: argparse.Namespace) -> int:
    from gateway.sweeper import Sweeper

    config = _config(args)
    policies = _policies(config, Path(args.policies))
    report = Sweeper(_store(args)).sweep(policies.retention, dry_run=True)
    _print_sweep(report, args.json, policies.version)
    return EXIT_OK


def _print_sweep(report: Any, as_json: bool, version: str) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    if as_json:
        json.dump({
            "policy_version": version, "dry_run": report.dry_run,
            "expired": report.expired, "held": report.held, "seconds": round(report.seconds, 3),
            "groups": [{"tenant": g.tenant, "tags": list(g.tags), "rule": g.rule,
                        "cutoff": g.cutoff.isoformat() if g.cutoff else None,
                        "expired": g.expired, "held": g.held, "note": g.note}
                       for g in report.groups],
        }, sys.stdout, indent=1)
        print()
        return
    print(f"{'TENANT':16} {'TAGS':28} {'EXPIRED':>8} {'HELD':>6}  RULE")
    for g in report.groups:
        if g.expired or g.held or g.note:
            print(f"{_printable(g.tenant, 16):16} {_printable(','.join(g.tags) or '-', 28):28} "
                  f"{g.expired:>8} {g.held:>6}  {g.rule}{'; ' + g.note if g.note else ''}")
    print(f"{verb} {report.expired} messages, {report.held} kept by legal holds "
          f"(policy {version}, {report.seconds:.1f} s)")


def _routing(config: GatewayConfig, args: argparse.Namespace) -> Any:
    policies = _policies(config)
    if policies.subprocessors is None:
        raise CommandError(f"no {config.policies.directory / 'subprocessors.yaml'}: copies go "
                           "through delivery.relay without a subprocessor policy")
    return policies.subprocessors


def cmd_subprocessors_list(args: argparse.Namespace) -> int:
    from gateway.clock import utcnow
    from gateway.policy.subprocessors import Consent

    config = _config(args)
    routing = _routing(config, args)
    rows = _store(args).consent_rows()
    consent = Consent(rows.baseline, rows.effective, rows.objections)
    now = utcnow()
    registry = [{"name": sp.name, "purpose": sp.purpose, "entity": sp.entity,
                 "country": sp.country, "region": sp.region,
                 "data_categories": list(sp.data_categories), "added": sp.added.isoformat()}
                for sp in routing.registry.values()]
    tenants = {tid: {name: routing.why_not(tid, name, consent, now) or "usable"
                     for name in routing.registry}
               for tid in sorted(config.tenants)}
    if args.json:
        json.dump({"registry": registry, "tenants": tenants}, sys.stdout, indent=1)
        print()
        return EXIT_OK
    print(f"{'NAME':16} {'PURPOSE':15} {'REGION':7} {'COUNTRY':7} {'ADDED':10}  ENTITY")
    for r in registry:
        print(f"{r['name']:16} {r['purpose']:15} {r['region']:7} {r['country']:7} "
              f"{r['added']:10}  {_printable(r['entity'])}")
    for tid, status in tenants.items():
        print(f"\ntenant {tid}:")
        for name, why in status.items():
            print(f"  {name:16} {why}")
    return EXIT_OK


def cmd_subprocessors_notices(args: argparse.Namespace) -> int:
    rows = _store(args).list_notices(args.tenant)
    items = [{"tenant": r["tenant_id"], "subprocessor": r["subprocessor"],
              "change": r["change"], "sent_at": _jsonable(r["created_at"]),
              "objection_window_ends": _jsonable(r["effective_at"]),
              "message": r["message_id"]} for r in rows]
    if args.json:
        json.dump(items, sys.stdout, indent=1)
        print()
        return EXIT_OK
    print(f"{'TENANT':16} {'SUBPROCESSOR':16} {'CHANGE':8} {'QUEUED':26} {'WINDOW ENDS':26} "
          "MESSAGE")
    for n in items:
        print(f"{n['tenant']:16} {n['subprocessor']:16} {n['change']:8} {n['sent_at']:26} "
              f"{n['objection_window_ends']:26} {n['message'] or '-'}")
    return EXIT_OK


def cmd_subprocessors_object(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.tenant not in config.tenants:
        raise CommandError(f"no tenant {args.tenant!r} in {args.config}")
    routing = _routing(config, args)
    if args.name not in routing.registry:
        raise CommandError(f"no subprocessor {args.name!r} in the registry "
                           f"(known: {', '.join(sorted(routing.registry))})")
    _store(args).record_objection(args.tenant, args.name,
                                  f"cli:{os.environ.get('USER', 'unknown')}", args.note[:1000])
    print(f"objection of tenant {args.tenant} to {args.name} recorded: "
          f"{args.name} will not handle its mail")
    return EXIT_OK


def cmd_messages_export(args: argparse.Namespace) -> int:
    import hashlib

    store = _store(args)
    row = _get(store, args.id)
    raw = store.raw(row["id"])
    if raw is None:
        raise CommandError(f"message {row['id']}: the stored original is missing")
    if hashlib.sha256(raw).hexdigest() != row["sha256"]:
        raise CommandError(f"message {row['id']}: the stored original fails its checksum")
    data = (row["trace_header"].encode() if args.with_trace else b"") + raw
    if args.out:
        out = Path(args.out)
        try:
            if out.exists() and not out.is_file():
                # a device or a pipe (/dev/stdout, a FIFO) is written to, never replaced
                with out.open("ab") as f:
                    f.write(data)
            else:  # a file appears whole or not at all
                tmp = out.with_name(f".{out.name}.tmp")
                with os.fdopen(files.create(tmp), "wb") as f:  # personal data: 0600
                    f.write(data)
                tmp.replace(out)
        except OSError as exc:
            raise CommandError(f"{args.out}: {exc.strerror}") from None
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    store.audit(
        f"cli:{os.environ.get('USER', 'unknown')}", "message.export",
        tenant_id=row["tenant_id"], message_id=row["id"], detail={"bytes": len(data)},
    )
    return EXIT_OK


def _delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "message": row["message_id"], "tenant": row["tenant_id"],
        "kind": row["kind"], "recipient": row["recipient"],
        "destination": row["destination"] or "relay", "rule": row["rule"],
        "status": row["status"], "attempts": row["attempts"],
        "next_attempt_at": _jsonable(row["next_attempt_at"]) if row["status"] == "pending"
        else None,
        "reason": row["last_error"],
    }


def cmd_queue_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = [r for r in store.list_deliveries(status=args.status, tenant=args.tenant)
            if args.all or args.status == "sent" or r["status"] != "sent"]
    items = [_delivery_json(r) for r in rows]
    if args.json:
        json.dump(items, sys.stdout, indent=1)
        print()
        return EXIT_OK
    print(f"{'ID':>6} {'MESSAGE':26} {'KIND':6} {'STATUS':7} {'TRIES':>5} {'NEXT ATTEMPT':25} "
          f"{'RECIPIENT':30} REASON")
    for d in items:
        # a kept original's "recipient" is a folder of an IMAP account
        to = f"{d['destination']}:{d['recipient']}" if d["kind"] == "append" else d["recipient"]
        print(f"{d['id']:>6} {d['message']:26} {d['kind']:6} {d['status']:7} {d['attempts']:>5} "
              f"{d['next_attempt_at'] or '-':25} {_printable(to, 30):30} "
              f"{_printable(d['reason'] or '-', 80)}")
    return EXIT_OK


def cmd_queue_retry(args: argparse.Namespace) -> int:
    store = _store(args)
    count = store.retry_deliveries(None if args.all else args.id)
    if not args.all and count == 0:
        raise CommandError(f"no delivery {args.id} waiting to be retried")
    print(f"{count} deliveries due now")
    return EXIT_OK


def cmd_queue_drop(args: argparse.Namespace) -> int:
    store = _store(args)
    if not store.drop_delivery(args.id, args.reason):
        raise CommandError(f"no delivery {args.id} that could be dropped (unknown, or sent)")
    store.audit(f"cli:{os.environ.get('USER', 'unknown')}", "delivery.drop",
                detail={"delivery": args.id, "reason": args.reason[:200]})
    print(f"delivery {args.id} dropped")
    return EXIT_OK


def cmd_users_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from gateway.passwords import hash_password

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
