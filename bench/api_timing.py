#!/usr/bin/env python3
"""Does a response time tell a token whether another tenant's id exists?

    PYTHONPATH=. .venv/bin/python bench/api_timing.py [-n 2000]

Starts a gateway (SQLite, a directory of its own) with the admin API, stores one
message for tenant acme and asks for it, -n times over one keep-alive connection,
with globex's token, alternating with an id that exists nowhere.  Both must answer
the same 404.  Prints the median time of each, and how often an observer that knows
both medians guesses right, one request at a time, which id was asked for (50%: the
times tell nothing).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tests.conftest import Gateway, free_port  # noqa: E402

NOWHERE = "01ZZZZZZZZZZZZZZZZZZZZZZZZ"


def token(gw: Gateway, tenant: str) -> str:
    out = gw.cli("token", "create", "--tenant", tenant, check=True).stdout
    return out.decode().split()[-1]


def timed(conn: http.client.HTTPConnection, path: str, bearer: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {bearer}"})
    reply = conn.getresponse()
    body = reply.read()
    elapsed = time.perf_counter() - started
    assert reply.status == 404, (path, reply.status, body)
    return elapsed, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="requests of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailflowr-api-timing-") as folder:
        directory = Path(folder)
        port = free_port()
        gw = Gateway(directory, f"sqlite:///{directory / 'gateway.db'}",
                     {"admin_api": {"listen": f"127.0.0.1:{port}"},
                      "metrics": {"listen": None}})
        gw.start()
        try:
            with gw.smtp() as s:
                s.sendmail("a@sender.test", ["support@acme.test"],
                           b"From: a@sender.test\r\nTo: support@acme.test\r\n"
                           b"Subject: timing\r\n\r\nbody\r\n")
            acme_id = gw.wait_processed(1)[0]["id"]
            globex = token(gw, "globex")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            times: dict[str, list[float]] = {"other tenant's id": [], "no such id": []}
            bodies = set()
            for _ in range(args.n):
                for what, mid in (("other tenant's id", acme_id), ("no such id", NOWHERE)):
                    elapsed, body = timed(conn, f"/api/v1/messages/{mid}", globex)
                    times[what].append(elapsed)
                    bodies.add(body)
            conn.close()
        finally:
            gw.close()
    medians = {what: statistics.median(t) for what, t in times.items()}
    for what, median in medians.items():
        print(f"{what:>18}: median {median * 1000:.3f} ms over {args.n}")
    # guess "other tenant's id" when a time is nearer its median than the other's
    other, none = medians["other tenant's id"], medians["no such id"]
    right = sum(abs(t - other) < abs(t - none) for t in times["other tenant's id"]) + \
        sum(abs(t - none) <= abs(t - other) for t in times["no such id"])
    print(f"{'guessed right':>18}: {100 * right / (2 * args.n):.1f}%")
    print(f"{'distinct bodies':>18}: {len(bodies)}")


if __name__ == "__main__":
    main()
