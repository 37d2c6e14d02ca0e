"""Authentication work as the worker processes run it (gateway.workers).

The checks of inbound mail and our ARC sets and DKIM signatures on copies are
CPU work (RSA, canonicalization, SPF and DMARC evaluation) that would slow the
daemon's one process down; ``AuthWork`` is what a worker process keeps between
calls (the checks as configured, with their DNS cache, and the private keys it
has loaded) and ``check`` and ``protect`` are the calls.  The daemon's own
``AuthWork`` runs them in a thread when no worker process can.
"""

from __future__ import annotations

from gateway.auth.inbound import Authenticator, AuthResults
from gateway.auth.keys import SigningKey
from gateway.auth.signing import PrivateKeys, Protected
from gateway.auth.signing import protect as protect_copy
from gateway.workers import WorkerPool


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

    async def protect(self, data: bytes, seal_key: SigningKey | None,
                      sign_keys: tuple[SigningKey, ...], authserv_id: str) -> Protected:
        return await self.pool.run(protect, data, seal_key, sign_keys, authserv_id,
                                   among=self.processes)
