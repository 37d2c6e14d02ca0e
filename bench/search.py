"""Full-text search at scale: the cost of indexing, the size of the index per message,
and how long queries over one tenant's mail take, on SQLite or PostgreSQL.

Loads N synthetic processed messages (a subject of 6 words and a body of --words words
from a Zipf-distributed vocabulary of 30,000 words, 2,000 senders, a tenant tag on one
in ten, an attachment name on one in five) for the tenant ``bench``, and N/10 for the
tenant ``other``, indexing them in batches of 500 as the pipeline does; then runs each
kind of query 30 times with different words through ``Store.search`` (page 1, 20 results,
snippets included) and prints p50 and p95.

    .venv/bin/python bench/search.py --messages 100000
    .venv/bin/python bench/search.py --messages 100000 \\
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from gateway import query
from gateway.store import database, search
from gateway.store.ids import new_id
from gateway.store.models import messages
from gateway.store.repository import Store

PG_NAME = "mailflowr_search_bench"
BATCH = 500


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 10))))
    return sorted(words)


def _engine(args: argparse.Namespace, work: Path) -> tuple[Any, bool]:
    """The database, and whether it holds the messages already (--keep: a whole load,
    marked at its end, not one a failure cut short)."""
    if not args.postgres:
        path = (Path(args.keep) / f"search-{args.messages}.db") if args.keep \
            else work / "search.db"
        engine = database.create(f"sqlite:///{path}")
        if _loaded(engine):
            return engine, True
        engine.dispose()
        path.unlink(missing_ok=True)
        return database.create(f"sqlite:///{path}"), False
    name = f"{PG_NAME}_{args.messages}" if args.keep else PG_NAME
    url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                              {"n": name}).first() is not None
    if exists and args.keep:
        engine = database.create(url)
        if _loaded(engine):
            admin.dispose()
            return engine, True
        engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return database.create(url), False


def _loaded(engine: Any) -> bool:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM bench_loaded")).scalar_one() > 0
    except Exception:  # no such table: never loaded whole
        return False


def _mark_loaded(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE bench_loaded (at TEXT)"))
        conn.execute(text("INSERT INTO bench_loaded VALUES ('loaded')"))


def load(store: Store, tenant: str, count: int, vocab: list[str], weights: list[float],
         rng: random.Random, body_words: int) -> tuple[float, float]:
    """Messages stored and indexed: (seconds in the index's statements, seconds in all)."""
    senders = [f"{rng.choice(vocab)}.{rng.choice(vocab)}@{rng.choice(vocab)}.example"
               for _ in range(2000)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    indexing = total = 0.0
    for first in range(0, count, BATCH):
        rows, docs = [], []
        for n in range(first, min(count, first + BATCH)):
            subject = " ".join(rng.choices(vocab, cum_weights=weights, k=6))
            body = " ".join(rng.choices(vocab, cum_weights=weights, k=body_words))
            sender = rng.choice(senders)
            tags = ["invoice"] if n % 10 == 0 else []
            attachment = [{"filename": f"{rng.choice(vocab)}.pdf"}] if n % 5 == 0 else []
            message_id = new_id()
            rows.append({
                "id": message_id, "tenant_id": tenant, "status": "processed",
                "received_at": start + timedelta(seconds=n * 30), "mail_from": sender,
                "size": len(body) + 400, "sha256": "0" * 64, "client_address": "127.0.0.1",
                "helo": "bench", "protocol": "ESMTP", "trace_header": "", "smtputf8": False,
                "direction": "inbound", "subject": subject, "header_from": sender,
                "header_to": f"support@{tenant}.test", "tags": tags, "tag_key": ",".join(tags),
                "attachments": attachment, "parse_failed": False, "attempts": 0})
            docs.append(search.fields(tenant, message_id, sender, f"support@{tenant}.test",
                                      None, subject, body, attachment,
                                      [("mail_from", sender),
                                       ("rcpt_to", f"support@{tenant}.test")], tags))
        began = time.perf_counter()
        with store.writing() as conn:
            conn.execute(insert(messages), rows)
            indexed = time.perf_counter()
            search.index(conn, docs)
            indexing += time.perf_counter() - indexed
        total += time.perf_counter() - began
    return indexing, total


def index_bytes(store: Store) -> int:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            return sum(int(conn.execute(text(f"SELECT coalesce(sum(length({c})), 0) FROM {t}"))
                           .scalar_one())
                       for t, c in (("message_search_data", "block"),
                                    ("message_search_idx", "term"),
                                    ("message_search_docsize", "sz"),
                                    ("message_search_content",
                                     "c0 || c1 || c2 || c3 || c4 || c5 || c6")))
        return int(conn.execute(text("SELECT pg_total_relation_size('message_search')"))
                   .scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=300, help="words of a body (300)")
    parser.add_argument("--postgres", help="a PostgreSQL URL (a database is made there)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--keep", metavar="DIR", help="keep the loaded database (SQLite: in "
                        "DIR; PostgreSQL: a database named by the count) and query it again "
                        "on the next run with the same --messages, without loading")
    parser.add_argument("--only", action="append", metavar="KIND",
                        help="run only this kind of query (again for more)")
    args = parser.parse_args()
    rng = random.Random(20261207)
    vocab = _vocabulary(rng, 30_000)
    # Zipf: a few words common, most rare (cumulative, as random.choices takes them)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocab))))
    with tempfile.TemporaryDirectory() as folder:
        engine, loaded = _engine(args, Path(folder))
        began = time.perf_counter()
        before, after = database.upgrade(engine)
        if loaded and before != after:  # a kept database of an earlier build
            print(f"  schema upgraded from {before} to {after} in "
                  f"{time.perf_counter() - began:.1f} s")
        store = Store(engine)
        began, completed = time.perf_counter(), 0
        while done := store.backfill(500):  # what messages reindex does after it
            completed += done
        if completed:
            print(f"  {completed:,} entries completed (messages reindex) in "
                  f"{time.perf_counter() - began:.1f} s")
        print(f"{engine.dialect.name}: {args.messages:,} messages of tenant bench "
              f"(+{args.messages // 10:,} of another), {args.words} words of body each")
        if not loaded:
            store.sync_tenants({"bench": "Bench", "other": "Other"})
            indexing, total = load(store, "bench", args.messages, vocab, weights, rng,
                                   args.words)
            load(store, "other", args.messages // 10, vocab, weights, rng, args.words)
            if engine.dialect.name == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.execute(text("VACUUM ANALYZE message_search"))
                    c.execute(text("VACUUM ANALYZE messages"))
            print(f"  indexing: {indexing / args.messages * 1000:.2f} ms a message "
                  f"({indexing / total:.0%} of the store-and-index transaction)")
            _mark_loaded(engine)
        size = index_bytes(store)
        print(f"  index: {size / (args.messages * 1.1) / 1024:.2f} KiB a message")
        common, middling, rare = vocab[:50], vocab[200:2000], vocab[10_000:]
        rng = random.Random(7)  # the same queries whether loaded now or kept
        kinds = {
            "rare word": lambda: rng.choice(rare),
            "common word": lambda: rng.choice(common),
            "two words": lambda: f"{rng.choice(middling)} {rng.choice(middling)}",
            "phrase": lambda: f'"{rng.choice(common)} {rng.choice(common)}"',
            "prefix": lambda: rng.choice(middling)[:3] + "*",
            "subject: word": lambda: f"subject:{rng.choice(middling)}",
            "tag + word": lambda: f"tag:invoice {rng.choice(middling)}",
            "has:attachment + word": lambda: f"has:attachment {rng.choice(middling)}",
        }
        for name, make in kinds.items():
            if args.only and name not in args.only:
                continue
            times, hits = [], []
            for _ in range(args.runs):
                asked = query.parse(make())
                began = time.perf_counter()
                found = store.search("bench", asked, 20)
                times.append(time.perf_counter() - began)
                hits.append(len(found))
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            print(f"  {name:24} p50 {statistics.median(times) * 1000:7.1f} ms   "
                  f"p95 {p95 * 1000:7.1f} ms   results a page {statistics.mean(hits):5.1f}")
        engine.dispose()


if __name__ == "__main__":
    main()
