#!/usr/bin/env python3
"""Time a retention sweep of 100,000 of 1,000,000 stored messages, under SMTP load.

    python bench/retention_sweep.py --backend sqlite
    python bench/retention_sweep.py --backend postgresql \\
        --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Fills a fresh database with --messages messages (--expired of them three
years old and tagged support, kept 2 years; the rest recent), starts the
gateway on it with the retention sweeper due --sweep-after seconds after
start, and loads it with --concurrency SMTP sessions of --size bytes from
before the sweep until after it.  Prints the time the sweep took (from the
daemon's log), the acceptance rate before and during the sweep, and checks
that exactly the expired messages are gone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from smtp_load import make_message, session  # noqa: E402

from gateway.store import database  # noqa: E402
from gateway.store.models import message_addresses, message_blobs, messages  # noqa: E402

CHUNK = 20_000
PG_NAME = "mailflowr_bench_sweep"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, total: int, expired: int, size: int) -> None:
    engine = database.create(url)
    database.upgrade(engine)
    now = datetime.now(UTC)
    old = now - timedelta(days=3 * 365)
    body = b"x" * size
    sqlite = database.is_sqlite(engine)
    started = time.perf_counter()
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, active, created_at) "
                          "VALUES ('acme', 'Acme', true, :now)"), {"now": now})
        conn.commit()
        for start in range(0, total, CHUNK):
            rows, blobs, addresses = [], [], []
            for i in range(start, min(start + CHUNK, total)):
                is_old = i < expired
                message_id = f"B{i:025d}"
                rows.append({
                    "id": message_id, "tenant_id": "acme", "status": "processed",
                    "received_at": (old if is_old else now) - timedelta(seconds=i % 86400),
                    "mail_from": f"sender{i % 5000}@client.example", "size": size,
                    "sha256": "0" * 64, "client_address": "127.0.0.1", "helo": "bench",
                    "protocol": "ESMTP", "trace_header": "", "smtputf8": False,
                    "direction": "inbound", "tags": ["support"], "tag_key": "support",
                    "parse_failed": False, "attempts": 1,
                })
                blobs.append({"message_id": message_id, "data": body})
                addresses.append({"message_id": message_id, "role": "mail_from",
                                  "address": rows[-1]["mail_from"]})
                addresses.append({"message_id": message_id, "role": "rcpt_to",
                                  "address": "support@acme.test"})
            conn.execute(insert(messages), rows)
            conn.execute(insert(message_blobs), blobs)
            conn.execute(insert(message_addresses), addresses)
            conn.commit()
            done = min(start + CHUNK, total)
            if done % 200_000 == 0 or done == total:
                print(f"filled        {done}/{total} messages", flush=True)
        if not sqlite:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    engine.dispose()
    print(f"filled        in {time.perf_counter() - started:.0f} s")


def count(url: str) -> tuple[int, int]:
    engine = database.create(url)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        bench = conn.execute(select(func.count()).select_from(messages)
                             .where(messages.c.id.like("B%"))).scalar_one()
    engine.dispose()
    return total, bench


async def load_until(port: int, size: int, concurrency: int, stop: asyncio.Event,
                     stamps: list[float]) -> None:
    n = 0

    async def worker() -> None:
        nonlocal n
        while not stop.is_set():
            n += 1
            dot: list[float] = []
            try:
                ok = await session("127.0.0.1", port, [make_message(size, n)], dot, [])
            except (OSError, ConnectionError):
                await asyncio.sleep(0.05)
                continue
            if ok:
                stamps.append(time.time())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def log_time(line: str) -> float:
    m = LOG_TIME.match(line)
    assert m, line
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def start_gateway(args: argparse.Namespace) -> tuple[Path, str, int, subprocess.Popen[bytes]]:
    """A fresh database filled with old and new messages, and the daemon serving it."""
    work = ROOT / "bench" / "var" / f"retention-{args.backend}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "policies").mkdir(parents=True)
    if args.backend == "sqlite":
        url = f"sqlite:///{work / 'gateway.db'}"
    else:
        with create_engine(args.pg_url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{PG_NAME}"'))
        url = make_url(args.pg_url).set(database=PG_NAME).render_as_string(hide_password=False)
    fill(url, args.messages, args.expired, args.blob_size)
    (work / "policies" / "retention.yaml").write_text("default: 1y\ntags:\n  support: 2y\n")
    port = free_port()
    config = {
        "smtp": {"listen": f"127.0.0.1:{port}", "max_connections": 1000,
                 "max_connections_per_ip": 1000},
        "database": {"url": url},
        "metrics": {"listen": None},
        "logging": {"level": "INFO"},
        "policies": {"directory": str(work / "policies")},
        "retention": {"sweep_interval": f"{args.sweep_after}s"},
        # smtp_load sends to sink@bench.test
        "tenants": {"acme": {"name": "Acme", "domains": ["bench.test"], "catch_all": True}},
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    with open(work / "gateway.log", "wb") as log:
        daemon = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "mailflowr-gateway"), "serve", "--config",
             str(work / "gateway.yaml")], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.1)
    return work, url, port, daemon


async def measure(args: argparse.Namespace, port: int,
                  log_path: Path) -> tuple[list[float], float, str | None]:
    """Load the gateway from now until 3 s after its first sweep has finished."""
    stamps: list[float] = []
    stop = asyncio.Event()
    loader = asyncio.create_task(load_until(port, args.size, args.concurrency, stop, stamps))
    load_started = time.time()
    deadline = time.monotonic() + args.sweep_after + 600
    finished = None
    while time.monotonic() < deadline and finished is None:
        await asyncio.sleep(0.5)
        lines = await asyncio.to_thread(log_path.read_text)
        finished = next((line for line in lines.splitlines()
                         if "retention sweep (policy" in line), None)
    await asyncio.sleep(3)
    stop.set()
    await loader
    return stamps, load_started, finished


def run(args: argparse.Namespace) -> None:
    work, url, port, daemon = start_gateway(args)
    log_path = work / "gateway.log"
    try:
        stamps, load_started, finished = asyncio.run(measure(args, port, log_path))
    finally:
        daemon.terminate()
        daemon.wait(60)
    if finished is None:
        sys.exit(f"no sweep finished; see {log_path}")
    lines = log_path.read_text().splitlines()
    began = log_time(next(line for line in lines if "retention sweep started" in line))
    ended = log_time(finished)
    warm = load_started + 3  # leave out connection set-up
    before = [t for t in stamps if warm <= t < began]
    during = [t for t in stamps if began <= t <= ended]
    rate_before = len(before) / max(began - warm, 1e-9)
    rate_during = len(during) / max(ended - began, 1e-9)
    total, left = count(url)
    print(f"backend       {args.backend}  {args.messages} stored, {args.expired} expired, "
          f"blob {args.blob_size} B")
    print(f"sweep         {ended - began:.1f} s  ({finished.split(': ', 1)[1]})")
    print(f"acceptance    {rate_before:.0f} msgs/s before the sweep ({len(before)} in "
          f"{began - warm:.1f} s), {rate_during:.0f} msgs/s during it "
          f"({rate_during / rate_before * 100:.0f}%)  size {args.size} B, "
          f"concurrency {args.concurrency}")
    print(f"check         {left} of the filled messages left "
          f"(expected {args.messages - args.expired}), {total - left} accepted ones stored "
          f"of {len(stamps)} answered 250")
    if args.backend == "postgresql":
        with create_engine(args.pg_url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)'))
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    p.add_argument("--pg-url", default=os.environ.get(
        "MAILFLOWR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--expired", type=int, default=100_000)
    p.add_argument("--blob-size", type=int, default=1024, help="bytes of each stored message")
    p.add_argument("--size", type=int, default=4096, help="bytes of each message sent")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--sweep-after", type=float, default=20.0,
                   help="seconds from start to the first sweep (the baseline load runs then)")
    p.add_argument("--keep", action="store_true", help="keep the SQLite files")
    run(p.parse_args())


if __name__ == "__main__":
    main()
