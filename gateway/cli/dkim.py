"""``dkim keygen``: a new DKIM signing key and the DNS record to publish."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gateway import keyfiles
from gateway.auth import keys
from gateway.cli.common import EXIT_OK, CommandError, Parser, Subcommands, positive_int


def add_parsers(sub: Subcommands) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="dkim_command", required=True, parser_class=Parser)
    p = dsub.add_parser("keygen", help="write a new private key (mode 0600) and print its "
                                       "DNS record")
    p.add_argument("--domain", required=True, help="the signing domain (d=)")
    p.add_argument("--selector", required=True, help="the selector (s=), e.g. mf2026a")
    p.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    p.add_argument("--bits", type=positive_int, default=2048, help="RSA key size (2048)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write the key (default: DOMAIN.SELECTOR.key here)")
    p.set_defaults(func=cmd_dkim_keygen)


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
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
