#!/usr/bin/env python3
"""Mailbox import and keep-original APPEND rates against a local Dovecot, with RSS growth.

    PYTHONPATH=. .venv/bin/python bench/imap.py -n 5000          # both
    PYTHONPATH=. .venv/bin/python bench/imap.py -n 5000 --only import

import: a running gateway (SQLite, its own directory) watches an empty folder; N
messages of 4 KiB are put into it at once (maildir files, as a local delivery
agent would); the clock runs from then until all N are stored.  append: a
gateway with keep_original accepts N messages over SMTP (20 sessions) while the
customer's server is down, so N APPEND jobs wait in the queue; the server comes
back, ``queue retry --all`` makes them due, and the clock runs until all are
appended.  RSS: the daemon's peak (VmHWM) minus its RSS when idle before the
load.  Needs Dovecot (Debian package dovecot-imapd) and trustme.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trustme
import yaml
from sqlalchemy import create_engine, func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.store.models import deliveries, messages
from tests.dovecot import Dovecot

ENV = {**os.environ, "BENCH_IMAP_PW": "secret"}


def message(n: int) -> bytes:
    head = (f"Return-Path: <s{n}@sender.test>\r\nFrom: s{n}@sender.test\r\n"
            f"To: support@bench.test\r\nMessage-ID: <bench-{n}@sender.test>\r\n"
            f"Subject: bench {n}\r\n\r\n").encode()
    return head + (b"x" * 76 + b"\r\n") * ((4096 - len(head)) // 78)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]


class Gateway:
    def __init__(self, directory: Path, tenant: dict, account: dict) -> None:
        self.dir = directory
        self.port = free_port()
        self.db = f"sqlite:///{directory / 'gateway.db'}"
        config = {
            "smtp": {"listen": f"127.0.0.1:{self.port}", "hostname": "mx.bench.test",
                     "max_connections_per_ip": 500},
            "database": {"url": self.db}, "metrics": {"listen": None},
            "delivery": {"poll_interval": "0.2s", "concurrency": 20},
            "auth": {"verify_dkim": False, "check_spf": False, "check_arc": False,
                     "check_dmarc": False},
            "imap_accounts": {"customer": account},
            "tenants": {"bench": {"domains": ["bench.test"], "catch_all": True, **tenant}},
        }
        (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
        (directory / "policies").mkdir(exist_ok=True)  # no rules: said, as the gateway wants
        (directory / "policies" / "workflows.yaml").write_text("tenants: {}\n")
        log = open(directory / "gateway.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config",
             str(directory / "gateway.yaml")], stdout=log, stderr=subprocess.STDOUT,
            env=ENV, cwd=directory)
        self.engine = create_engine(self.db)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=2).quit()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2)  # settled: the idle baseline

    def scalar(self, query) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.engine.dispose()


def bench_import(dovecot: Dovecot, n: int, work: Path) -> None:
    user = dovecot.user()
    dovecot.drop(user, "Inbound", [])
    gw = Gateway(work / "import", {"imap_pull": {"box": {
        "account": "customer", "folders": ["Inbound"], "recipient": "support@bench.test",
        "interval": "60s", "after_import": "keep"}}}, dovecot.account(user, password_env=
                                                                      "BENCH_IMAP_PW"))
    try:
        base, _ = rss(gw.proc.pid)
        bodies = [message(i) for i in range(n)]
        started = time.monotonic()
        dovecot.drop(user, "Inbound", bodies)
        count = select(func.count()).select_from(messages).where(messages.c.protocol == "IMAP")
        while gw.scalar(count) < n:
            time.sleep(0.05)
            if time.monotonic() - started > 600:
                raise SystemExit("import: not done in 600 s")
        took = time.monotonic() - started
        _, peak = rss(gw.proc.pid)
        print(f"import: {n} messages in {took:.1f} s = {n / took:.0f} msgs/s; "
              f"RSS idle {base / 1024:.0f} MB, peak {peak / 1024:.0f} MB, "
              f"growth {(peak - base) / 1024:.0f} MB")
    finally:
        gw.stop()


def bench_append(dovecot: Dovecot, n: int, work: Path) -> None:
    """Fill the queue while the customer's server is away, then time the drain."""
    user = dovecot.user()
    dovecot.stop()
    gw = Gateway(work / "append", {"keep_original": {"imap": "customer", "folder": "Kept"}},
                 dovecot.account(user, password_env="BENCH_IMAP_PW", connections=4))
    try:
        base, _ = rss(gw.proc.pid)

        def send(part: range) -> None:
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=60) as s:
                for i in part:
                    s.sendmail(f"s{i}@sender.test", ["support@bench.test"], message(i))

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(send, [range(i, n, 20) for i in range(20)]))
        tried = select(func.count()).select_from(deliveries).where(
            deliveries.c.kind == "append", deliveries.c.attempts > 0)
        while gw.scalar(tried) < n:  # every job has failed once: the queue is full
            time.sleep(0.2)
        dovecot.start()
        subprocess.run([sys.executable, "-m", "gateway", "queue", "retry", "--all", "--config",
                        str(gw.dir / "gateway.yaml")], check=True, env=ENV, cwd=gw.dir,
                       capture_output=True)
        started = time.monotonic()
        sent = select(func.count()).select_from(deliveries).where(
            deliveries.c.kind == "append", deliveries.c.status == "sent")
        while gw.scalar(sent) < n:
            time.sleep(0.05)
            if time.monotonic() - started > 900:
                raise SystemExit("append: not done in 900 s")
        took = time.monotonic() - started
        _, peak = rss(gw.proc.pid)
        print(f"append: {n} originals APPENDed in {took:.1f} s = {n / took:.0f} msgs/s; "
              f"RSS idle {base / 1024:.0f} MB, peak {peak / 1024:.0f} MB, "
              f"growth {(peak - base) / 1024:.0f} MB")
        folder = dovecot.dir / "mail" / user / ".Kept"
        kept = sum(len(list((folder / sub).iterdir())) for sub in ("cur", "new"))
        print(f"append: {kept} messages in the folder")
    finally:
        gw.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--only", choices=["import", "append"])
    args = parser.parse_args()
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    dovecot = Dovecot(binary, trustme.CA()).start()
    work = Path(tempfile.mkdtemp(prefix="mailflowr-bench-imap-"))
    (work / "import").mkdir()
    (work / "append").mkdir()
    try:
        if args.only in (None, "import"):
            bench_import(dovecot, args.n, work)
        if args.only in (None, "append"):
            bench_append(dovecot, args.n, work)
    finally:
        dovecot.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
