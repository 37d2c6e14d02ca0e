"""Closed-loop SMTP load for fault tests: clients that remember every 250."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from tests.conftest import RawClient, simple_message


class Load:
    """``clients`` threads sending numbered messages until told to stop.

    Each connection goes to the next port of ``ports`` in turn, so a daemon that is gone
    or refusing only sends the client on to the next one. ``acked`` holds the subject of
    every message answered 250; ``by_port`` counts them per port.
    """

    def __init__(self, ports: int | Sequence[int], clients: int = 8,
                 rcpt: Callable[[int], str] = lambda n: f"user{n}@globex.test",
                 per_connection: int = 1000, pace: float = 0.0) -> None:
        self.ports = [ports] if isinstance(ports, int) else list(ports)
        self.rcpt = rcpt
        self.per_connection = per_connection
        self.pace = pace  # seconds each client rests after a message (0: none)
        self.acked: set[str] = set()
        self.by_port: dict[int, int] = dict.fromkeys(self.ports, 0)
        self.replies: list[str] = []  # every reply to the final dot that was not a 250
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def _client(self, n: int) -> None:
        k = 0
        turn = n
        while not self.stop.is_set():
            port = self.ports[turn % len(self.ports)]
            turn += 1
            try:
                c = RawClient(port, timeout=10)
                if not c.reply().startswith("220"):
                    c.close()
                    time.sleep(0.05)
                    continue
                c.command("EHLO load.test")
                for _ in range(self.per_connection):
                    if self.stop.is_set():
                        break
                    subject = f"load-{n}-{k}"
                    k += 1
                    c.command("MAIL FROM:<load@sender.test>")
                    c.command(f"RCPT TO:<{self.rcpt(n)}>")
                    if not c.command("DATA").startswith("354"):
                        break
                    reply = c.command(simple_message(subject=subject) + b".")
                    with self.lock:
                        if reply.startswith("250"):
                            self.acked.add(subject)
                            self.by_port[port] += 1
                        else:
                            self.replies.append(reply)
                    if self.pace:
                        self.stop.wait(self.pace)
                c.close()
            except OSError:
                time.sleep(0.05)  # the daemon is gone or refusing: on to the next

    def wait(self, count: int, timeout: float = 30) -> None:
        """Until ``count`` messages have been acknowledged in all."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"only {len(self.acked)} of {count} acked"
            time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
