"""Authentication work as the worker processes run it (gateway.workers).

The checks of inbound mail and our ARC sets and DKIM signatures on copies are
CPU work (RSA, canonicalization, SPF and DMARC evaluation) that would slow the
daemon's one process down; ``AuthWork`` is what a worker process keeps between
calls (the checks as configured, with their DNS cache, and the private keys it
has loaded) and ``check`` and ``protect`` are the calls.  The daemon's own
``AuthWork`` runs them in a thread when no worker process can.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from gateway.auth.inbound import Authenticator, AuthResults
from gateway.auth.signing import PrivateKeys, Protected
from gateway.auth.signing import protect as protect_copy
from gateway.keyfiles import SigningKey
from gateway.workers import WorkerPool, once

CHECK_THREADS = 4  # checks of one check_many call at once (most of a check waits on DNS; each
# thread that allocates costs the process a heap of its own)


class AuthWork:
    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator
        self.for_dmarc = authenticator.for_dmarc() if authenticator is not None else None
        self.private = PrivateKeys()

    def __reduce__(self) -> tuple[type[AuthWork], tuple[Authenticator | None]]:
        return AuthWork, (self.authenticator,)


def check(work: AuthWork, raw: bytes, mail_from: str, helo: str, client_ip: str,
          dmarc_only: bool) -> AuthResults:
    """The checks of one inbound message; with ``dmarc_only``, what DMARC needs."""
    authenticator = work.for_dmarc if dmarc_only else work.authenticator
    assert authenticator is not None, "no checks of inbound mail are configured"
    return authenticator(raw, mail_from=mail_from, helo=helo, client_ip=client_ip)


def check_many(work: AuthWork, items: list[tuple[bytes, str, str, str]]
               ) -> list[tuple[AuthResults | str, float]]:
    """The checks of several inbound messages at once (most of their time is waiting on
    DNS), each with the seconds it took; a check that raised, the error's text."""
    def timed(item: tuple[bytes, str, str, str]) -> tuple[AuthResults, float]:
        started = time.perf_counter()
        raw, mail_from, helo, client_ip = item
        result = check(work, raw, mail_from, helo, client_ip, False)
        return result, time.perf_counter() - started

    out: list[tuple[AuthResults | str, float]] = []
    for future in [_checking().submit(timed, item) for item in items]:
        try:
            out.append(future.result())
        except Exception as exc:
            out.append((f"{exc.__class__.__name__}: {str(exc)[:200]}", 0.0))
    return out


# The threads of this process that run the checks of a ``check_many`` call.
_checking = once(lambda: ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="check"))


def protect(work: AuthWork, data: bytes, seal_key: SigningKey | None,
            sign_keys: tuple[SigningKey, ...], authserv_id: str) -> Protected:
    """A copy with our ARC set and DKIM signatures (see gateway.auth.signing.protect)."""
    return protect_copy(data, seal_key, sign_keys, authserv_id, work.private)


class AuthCalls:
    """The daemon's way to these calls: in the first ``processes`` of its worker
    processes (a thread here when that is 0, or one fails)."""

    def __init__(self, pool: WorkerPool[AuthWork], processes: int) -> None:
        self.pool = pool
        self.processes = processes
        self.checking = pool.context.authenticator is not None  # inbound checks configured

    async def check(self, raw: bytes, *, mail_from: str, helo: str, client_ip: str,
                    dmarc_only: bool = False) -> AuthResults:
        return await self.pool.run(check, raw, mail_from, helo, client_ip, dmarc_only,
                                   among=self.processes)

    async def check_many(self, items: list[tuple[bytes, str, str, str]]
                         ) -> list[tuple[AuthResults | str, float]]:
        """``check`` of several messages (raw, mail_from, helo, client_ip) in one call."""
        return await self.pool.run(check_many, items, among=self.processes)

    async def protect(self, data: bytes, seal_key: SigningKey | None,
                      sign_keys: tuple[SigningKey, ...], authserv_id: str) -> Protected:
        return await self.pool.run(protect, data, seal_key, sign_keys, authserv_id,
                                   among=self.processes)
