"""``keys generate|status|rotate``: encryption at rest, the master key and data keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Parser,
    Progress,
    Subcommands,
    actor,
    config_arg,
    load_config,
    open_store,
    print_json,
)
from gateway.config import GatewayConfig
from gateway.keyfiles import KeyFileError, read_master, write_private
from gateway.store.keystore import KeyStore, master_id, new_master


def add_parsers(sub: Subcommands) -> None:
    keys = sub.add_parser("keys", help="encryption at rest: the master key and data keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
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


def cmd_keys_generate(args: argparse.Namespace) -> int:
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
    return EXIT_OK


def _keystore(config: GatewayConfig) -> KeyStore:
    try:
        master = config.privacy.master_key()
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    if master is None:
        raise CommandError("encryption at rest is off: set privacy.master_key_file or "
                           "privacy.master_key_env")
    return KeyStore(config.privacy.keystore, master)


def cmd_keys_status(args: argparse.Namespace) -> int:
    config = load_config(args)
    try:
        off = config.privacy.master_key() is None
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    if off:  # a state, not an error: said, and exit 0
        if args.json:
            print_json({"encryption": "off", "master": None, "tenants": []})
        else:
            print("encryption at rest is off: originals are stored in clear (set "
                  "privacy.master_key_file or privacy.master_key_env to turn it on)")
        return EXIT_OK
    store = _keystore(config)
    entries = store.describe()
    if args.json:
        print_json({"encryption": "on", "master": store.master_id,
                   "keystore": str(store.directory), "tenants": entries})
        return EXIT_OK
    print(f"master key {store.master_id}, keystore {store.directory}")
    for e in entries:
        if "problem" in e:
            print(f"  {e['tenant']:16} {e['problem']}")
            continue
        state = "ok" if e["master"] == store.master_id else f"wrapped by {e['master']}"
        for k in e["keys"]:
            print(f"  {e['tenant']:16} {k['id']:40} {k['created'][:19]}  {state}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    config = load_config(args)
    store = _keystore(config)
    database = open_store(args, config)  # before the keys change: the audit event needs it
    shown = Progress("keys rotate", "tenants' keys rewrapped")
    try:
        new = read_master(Path(args.new_master_file))
        count = store.rewrap(new, shown)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    finally:
        shown.done()
    database.audit(actor(), "keys.rotate", detail={
        "from": store.master_id, "to": master_id(new), "tenants": count})
    print(f"{count} tenants' data keys now wrapped by master key {master_id(new)}: point "
          f"privacy.master_key_file at {args.new_master_file} and restart every instance")
    return EXIT_OK
