#!/usr/bin/env python3
"""Two instances on one PostgreSQL, one killed with SIGKILL mid-run: copies sent twice.

    .venv/bin/python bench/kill.py                      # 5 runs, 3,000 msgs at 100/s
    .venv/bin/python bench/kill.py --runs 3 --lease 30s --restart 2

Each run starts from an empty database: two daemons (bench/gateway-copies.yaml, every
message with a Cc and a Bcc copy) relay to an aiosmtpd sink in a process of its own,
which answers every copy 250 and writes down each (Message-ID, recipient) it took.
Mail is offered at --rate msgs/s (one connection per message, sessions alternating
between the two daemons; a message refused or cut is offered to the next one).  When
a third is acknowledged (with --kill-holding: then as soon as it holds copies; with
--kill-after-copy MS: then MS ms after the sink took a copy), one
daemon and its delivery process are killed (SIGKILL to its process group: a machine
gone, nothing flushed); it starts again --restart seconds later (negative: never).
Once nothing is pending, prints per run: messages answered 250, connections refused
or cut, messages stored twice (the client sent them again: committed, the 250 lost
with the connection, as RFC 1047 describes), missing copies (must be 0), copies sent
twice, when the sink took those first (from the kill), how many copies the dead one
held and by when all were sent (the takeover), and the survivor's time from a relay's
reply to the durable record of its result (mailflowr_gateway_delivery_unrecorded_seconds),
and how many of the copies it held its journal lists as sent (a restart records those).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from aiosmtpd.controller import Controller
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = str(ROOT / ".venv/bin/mailflowr-gateway")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handler:
    """Appends "Message-ID recipient monotonic-time" per copy to a file, before its 250."""

    def __init__(self, path: Path) -> None:
        self.out = open(path, "a", buffering=1)

    async def handle_DATA(self, server, session, envelope):
        mid = ""
        for line in envelope.original_content.split(b"\r\n"):
            if not line:
                break
            if line.lower().startswith(b"message-id:"):
                mid = line[11:].strip().decode()
        now = time.monotonic()
        for rcpt in envelope.rcpt_tos:
            self.out.write(f"{mid} {rcpt} {now}\n")
        return "250 2.0.0 Ok: stored"


def sink(port: int, path: Path, ready: Any) -> None:
    """The downstream server, in a process of its own: in the benchmark's process its
    250 would wait for the load's threads to let go of the GIL, and a copy taken but
    not yet answered when the gateway dies is counted as sent twice."""
    Controller(Handler(path), hostname="127.0.0.1", port=port, ready_timeout=10).start()
    ready.set()
    signal.pause()


def received(path: Path) -> list[tuple[str, str, float]]:
    copies = []
    for line in path.read_text().splitlines():
        mid, rcpt, when = line.split(" ")
        copies.append((mid, rcpt, float(when)))
    return copies


class Instance:
    def __init__(self, config: Path, port: int, metrics: int, log: Path) -> None:
        self.config, self.port, self.metrics, self.log = config, port, metrics, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "MAILFLOWR_SMTP__LISTEN": f"127.0.0.1:{self.port}",
               "MAILFLOWR_METRICS__LISTEN": f"127.0.0.1:{self.metrics}"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([GATEWAY, "serve", "--config", str(self.config)],
                                         env=env, stdout=out, stderr=out, cwd=ROOT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the daemon on {self.port} did not start: see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def pids(self) -> list[int]:
        """The daemon's process and its children."""
        assert self.proc is not None
        children = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        return [self.proc.pid, *map(int, children)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def unrecorded(self) -> dict[float, float]:
        """The histogram's cumulative bucket counts by upper bound, and under 0 its sum."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        buckets = {}
        for line in body.splitlines():
            if line.startswith("mailflowr_gateway_delivery_unrecorded_seconds_bucket"):
                bound = line.split('le="')[1].split('"')[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("mailflowr_gateway_delivery_unrecorded_seconds_sum"):
                buckets[0.0] = float(line.rsplit(" ", 1)[1])  # the sum, under bound 0
        return buckets


def quantile(buckets: dict[float, float], q: float) -> str:
    """The bucket bound below which a share ``q`` of the observations falls."""
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return "-"
    for bound in sorted(buckets)[1:]:
        if buckets[bound] >= q * total:
            return f"<= {bound * 1000:g} ms" if bound != float("inf") else "> 5 s"
    return "-"


def offer(ports: list[int], count: int, rate: float, sessions: int, acked: list[str],
          retried: list[str], stop: threading.Event) -> None:
    """``count`` messages at ``rate``/s from ``sessions`` threads, one connection each;
    a message refused or cut is offered again to the next daemon (as a client would)."""
    start = time.monotonic()
    body = ("X" * 70 + "\r\n") * 40

    def client(n: int) -> None:
        turn = n
        for k in range(n, count, sessions):
            due = start + k / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            mid = f"<kill-{k}@sender.test>"
            message = (f"From: a@sender.test\r\nTo: b@bench.test\r\nSubject: {k}\r\n"
                       f"Message-ID: {mid}\r\n\r\n{body}\r\n")
            while not stop.is_set():
                port = ports[turn % len(ports)]
                turn += 1
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                        smtp.sendmail("a@sender.test", ["b@bench.test"], message)
                    acked.append(mid)
                    break
                except (OSError, smtplib.SMTPException):
                    retried.append(mid)
                    time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run(args: argparse.Namespace, number: int, work: Path) -> str:
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    db = "mailflowr_bench_kill"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    admin.dispose()
    url = make_url(args.postgres).set(database=db)
    sink_port, sink_file = free_port(), work / f"sink-{number}.txt"
    sink_file.unlink(missing_ok=True)  # a kept --work folder: this run's copies only
    ready = multiprocessing.get_context("fork").Event()
    server = multiprocessing.get_context("fork").Process(
        target=sink, args=(sink_port, sink_file, ready), daemon=True)
    server.start()
    ready.wait(10)
    config = yaml.safe_load((ROOT / "bench/gateway-copies.yaml").read_text())
    config["database"]["url"] = url.render_as_string(hide_password=False)
    config["delivery"].update(relay=f"127.0.0.1:{sink_port}", lease_time=args.lease)
    config["pipeline"] = {"lease_time": args.lease}
    config["policies"]["directory"] = str(ROOT / "bench/policies")
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([GATEWAY, "db", "upgrade", "--config", str(work / "gateway.yaml")],
                   check=True, cwd=ROOT, capture_output=True)
    instances = [Instance(work / "gateway.yaml", free_port(), free_port(),
                          work / f"gateway-{number}-{i}.log") for i in range(2)]
    for instance in instances:
        instance.start()
    survivor, victim = instances
    acked: list[str] = []
    retried: list[str] = []
    stop = threading.Event()
    load = threading.Thread(target=offer, args=([i.port for i in instances], args.messages,
                                                args.rate, args.sessions, acked, retried, stop))
    load.start()
    while len(acked) < args.messages // 3 and load.is_alive():
        time.sleep(0.01)
    engine = create_engine(url)
    holding = text(  # what the victim holds: lease owners are host:pid
        "SELECT id FROM deliveries WHERE lease_owner IS NOT NULL"
        " AND lease_until > now() AND status = 'pending'"
        " AND split_part(lease_owner, ':', 2)::int NOT IN (SELECT unnest(:pids))")
    deadline = time.monotonic() + 5
    while args.kill_holding and time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(holding, {"pids": survivor.pids()}).first():
                break
    if args.kill_after_copy is not None:  # the moment a copy was taken, plus MS
        size = sink_file.stat().st_size
        deadline = time.monotonic() + 5
        while sink_file.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(args.kill_after_copy / 1000)
    killed = time.monotonic()  # the signal, not the end of the dying
    victim.kill()
    with engine.connect() as conn:
        held = list(conn.execute(holding, {"pids": survivor.pids()}).scalars())
        killed_at = conn.execute(text("SELECT now()")).scalar_one()
    # of those, the copies the dead one had sent: written down in its journal
    from gateway.delivery.journal import left_behind
    alive = set(survivor.pids())
    journaled = {i for ids, _ in left_behind(work / "var" / "journal",
                                             socket.gethostname()[:40],
                                             alive.__contains__).values() for i in ids}
    if args.restart >= 0:
        time.sleep(args.restart)
        victim.start()
    load.join()
    pending = text("SELECT (SELECT count(*) FROM messages WHERE status = 'received')"
                   " + (SELECT count(*) FROM deliveries WHERE status != 'sent')")
    deadline = time.monotonic() + args.lease_seconds + 120
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(pending).scalar_one() == 0:
                break
        time.sleep(0.2)
    time.sleep(1)
    with engine.connect() as conn:
        taken = conn.execute(text("SELECT max(last_attempt_at) FROM deliveries"
                                  " WHERE id = ANY(:ids)"), {"ids": held}).scalar_one()
        stored = conn.execute(text(
            "SELECT count(*), count(DISTINCT message_id) FROM messages")).one()
        twice = set(conn.execute(text(
            "SELECT message_id FROM messages GROUP BY message_id HAVING count(*) > 1"
        )).scalars())
        left = conn.execute(pending).scalar_one()
    engine.dispose()
    buckets = survivor.unrecorded()
    journal = len(journaled & set(held))  # the restart records them, not sent again
    for instance in instances:
        instance.stop()
    server.terminate()
    server.join()
    copies = received(sink_file)
    seen = collections.Counter((mid, rcpt) for mid, rcpt, _ in copies)
    wanted = {(mid, rcpt) for mid in acked for rcpt in ("cc-copy@bench.test",
                                                         "bcc-copy@bench.test")}
    missing = len(wanted - set(seen))
    # copies of a message the client sent twice (cut before its 250) go out twice, rightly
    copies_twice = sum(n - 1 for (mid, _), n in seen.items() if mid not in twice)
    first: dict[tuple[str, str], float] = {}
    again, before = [], []
    for mid, rcpt, when in copies:
        if (mid, rcpt) in first and mid not in twice:
            again.append(when - killed)
            before.append((first[(mid, rcpt)] - killed) * 1000)
        first.setdefault((mid, rcpt), when)
    resent = f"{min(again):.1f} s" if again else "-"
    if before:  # when the sink took the first of each copy sent twice, around the kill
        resent += f" (first taken {min(before):+.0f} to {max(before):+.0f} ms from the kill)"
    takeover = f"+{(taken - killed_at).total_seconds():.1f} s" if taken else "-"
    total = buckets.get(float("inf"), 0.0)
    mean = f"{buckets[0.0] / total * 1000:.1f} ms" if total else "-"
    return (f"run {number}: acked {len(acked)}, connections refused or cut {len(retried)}, "
            f"stored {stored[0]} ({stored[0] - stored[1]} twice: committed, the 250 lost with "
            f"the connection), missing copies {missing}, pending {left}, "
            f"copies sent twice {copies_twice}, "
            f"first resent at +{resent}; the dead one held {len(held)} copies, all sent "
            f"by {takeover}, {journal} of them in its journal (sent, not recorded); "
            f"survivor's reply-to-record mean {mean}, p50 {quantile(buckets, 0.5)}, "
            f"p99 {quantile(buckets, 0.99)}, of {int(total)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--lease", default="5s")
    parser.add_argument("--restart", type=float, default=1.0,
                        help="seconds before the killed daemon starts again (<0: never)")
    parser.add_argument("--kill-holding", action="store_true",
                        help="kill when the daemon holds copies (waits up to 5 s)")
    parser.add_argument("--kill-after-copy", type=float, metavar="MS",
                        help="kill MS ms after the sink took a copy (in the window between "
                        "a relay's reply and its record)")
    parser.add_argument("--work", type=Path, metavar="DIR",
                        help="keep the daemons' logs and the sink's records here")
    parser.add_argument("--postgres",
                        default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    from gateway.config.values import parse_duration
    args.lease_seconds = float(parse_duration(args.lease))
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        for number in range(1, args.runs + 1):
            print(run(args, number, work), flush=True)


if __name__ == "__main__":
    main()
