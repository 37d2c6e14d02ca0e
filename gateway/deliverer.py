"""Delivery in a process of its own, so that sending copies has a core of its own.

The delivery queue (gateway.delivery.queue) runs in a child process of the
daemon (gateway.children) with its own event loop, its own database connections
and threads for ARC seals and DKIM signatures, as Postfix's smtp clients run
apart from its smtpd.  It claims due deliveries with leases; a copy in flight
when it dies is sent again once its lease runs out, unless the delivery journal
recorded the relay's answer.

Beside the messages every child understands: ``("wake",)`` says new deliveries
were planned; ``("state", policies, config, srs)`` carries the policy set, the
configuration whose DKIM keys sign, and the SRS secrets in force (at the start
and after every reload).  The child reports the delivery metrics.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
from collections.abc import Callable
from typing import Any

from gateway.auth import signing
from gateway.auth.work import AuthCalls, AuthWork
from gateway.children import Child, ChildLoop, enter
from gateway.config import GatewayConfig
from gateway.delivery.queue import DeliveryWorker
from gateway.metrics import Metrics
from gateway.policyset import PolicySet
from gateway.srs import SRS
from gateway.startup import open_store
from gateway.workers import WorkerPool

log = logging.getLogger(__name__)

NAME = "mailflowr-deliv"  # the child's name in ps and top (15 characters at most)
OWNED = ("deliveries", "delivery_duration", "delivery_unrecorded", "dsns", "arc_seals",
         "dkim_signatures")
SIGN_THREADS = 8  # DKIM/ARC calls at once in the child
SIGN_TIMEOUT = 300.0  # seconds (the worker pool's bound; unused with no processes)
STOP_GRACE = 10.0  # seconds past delivery.timeout a stopping child may take

State = tuple[PolicySet, GatewayConfig, SRS | None]


class Deliverer(Child):
    """The daemon's side of the delivery process."""

    def __init__(self, config: GatewayConfig, metrics: Metrics,
                 state: Callable[[], State]) -> None:
        super().__init__("delivery process", serve, config, metrics, OWNED, state,
                         config.delivery.timeout + STOP_GRACE)


# ---------------------------------------------------------------- the child
def serve(conn: multiprocessing.connection.Connection, config: GatewayConfig,
          policies: PolicySet, signing_config: GatewayConfig, srs: SRS | None) -> None:
    """The delivery process: runs the delivery queue until told to stop or the daemon
    is gone."""
    enter(NAME, config)
    asyncio.run(_deliver(_Child(conn, config, (policies, signing_config, srs))))


class _Child(ChildLoop):
    def __init__(self, conn: multiprocessing.connection.Connection, config: GatewayConfig,
                 state: State) -> None:
        super().__init__(conn, config, OWNED)
        self.policies, signing_config, self.srs = state
        self.signer = signing.from_config(signing_config)

    def received(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "state":
            self.policies, signing_config, self.srs = message[1:]
            try:
                self.signer = signing.from_config(signing_config)
            except Exception as exc:  # the daemon loaded them; a file changed since
                log.error("delivery process: DKIM keys not reloaded, the keys in use stay: "
                          "%s", exc)
        else:
            super().received(message)


async def _deliver(child: _Child) -> None:
    config = child.config
    async with child.running():
        store = await asyncio.to_thread(open_store, config, upgrade_sqlite=False)
        pool = WorkerPool("sign", 0, SIGN_THREADS, AuthWork(None), SIGN_TIMEOUT)
        await pool.start()
        worker = DeliveryWorker(
            store, config, child.metrics, policies=lambda: child.policies,
            signer=lambda: child.signer, srs=lambda: child.srs, auth=AuthCalls(pool, 0))
        await child.work(worker, pool, store)
