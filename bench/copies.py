#!/usr/bin/env python3
"""Accepted messages/s and delivered copies/s end to end, each message with a Cc and a Bcc.

    bench/copies.sh            # starts the sink and the gateway, then runs this
    python bench/copies.py --db sqlite:///bench/var/copies.db -n 3000 -c 20

Sends N messages at concurrency C (one connection per message), then watches the
deliveries table until every copy is sent.  Prints the acceptance rate, the rate
of delivered copies over the whole run, the queue depth over time (a queue
that drains shows the copies keep up), and the latency of each message's copies:
from its arrival (received_at, the moment of the 250) to the record of its last
copy sent (last_attempt_at, written after the relay's 250), p50/p90/p99/max.
With --rate, mail is offered at a fixed rate (open loop), as a steady flow is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import smtp_load
from sqlalchemy import func, select

from gateway.store import database
from gateway.store.models import deliveries, messages


def counts(engine) -> dict[str, int]:
    """Deliveries by state, plus messages not yet processed (the pipeline's backlog)."""
    with engine.connect() as conn:
        result = {s: n for s, n in conn.execute(
            select(deliveries.c.status, func.count()).group_by(deliveries.c.status))}
        result["unprocessed"] = conn.execute(
            select(func.count()).select_from(messages).where(messages.c.status == "received")
        ).scalar_one()
    return result


def signer(spec: str | None):
    """FILE:DOMAIN:SELECTOR -> a function that puts an RSA DKIM signature on a message."""
    if not spec:
        return None
    from gateway import keyfiles
    from gateway.auth.signing import Signer

    path, domain, selector = spec.split(":")
    key = keyfiles.load(Path(path), domain, selector, keyfiles.RSA)
    author = Signer([key], {"author": [domain]})
    return lambda message: author.sign(message, "author").data


def latencies(engine, since: datetime) -> list[float]:
    """Seconds from each message's arrival to the record of its last copy sent."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(messages.c.received_at, func.max(deliveries.c.last_attempt_at))
            .join(deliveries, deliveries.c.message_id == messages.c.id)
            .where(deliveries.c.status == "sent", messages.c.received_at >= since)
            .group_by(messages.c.id)
        ).all()

    def aware(t: datetime) -> datetime:
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    return [(aware(last) - aware(received)).total_seconds() for received, last in rows]


async def main(args: argparse.Namespace) -> None:
    engine = database.create(args.db)
    since = datetime.now(UTC)
    before = counts(engine).get("sent", 0)
    depth: list[tuple[float, int]] = []
    started = time.perf_counter()

    async def watch() -> None:
        while True:
            c = counts(engine)
            depth.append((time.perf_counter() - started,
                          c.get("pending", 0) + 2 * c["unprocessed"]))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    load_args = argparse.Namespace(host="127.0.0.1", port=args.port, messages=args.messages,
                                   concurrency=args.concurrency, size=args.size,
                                   per_connection=1, pid=None, idle=None, rate=args.rate,
                                   sender=args.sender, sign=signer(args.sign_key))
    await smtp_load.load(load_args)
    accepted_at = time.perf_counter() - started
    wanted = before + 2 * args.messages
    deadline = time.perf_counter() + args.timeout
    while time.perf_counter() < deadline:
        c = counts(engine)
        if c.get("sent", 0) >= wanted:
            break
        await asyncio.sleep(0.1)
    done_at = time.perf_counter() - started
    watcher.cancel()
    c = counts(engine)
    sent = c.get("sent", 0) - before
    print(f"accepted      {args.messages} messages in {accepted_at:.2f} s: "
          f"{args.messages / accepted_at:.0f} msgs/s")
    print(f"copies        {sent} of {2 * args.messages} sent in {done_at:.2f} s: "
          f"{sent / done_at:.0f} copies/s end to end "
          f"({sent / 2 / done_at:.0f} messages/s with both copies; "
          f"{100 * (sent / 2 / done_at) / (args.messages / accepted_at):.0f}% of acceptance)")
    c.pop("unprocessed")
    print(f"states        {c}")
    late = latencies(engine, since)
    print(f"latency       250 to the last copy recorded sent, {len(late)} messages: "
          f"p50 {smtp_load.pct(late, 50):.3f} s  p90 {smtp_load.pct(late, 90):.3f} s  "
          f"p99 {smtp_load.pct(late, 99):.3f} s  "
          f"max {max(late, default=0):.3f} s")
    samples = depth[:: max(len(depth) // 12, 1)]
    print("copies waiting (pending + 2 per unprocessed message)")
    print("              " + "  ".join(f"{t:.0f}s:{n}" for t, n in samples))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--db", default="sqlite:///bench/var/copies.db")
    p.add_argument("-n", "--messages", type=int, default=3000)
    p.add_argument("-c", "--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--rate", type=float, help="offered messages per second (open loop)")
    p.add_argument("--sender", default="bench@bench.test", help="envelope sender and From")
    p.add_argument("--sign-key", help="FILE:DOMAIN:SELECTOR: DKIM-sign every message with it")
    asyncio.run(main(p.parse_args()))
