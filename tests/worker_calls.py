"""What the worker-process tests send to the processes: module-level, so that a
process imports them by name, and in a module of their own that imports next to
nothing, so that a fresh process answers its first call within the tests' short
time bounds on a busy machine (importing the test module took it most of a second)."""

from __future__ import annotations

import os
import time


def whoami(context: str, x: int) -> tuple[int, str, int]:
    return os.getpid(), context, x


def refuse(context: str) -> None:
    raise ValueError("not this one")


def die_unless_in(context: str, daemon: int) -> str:
    """Ends the worker process it runs in; in the daemon (the fallback), answers."""
    if os.getpid() != daemon:
        os._exit(3)
    return "answered in the daemon"


def hang_unless_in(context: str, daemon: int) -> str:
    if os.getpid() != daemon:
        time.sleep(30)
    return "answered in the daemon"


def reverse(context: str, data: bytes) -> tuple[int, bytes]:
    return os.getpid(), data[::-1]


def _unreadable() -> None:
    raise RuntimeError("this result cannot be read")


class Unreadable:
    """Pickles in the worker process; unpickling it in the daemon raises."""

    def __reduce__(self):
        return _unreadable, ()


def send_unreadable(context: str) -> Unreadable:
    return Unreadable()


def span(context: str, seconds: float) -> tuple[int, float, float]:
    started = time.monotonic()
    time.sleep(seconds)
    return os.getpid(), started, time.monotonic()


class Unloadable:
    """A context a worker process cannot load: every process ends as it starts."""

    def __reduce__(self):
        return refuse_to_load, ()


def refuse_to_load():
    raise RuntimeError("cannot be loaded in a worker process")


class Picky:
    """Stands in for the inbound checks (gateway.auth.inbound.Authenticator): answers
    with the process and the message, and raises for the message b"boom"."""

    def for_dmarc(self) -> Picky:
        return self

    def __call__(self, raw: bytes, *, mail_from: str, helo: str,
                 client_ip: str) -> tuple[int, bytes]:
        if raw == b"boom":
            raise ValueError("no checks for this one")
        return os.getpid(), raw
