"""Command line for data-subject requests and the tenant lifecycle: ``export``,
``erase``, ``tenant deactivate``, ``keys``, ``token``, ``incident notify`` and ``audit``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from gateway import cli, privacy
from gateway.cli import CommandError, _jsonable, _printable
from gateway.config import GatewayConfig


def actor() -> str:
    return f"cli:{os.environ.get('USER', 'unknown')}"


def add_parsers(sub: Any, config_arg: Any) -> None:
    p = sub.add_parser("erase", help="erase every message of one person from one tenant")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--subject", required=True, type=subject_address, metavar="ADDRESS",
                   help="the person's e-mail address (sender or recipient, any case)")
    p.add_argument("--dry-run", action="store_true", help="count, erase nothing")
    p.add_argument("--override-hold", action="store_true",
                   help="erase even what a legal hold covers (needs --reason)")
    p.add_argument("--reason", help="why the holds are overridden (kept in the audit log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("export", help="write everything held about a tenant, or one person "
                                      "of it, to a ZIP archive (.eml, mbox, JSON, manifest)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--out", "-o", required=True, metavar="FILE.zip",
                   help="the archive to write (never over an existing file)")
    p.add_argument("--subject", type=subject_address, metavar="ADDRESS",
                   help="only this person's data (an access or portability request)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)

    tenant = sub.add_parser("tenant", help="the tenant lifecycle")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, parser_class=cli._Parser)
    p = tsub.add_parser("deactivate", help="refuse the tenant's mail from now on and delete "
                                           "all its data (cannot be undone)")
    config_arg(p)
    p.add_argument("tenant")
    p.add_argument("--yes", action="store_true", help="do not ask (when run from a terminal)")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    p.set_defaults(func=cmd_tenant_deactivate)

    keys = sub.add_parser("keys", help="encryption at rest: the master key and data keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=cli._Parser)
    p = ksub.add_parser("generate", help="write a new master key file (mode 0600)")
    config_arg(p)
    p.add_argument("--out", required=True, metavar="FILE", help="never over an existing file")
    p.set_defaults(func=cmd_keys_generate)
    p = ksub.add_parser("status", help="the master key in use and each tenant's data keys")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_status)
    p = ksub.add_parser("rotate", help="wrap every data key under a new master key")
    config_arg(p)
    p.add_argument("--new-master-file", required=True, metavar="FILE",
                   help="the new master key (from keys generate)")
    p.set_defaults(func=cmd_keys_rotate)

    token = sub.add_parser("token", help="admin API tokens")
    tsub2 = token.add_subparsers(dest="token_command", required=True, parser_class=cli._Parser)
    p = tsub2.add_parser("create", help="make a token for one tenant (shown once)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", default="", help="what it is for, e.g. the tool that uses it")
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

    incident = sub.add_parser("incident", help="personal-data breach notices")
    isub = incident.add_subparsers(dest="incident_command", required=True,
                                   parser_class=cli._Parser)
    p = isub.add_parser("notify", help="send a breach notice to the tenant's privacy contact "
                                       "through the delivery queue (audited)")
    config_arg(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--file", required=True, metavar="NOTICE.txt", help="the notice (UTF-8)")
    p.add_argument("--discovered", required=True, type=_when, metavar="TIME",
                   help="when the incident was discovered (ISO 8601, e.g. 2026-11-24T09:30Z)")
    p.add_argument("--title", default="Notice of a personal data breach",
                   help="the subject of the mail")
    p.add_argument("--to", type=subject_address, metavar="ADDRESS",
                   help="instead of the privacy_contact in subprocessors.yaml")
    p.add_argument("--from", dest="sender", type=subject_address, metavar="ADDRESS",
                   help="the sender (default: notice.from of subprocessors.yaml)")
    p.set_defaults(func=cmd_incident_notify)

    audit = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, parser_class=cli._Parser)
    p = asub.add_parser("verify", help="check that no event was changed, removed or inserted")
    config_arg(p)
    p.add_argument("--anchor", metavar="HASH", type=_hash,
                   help="a head printed by an earlier verify: it must still be in the chain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_verify)
    p = asub.add_parser("list", help="audit events, oldest first")
    config_arg(p)
    p.add_argument("--tenant")
    p.add_argument("--action", help="e.g. subject.erase, or a prefix such as tenant")
    p.add_argument("--subject", type=subject_address, metavar="ADDRESS",
                   help="only events about this person (erasures, exports)")
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD")
    p.add_argument("--limit", type=cli._positive_int, help="the newest this many")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_list)


def subject_address(text: str) -> str:
    value = privacy.subject_address(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not an e-mail address: {text!r}")
    return value


def _hash(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError("an event hash is 64 hexadecimal digits")
    return text


def _day(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _when(text: str) -> datetime:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (ISO 8601): {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _privacy(args: argparse.Namespace) -> tuple[GatewayConfig, Any, Any]:
    """The configuration, the privacy key and the privacy store."""
    from gateway.privacy.keys import load_or_create
    from gateway.store.privacy import PrivacyStore

    store = cli._store(args)  # open_store() has loaded the key, or said why not
    config = cli._config(args)
    return config, load_or_create(config.privacy.key_file), PrivacyStore(store)


def _known_tenant(config: GatewayConfig, store: Any, tenant: str, *, active: bool = False
                  ) -> dict[str, Any] | None:
    """The tenant's row (None: configured, no mail stored yet); with ``active``, a
    deactivated tenant is refused too."""
    row = store.tenant_row(tenant)
    if row is None and tenant not in config.tenants:
        raise CommandError(f"no tenant {tenant!r} in the configuration or the database")
    if active and row is not None and not row["active"]:
        raise CommandError(f"tenant {tenant} is deactivated")
    result: dict[str, Any] | None = row
    return result


def cmd_erase(args: argparse.Namespace) -> int:
    from gateway.clock import utcnow
    from gateway.privacy import erasure

    if args.override_hold and not (args.reason or "").strip():
        raise CommandError("--override-hold needs --reason TEXT (it is kept in the audit log)")
    config, key, store = _privacy(args)
    _known_tenant(config, store, args.tenant)
    retention = cli._policies(config).retention
    started = time.monotonic()
    p = erasure.plan(store, retention, config, args.tenant, args.subject, utcnow())
    result: dict[str, Any] = {
        "tenant": args.tenant, "dry_run": args.dry_run, "messages": len(p.found),
        "held": p.held, "still_in_configuration": p.config_mentions, "exports": p.exports,
    }
    if args.dry_run:
        pass
    else:
        try:
            removed = erasure.erase(store, key, p, actor=actor(),
                                    exports=config.admin_api.export_directory,
                                    override_reason=args.reason if args.override_hold else None)
        except erasure.ErasureRefused as exc:
            raise CommandError(str(exc)) from None
        result.update(removed.as_dict())
    result["seconds"] = round(time.monotonic() - started, 3)
    if config.logging.personal_data:
        result["note"] = ("logging.personal_data is on: the journal may still hold this "
                          "address; it is outside what erase can reach")
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return cli.EXIT_OK
    if args.dry_run:
        print(f"would erase {len(p.found)} messages of tenant {args.tenant} "
              f"({sum(1 for f in p.found if f.status == 'received')} not yet processed) "
              f"and remove its {len(p.exports)} stored exports")
        for name, count in sorted(p.held.items()):
            print(f"  legal hold {name} covers {count} of them: erase would refuse "
                  "without --override-hold")
    else:
        print(f"erased {result['messages']} messages of tenant {args.tenant}: "
              f"{result['deliveries']} deliveries ({result['pending_deliveries']} still to go, "
              f"now cancelled), {result['imported']} import records, "
              f"{len(result['exports'])} stored exports, in {result['seconds']:.1f} s")
        if p.held:
            print(f"  legal holds overridden: {', '.join(sorted(p.held))}")
    for where in p.config_mentions:
        print(f"  the address is still in the configuration at {where}: remove it there")
    if "note" in result:
        print(f"  {result['note']}")
    return cli.EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.privacy.export import export

    out = Path(args.out)
    if out.exists():
        raise CommandError(f"{out}: exists; an export never overwrites a file")
    if not out.parent.is_dir():
        raise CommandError(f"{out.parent}: no such directory")
    config, _key, store = _privacy(args)
    _known_tenant(config, store, args.tenant)
    try:
        result = export(store, config, args.tenant, out, actor=actor(), subject=args.subject)
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror or exc}") from None
    rate = result.size / 1e6 / result.seconds if result.seconds else 0.0
    if args.json:
        json.dump({"path": str(out), "messages": result.messages, "files": result.files,
                   "bytes": result.size, "seconds": round(result.seconds, 3),
                   "manifest_sha256": result.manifest_sha256, "counts": result.counts},
                  sys.stdout, indent=1)
        print()
        return cli.EXIT_OK
    print(f"{out}: {result.messages} messages, {result.files} files, {result.size} bytes "
          f"in {result.seconds:.1f} s ({rate:.1f} MB/s)")
    return cli.EXIT_OK


def cmd_tenant_deactivate(args: argparse.Namespace) -> int:
    from gateway.privacy.erasure import purge_tenant

    config, _key, store = _privacy(args)
    row = _known_tenant(config, store, args.tenant)
    if args.dry_run:
        print(f"would refuse mail for tenant {args.tenant} and delete its "
              f"{store.count_messages(args.tenant)} messages, their deliveries, import state "
              "and consent records")
        return cli.EXIT_OK
    if row is not None and not row["active"]:
        print(f"tenant {args.tenant} was deactivated at {_jsonable(row['deactivated_at'])}; "
              "deleting whatever is left")
    else:
        if sys.stdin.isatty() and not args.yes:
            answer = input(f"This deletes all data of tenant {args.tenant} for good. "
                           "Type the tenant id to go on: ")
            if answer.strip() != args.tenant:
                raise CommandError("not confirmed: nothing changed")
        if row is None:
            store.store.sync_tenants({args.tenant: config.tenants[args.tenant].name})
        store.deactivate(args.tenant, actor())
        print(f"tenant {args.tenant} deactivated: its mail is refused (550 5.1.1) "
              "once the daemon notices, within seconds")
    purged = purge_tenant(store, config, args.tenant, actor())
    removed = purged.removed
    store.store.audit(actor(), "tenant.shred", tenant_id=args.tenant,
                      detail={"data_key_destroyed": purged.shredded})
    print(f"deleted {removed.messages} messages, {removed.deliveries} deliveries "
          f"({removed.pending} still to go, now cancelled), {removed.imports} import records")
    if purged.shredded:
        print("  its data key is destroyed: copies of its mail in database backups can no "
              "longer be opened")
    elif store.store.keystore is None:
        print("  encryption at rest is off: copies of its mail in database backups stay "
              "readable until those backups expire")
    if not purged.scrubbed:
        print("  the database's write-ahead log could not be truncated now (a reader was "
              "busy); the old pages go at its next checkpoint")
    if args.tenant in config.tenants:
        print(f"  tenant {args.tenant} is still in {args.config}: remove it there; "
              "while it stays, its mail is refused")
    return cli.EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    verdict = cli._store(args).verify_audit(args.anchor)
    if args.json:
        json.dump({"ok": verdict.ok, "events": verdict.events, "unchained": verdict.unchained,
                   "head": verdict.head, "problem": verdict.problem,
                   "anchor_found": verdict.anchor_found}, sys.stdout, indent=1)
        print()
        return cli.EXIT_OK if verdict.ok else cli.EXIT_FAILURE
    if verdict.problem:
        print(f"audit log TAMPERED: {verdict.problem}", file=sys.stderr)
        return cli.EXIT_FAILURE
    if verdict.anchor_found is False:
        print(f"audit log TAMPERED: the anchor {args.anchor} is not in the chain: events "
              "were removed from its end", file=sys.stderr)
        return cli.EXIT_FAILURE
    before = f" ({verdict.unchained} from before the chain began)" if verdict.unchained else ""
    print(f"audit log intact: {verdict.events} events{before}, head {verdict.head or '-'}")
    return cli.EXIT_OK


def cmd_audit_list(args: argparse.Namespace) -> int:
    subject_hash = None
    if args.subject:
        _config, key, _store = _privacy(args)
        subject_hash = key.subject_hash(args.subject)
    rows = cli._store(args).audit_events(args.tenant, action=args.action,
                                         subject_hash=subject_hash, since=args.since,
                                         limit=args.limit)
    items = [{"id": r["id"], "at": _jsonable(r["at"]), "tenant": r["tenant_id"],
              "actor": r["actor"], "action": r["action"], "message": r["message_id"],
              "detail": r["detail"], "hash": r["hash"]} for r in rows]
    if args.json:
        json.dump(items, sys.stdout, indent=1)
        print()
        return cli.EXIT_OK
    print(f"{'ID':>6} {'AT':32} {'TENANT':14} {'ACTOR':18} {'ACTION':24} DETAIL")
    for e in items:
        detail = json.dumps(e["detail"], sort_keys=True, ensure_ascii=False)
        if e["message"]:
            detail = f"message={e['message']} {detail}"
        print(f"{e['id']:>6} {e['at']:32} {_printable(e['tenant'], 14):14} "
              f"{_printable(e['actor'], 18):18} {e['action']:24} {_printable(detail, 100)}")
    return cli.EXIT_OK


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.keyfiles import write_private
    from gateway.store.keystore import master_id, new_master

    out = Path(args.out)
    key = new_master()
    try:
        write_private(out, (key + "\n").encode())
    except FileExistsError:
        raise CommandError(f"{out}: exists; a key is never overwritten") from None
    except OSError as exc:
        raise CommandError(f"{out}: {exc.strerror}") from None
    print(f"master key {master_id(bytes.fromhex(key))} written to {out} (mode 0600); "
          f"set privacy.master_key_file: {out.resolve()}")
    return cli.EXIT_OK


def _keystore(config: GatewayConfig) -> Any:
    from gateway.keyfiles import KeyFileError
    from gateway.store.keystore import KeyStore

    try:
        master = config.privacy.master_key()
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    if master is None:
        raise CommandError("encryption at rest is off: set privacy.master_key_file or "
                           "privacy.master_key_env")
    return KeyStore(config.privacy.keystore, master)


def cmd_keys_status(args: argparse.Namespace) -> int:
    config = cli._config(args)
    store = _keystore(config)
    entries = store.describe()
    if args.json:
        json.dump({"master": store.master_id, "keystore": str(store.directory),
                   "tenants": entries}, sys.stdout, indent=1)
        print()
        return cli.EXIT_OK
    print(f"master key {store.master_id}, keystore {store.directory}")
    for e in entries:
        if "problem" in e:
            print(f"  {e['tenant']:16} {e['problem']}")
            continue
        state = "ok" if e["master"] == store.master_id else f"wrapped by {e['master']}"
        for k in e["keys"]:
            print(f"  {e['tenant']:16} {k['id']:40} {k['created'][:19]}  {state}")
    return cli.EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.keyfiles import KeyFileError, read_master
    from gateway.store.keystore import master_id

    config = cli._config(args)
    store = _keystore(config)
    try:
        new = read_master(Path(args.new_master_file))
        count = store.rewrap(new)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    cli._store(args).audit(actor(), "keys.rotate", detail={
        "from": store.master_id, "to": master_id(new), "tenants": count})
    print(f"{count} tenants' data keys now wrapped by master key {master_id(new)}: point "
          f"privacy.master_key_file at {args.new_master_file} and restart every instance")
    return cli.EXIT_OK


def cmd_token_create(args: argparse.Namespace) -> int:
    from gateway.store.tokens import TokenStore

    config, _key, store = _privacy(args)
    _known_tenant(config, store, args.tenant, active=True)
    token_id, token = TokenStore(store.store).create(args.tenant, args.name)
    store.store.audit(actor(), "token.create", tenant_id=args.tenant,
                      detail={"token": token_id, "name": args.name[:200]})
    print(f"token {token_id} for tenant {args.tenant}; it is shown only now:")
    print(token)
    return cli.EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    from gateway.store.tokens import TokenStore

    rows = TokenStore(cli._store(args)).list(args.tenant)
    items = [{"id": r["id"], "tenant": r["tenant_id"], "name": r["name"],
              "created_at": _jsonable(r["created_at"]),
              "last_used_at": _jsonable(r["last_used_at"]),
              "revoked_at": _jsonable(r["revoked_at"])} for r in rows]
    if args.json:
        json.dump(items, sys.stdout, indent=1)
        print()
        return cli.EXIT_OK
    print(f"{'ID':12} {'TENANT':16} {'CREATED':25} {'LAST USED':25} {'REVOKED':25} NAME")
    for t in items:
        print(f"{t['id']:12} {_printable(t['tenant'], 16):16} {t['created_at'][:25]:25} "
              f"{(t['last_used_at'] or '-')[:25]:25} {(t['revoked_at'] or '-')[:25]:25} "
              f"{_printable(t['name'])}")
    return cli.EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from gateway.store.tokens import TokenStore

    store = cli._store(args)
    if not TokenStore(store).revoke(args.id):
        raise CommandError(f"no token {args.id} that could be revoked (unknown, or revoked)")
    store.audit(actor(), "token.revoke", detail={"token": args.id})
    print(f"token {args.id} revoked")
    return cli.EXIT_OK


def cmd_incident_notify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.clock import utcnow
    from gateway.privacy import incident

    config, _key, store = _privacy(args)
    _known_tenant(config, store, args.tenant, active=True)
    routing = cli._policies(config).subprocessors
    terms = routing.tenants.get(args.tenant) if routing is not None else None
    to = args.to or (terms.privacy_contact if terms is not None else None)
    if not to:
        raise CommandError(f"tenant {args.tenant} has no privacy_contact in "
                           "subprocessors.yaml: give --to ADDRESS")
    sender = args.sender or (routing.notice_from if routing is not None else "") \
        or f"postmaster@{config.smtp.hostname}"
    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise CommandError(f"{args.file}: {exc.strerror}") from None
    tenant = config.tenants.get(args.tenant)
    try:
        notice = incident.build(
            tenant=args.tenant, tenant_name=(tenant.name if tenant else "") or args.tenant,
            sender=sender, to=to, text=incident.read_text(data, args.file), title=args.title,
            discovered_at=args.discovered, now=utcnow(), hostname=config.smtp.hostname)
    except incident.NoticeError as exc:
        raise CommandError(str(exc)) from None
    store.queue_notice(notice.message, actor(), "incident.notify", notice.audit_detail())
    print(f"notice {notice.message.id} queued for {to}, {notice.hours:.1f} hours after "
          "discovery; follow it with: queue list --all")
    if notice.hours > incident.PROMISE_HOURS:
        print(f"mailflowr-gateway: warning: this is later than the {incident.PROMISE_HOURS} "
              "hours promised; the audit log records it", file=sys.stderr)
    return cli.EXIT_OK
