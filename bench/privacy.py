#!/usr/bin/env python3
"""Export throughput and memory for a large tenant; erasure time in a large database.

    python bench/privacy.py export [--messages 100000] [--size 10240]
    python bench/privacy.py erase [--messages 1000000] [--hits 1000]
    (add --backend postgresql --pg-url URL for PostgreSQL)

export: fills a fresh database with --messages processed messages of about
--size bytes for one tenant, runs `mailflowr-gateway export` on it as a child
process and prints the archive's size, the time, MB/s (archive bytes and
original bytes) and the child's peak RSS.  It checks the manifest's count.

erase: fills --messages small messages (1 KiB, three address rows each), of
which --hits have the data subject as sender or in Cc, runs `mailflowr-gateway
erase` for that address and prints the time it took (the whole command,
start-up included, and the erasure as the command measured it), then checks
that exactly the --hits messages are gone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from gateway.store import database  # noqa: E402
from gateway.store.models import message_addresses, message_blobs, messages  # noqa: E402

CHUNK = 20_000
PG_NAME = "mailflowr_bench_privacy"
SUBJECT = "jane.doe@client.example"


def message(i: int, size: int, subject_here: bool) -> tuple[str, bytes]:
    sender = SUBJECT if subject_here and i % 2 == 0 else f"sender{i % 5000}@client.example"
    cc = f"Cc: Jane <{SUBJECT}>\r\n" if subject_here and i % 2 == 1 else ""
    head = (f"From: <{sender}>\r\nTo: support@acme.test\r\n{cc}Subject: message {i}\r\n"
            f"Message-ID: <{i}@client.example>\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
            "\r\n").encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return sender, head + body


def fill(url: str, total: int, size: int, hits: int) -> None:
    engine = database.create(url)
    database.upgrade(engine)
    now = datetime.now(UTC)
    every = total // hits if hits else 0
    started = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, active, created_at) "
                          "VALUES ('acme', 'Acme', true, :now)"), {"now": now})
        conn.commit()
        for start in range(0, total, CHUNK):
            rows, blobs, addresses = [], [], []
            for i in range(start, min(start + CHUNK, total)):
                here = bool(every) and i % every == every // 2
                sender, data = message(i, size, here)
                message_id = f"B{i:025d}"
                rows.append({
                    "id": message_id, "tenant_id": "acme", "status": "processed",
                    "received_at": now - timedelta(seconds=total - i), "mail_from": sender,
                    "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "client_address": "127.0.0.1", "helo": "bench", "protocol": "ESMTP",
                    "trace_header": "", "smtputf8": False, "direction": "inbound",
                    "tags": ["support"], "tag_key": "support", "parse_failed": False,
                    "attempts": 1, "subject": f"message {i}", "header_from": sender,
                    "header_to": "support@acme.test",
                })
                blobs.append({"message_id": message_id, "data": data})
                addresses.append({"message_id": message_id, "role": "mail_from",
                                  "address": sender})
                addresses.append({"message_id": message_id, "role": "rcpt_to",
                                  "address": "support@acme.test"})
                addresses.append({"message_id": message_id,
                                  "role": "cc" if here and i % 2 else "from",
                                  "address": SUBJECT if here and i % 2 else sender})
            conn.execute(insert(messages), rows)
            conn.execute(insert(message_blobs), blobs)
            conn.execute(insert(message_addresses), addresses)
            conn.commit()
            done = min(start + CHUNK, total)
            if done % 200_000 == 0 or done == total:
                print(f"filled        {done}/{total} messages", flush=True)
        if not database.is_sqlite(engine):
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    engine.dispose()
    print(f"filled        in {time.perf_counter() - started:.0f} s", flush=True)


def prepare(args: argparse.Namespace, kind: str) -> tuple[Path, str, Path]:
    work = ROOT / "bench" / "var" / f"privacy-{kind}-{args.backend}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.backend == "sqlite":
        url = f"sqlite:///{work / 'gateway.db'}"
    else:
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{PG_NAME}"'))
        admin.dispose()
        url = make_url(args.pg_url).set(database=PG_NAME).render_as_string(hide_password=False)
    config = work / "gateway.yaml"
    (work / "policies").mkdir(exist_ok=True)  # no rules: said, as the gateway wants
    (work / "policies" / "workflows.yaml").write_text("tenants: {}\n")
    config.write_text(yaml.safe_dump({
        "database": {"url": url},
        "policies": {"directory": str(work / "policies")},
        "privacy": {"key_file": str(work / "privacy.key")},
        "tenants": {"acme": {"domains": ["acme.test"], "addresses": ["support@acme.test"]}},
    }))
    return work, url, config


def run(config: Path, *argv: str) -> tuple[str, float, int]:
    """Run a command; (stdout, seconds, peak RSS in bytes).  The peak is the child's own
    VmHWM, read while it runs (ru_maxrss would count the filled parent it forked from)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", *argv, "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed: {err.decode()}")
    return out.decode(), seconds, peak


def bench_export(args: argparse.Namespace) -> None:
    work, url, config = prepare(args, "export")
    fill(url, args.messages, args.size, 0)
    out = work / "acme.tar"
    stdout, wall, peak = run(config, "export", "--tenant", "acme", "--out", str(out), "--json")
    doc = json.loads(stdout)
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest["counts"]["messages"] == args.messages, manifest["counts"]
    engine = database.create(url)
    with engine.connect() as conn:
        originals = conn.execute(select(func.sum(messages.c.size))).scalar_one()
    engine.dispose()
    print(f"export        {args.messages} messages of ~{args.size} bytes ({args.backend})")
    print(f"archive       {doc['bytes'] / 1e6:.0f} MB ({doc['files']} files) in "
          f"{doc['seconds']:.1f} s ({wall:.1f} s with start-up)")
    print(f"throughput    {doc['bytes'] / 1e6 / doc['seconds']:.0f} MB/s of archive, "
          f"{originals / 1e6 / doc['seconds']:.0f} MB/s of original mail")
    print(f"peak RSS      {peak / 1e6:.0f} MB (the export process)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def bench_erase(args: argparse.Namespace) -> None:
    work, url, config = prepare(args, "erase")
    fill(url, args.messages, 1024, args.hits)
    stdout, wall, _peak = run(config, "erase", "--tenant", "acme", "--subject", SUBJECT,
                              "--json")
    doc = json.loads(stdout)
    engine = database.create(url)
    with engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        blobs = conn.execute(select(func.count()).select_from(message_blobs)).scalar_one()
        mentions = conn.execute(select(func.count()).select_from(message_addresses).where(
            func.lower(message_addresses.c.address) == SUBJECT)).scalar_one()
    engine.dispose()
    assert doc["messages"] == args.hits, doc
    assert (left, blobs, mentions) == (args.messages - args.hits,) * 2 + (0,), (left, blobs)
    print(f"erase         {args.hits} of {args.messages} messages ({args.backend})")
    print(f"time          {doc['seconds']:.2f} s erasing ({wall:.2f} s for the whole command)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["export", "erase"])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--messages", type=int)
    parser.add_argument("--size", type=int, default=10_240, help="export: message size")
    parser.add_argument("--hits", type=int, default=1000, help="erase: messages of the subject")
    parser.add_argument("--keep", action="store_true", help="keep bench/var/privacy-*")
    args = parser.parse_args()
    if args.what == "export":
        args.messages = args.messages or 100_000
        bench_export(args)
    else:
        args.messages = args.messages or 1_000_000
        bench_erase(args)


if __name__ == "__main__":
    main()
