"""``status``: what the running daemon is doing, asked over its metrics port."""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any

from gateway.cli.common import (
    EXIT_OK,
    CommandError,
    Subcommands,
    config_arg,
    load_config,
    print_json,
    printable,
)
from gateway.config import GatewayConfig, parse_hostport


def add_parsers(sub: Subcommands) -> None:
    p = sub.add_parser("status", help="what the running daemon is doing (from its metrics port)")
    config_arg(p)
    p.add_argument("--url", metavar="URL",
                   help="the daemon's metrics port (default: http://metrics.listen)")
    p.add_argument("--json", action="store_true", help="the status document as JSON")
    p.set_defaults(func=cmd_status)


LARGEST = 1_000_000  # a status document is a few KiB


def ask_daemon(config: GatewayConfig | None, url: str | None = None,
               timeout: float = 10) -> dict[str, Any]:
    """The running daemon's status document, from its metrics port (``url``, or
    metrics.listen); CommandError saying why when none answers."""
    if not url:
        assert config is not None
        listen = config.metrics.listen
        if not listen:
            raise CommandError("metrics.listen is empty, so the daemon serves no status; "
                               "give --url")
        host, port = parse_hostport(listen)
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    # never through a proxy (the daemon is ours, mostly on loopback), and the whole
    # answer within ``timeout``, not each read: a port where something else trickles
    # bytes must not hold a command
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    try:
        with opener.open(url.rstrip("/") + "/status", timeout=timeout) as reply:
            body = b""
            while len(body) < LARGEST and time.monotonic() < deadline:
                chunk = reply.read1(65536)
                if not chunk:
                    break
                body += chunk
            else:
                raise ValueError("the answer is too large or too slow")
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise ValueError("not a status document")
    except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
        reason = printable(getattr(exc, "reason", exc), 200)  # maybe what another server said
        raise CommandError(f"no daemon answers at {url}: {reason}") from None
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    try:
        doc = ask_daemon(None if args.url else load_config(args), args.url)
    except CommandError as exc:
        raise CommandError(f"{args.config}: {exc}" if "metrics.listen" in str(exc)
                           else str(exc)) from None
    if args.json:
        print_json(doc, sort_keys=True)
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
    for what in doc.get("degraded", []):
        print(f"  DEGRADED    {what}")
    pipeline = doc["pipeline"]
    print(f"  pipeline    {pipeline['waiting']} to process, oldest "
          f"{pipeline['oldest_seconds']} s")
    d = doc["deliveries"]
    print(f"  deliveries  {d['pending']} pending (oldest {d['oldest_pending_seconds']} s), "
          f"{d['held']} held")
    print(f"  retention   last sweep {doc['retention']['last_sweep'] or 'not yet'}")
    return EXIT_OK
