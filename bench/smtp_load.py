#!/usr/bin/env python3
"""Load an SMTP server on loopback and print messages/s, latency and the server's RSS.

    python bench/smtp_load.py --port 2525 -n 3000 -c 20 --size 4096
    python bench/smtp_load.py --port 2525 --idle 1000      # RSS with 1,000 idle connections

One connection per message (like Postfix's smtp-source without -m reuse), unless
--per-connection N.  Latency is measured from the final dot to the 250 (the time the
server takes to store the message durably) and for the whole session.  The server's
RSS is sampled from /proc every 20 ms (the process listening on the port and its
children); the peak is printed.  With --idle, each of those processes is listed with
its RSS and PSS (the PSS column adds up to the memory the whole server holds; summed
RSS counts shared libraries once per process).  Only 127.0.0.1/::1 targets are allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def listener_pid(port: int) -> int | None:
    """The pid that owns the listening socket on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss_kib(root: int) -> int:
    """RSS of ``root`` and its descendants, in KiB (shared pages counted in each)."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += process_rss_kib(pid)
        except OSError:
            continue
    return total


def memory_kib(pid: int) -> tuple[str, int, int]:
    """Name, RSS and PSS (shared pages divided among the processes sharing them)."""
    with open(f"/proc/{pid}/comm") as f:
        name = f.read().strip()
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return name, rss, pss


def process_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RSSSampler:
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak_tree = 0
        self.peak_main = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        assert self.pid is not None
        while True:
            try:
                self.peak_tree = max(self.peak_tree, tree_rss_kib(self.pid))
                self.peak_main = max(self.peak_main, process_rss_kib(self.pid))
            except OSError:
                return
            await asyncio.sleep(0.02)

    def start(self) -> None:
        if self.pid is not None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def make_message(size: int, n: int, sender: str = "bench@bench.test") -> bytes:
    head = (f"From: {sender}\r\nTo: sink@bench.test\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{n}.{time.time_ns()}@bench.test>\r\n\r\n").encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    body = (line * (max(size - len(head), 0) // len(line) + 1))[: max(size - len(head), 2)]
    if not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n"
    return head + body


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def session(host: str, port: int, messages: list[bytes], dot_lat: list[float],
                  sess_lat: list[float], sender: str = "bench@bench.test") -> int:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        await reply(reader)
        writer.write(b"EHLO bench.test\r\n")
        await reply(reader)
        for msg in messages:
            writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<sink@bench.test>\r\nDATA\r\n"
                         .encode())
            for _ in range(3):
                await reply(reader)
            writer.write(msg)
            t = time.perf_counter()
            writer.write(b".\r\n")
            r = await reply(reader)
            dot_lat.append(time.perf_counter() - t)
            if r.startswith(b"250"):
                ok += 1
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    sess_lat.append(time.perf_counter() - started)
    return ok


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def load(args: argparse.Namespace) -> None:
    per = args.per_connection
    sessions_needed = (args.messages + per - 1) // per
    queue: asyncio.Queue[list[bytes]] = asyncio.Queue()
    sender = getattr(args, "sender", None) or "bench@bench.test"
    sign = getattr(args, "sign", None)  # bytes -> bytes: e.g. a DKIM signature on top
    n = 0
    for _ in range(sessions_needed):
        batch = []
        for _ in range(min(per, args.messages - n)):
            message = make_message(args.size, n, sender)
            batch.append(sign(message) if sign else message)
            n += 1
        queue.put_nowait(batch)
    dot_lat: list[float] = []
    sess_lat: list[float] = []
    accepted = 0
    failures = 0

    pace = 1.0 / args.rate if getattr(args, "rate", None) else 0.0
    next_start = time.perf_counter()
    pacing = asyncio.Lock()

    async def worker() -> None:
        nonlocal accepted, failures, next_start
        while not queue.empty():
            batch = queue.get_nowait()
            if pace:  # open loop: sessions start at a fixed rate, whatever the server does
                async with pacing:
                    wait = next_start - time.perf_counter()
                    next_start = max(next_start, time.perf_counter() - 1.0) + pace
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                ok = await session(args.host, args.port, batch, dot_lat, sess_lat, sender)
            except (OSError, ConnectionError):
                failures += 1
            else:
                accepted += ok  # not `+= await`: that reads the total before the await

    sampler = RSSSampler(args.pid or listener_pid(args.port))
    sampler.start()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    await sampler.stop()
    print(f"target        {args.host}:{args.port}  size {args.size} B  concurrency "
          f"{args.concurrency}  messages {args.messages}  per connection {per}"
          + (f"  offered {args.rate:g}/s" if getattr(args, "rate", None) else ""))
    print(f"accepted      {accepted} ({failures} sessions failed) in {wall:.2f} s")
    print(f"rate          {accepted / wall:.0f} msgs/s")
    print(f"dot->250      p50 {pct(dot_lat, 50) * 1000:.1f} ms  p99 "
          f"{pct(dot_lat, 99) * 1000:.1f} ms  max {max(dot_lat, default=0) * 1000:.1f} ms")
    print(f"session       p50 {pct(sess_lat, 50) * 1000:.1f} ms  p99 "
          f"{pct(sess_lat, 99) * 1000:.1f} ms")
    if sampler.pid:
        print(f"server RSS    peak {sampler.peak_main / 1024:.0f} MiB main process, "
              f"{sampler.peak_tree / 1024:.0f} MiB with children (pid {sampler.pid})")


async def idle(args: argparse.Namespace) -> None:
    pid = args.pid or listener_pid(args.port)
    if pid is None:
        sys.exit("no process found listening on the port")
    before_main, before_tree = process_rss_kib(pid), tree_rss_kib(pid)
    conns = []
    greeted = 0
    for _ in range(args.idle):
        reader, writer = await asyncio.open_connection(args.host, args.port)
        conns.append(writer)
        line = await reader.readline()
        greeted += line.startswith(b"220")
        writer.write(b"EHLO idle.test\r\n")
        await reply(reader)
    await asyncio.sleep(1.0)
    main, tree = process_rss_kib(pid), tree_rss_kib(pid)
    print(f"idle connections  {len(conns)} open, {greeted} greeted with 220")
    print(f"server RSS        {main / 1024:.0f} MiB main process "
          f"(was {before_main / 1024:.0f}), {tree / 1024:.0f} MiB with children "
          f"(was {before_tree / 1024:.0f})")
    print(f"per connection    {(main - before_main) / max(len(conns), 1):.1f} KiB")
    total_rss = total_pss = 0
    for p in tree_pids(pid):
        try:
            name, rss, pss = memory_kib(p)
        except OSError:
            continue
        total_rss, total_pss = total_rss + rss, total_pss + pss
        print(f"  {p:>7} {name:<16} RSS {rss / 1024:6.1f} MiB   PSS {pss / 1024:6.1f} MiB")
    print(f"  all processes            RSS {total_rss / 1024:6.1f} MiB   "
          f"PSS {total_pss / 1024:6.1f} MiB")
    for w in conns:
        w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("-n", "--messages", type=int, default=3000)
    p.add_argument("-c", "--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=4096, help="message size in bytes")
    p.add_argument("--per-connection", type=int, default=1)
    p.add_argument("--rate", type=float, help="start sessions at this many per second "
                   "(open loop; default: as fast as the concurrency allows)")
    p.add_argument("--pid", type=int, help="server pid (default: whoever listens on --port)")
    p.add_argument("--idle", type=int, help="open this many idle connections and report RSS")
    args = p.parse_args()
    if args.host not in LOOPBACK:
        sys.exit("bench targets loopback only (127.0.0.1, ::1)")
    asyncio.run(idle(args) if args.idle else load(args))


if __name__ == "__main__":
    main()
