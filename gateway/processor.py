"""The pipeline in a process of its own, so that processing has a core of its own.

The daemon's main process accepts mail; the pipeline (gateway.pipeline.worker)
runs in a child process of the daemon (gateway.children) with its own event
loop, its own database connections and its own worker processes for parsing and
the checks of inbound mail, as Postfix's cleanup and qmgr run apart from its
smtpd.  It claims stored messages with leases; what it had in hand when it dies
is claimed again once the lease runs out.  It runs at a lower priority than the
main process (``NICE``): when every core is busy, the kernel gives the SMTP
sessions the CPU first.
After ``pipeline.max_idle`` without work it is let go, as Postfix's cleanup is
after its ``max_idle``: the next commit starts another, and so does a received
message the daemon finds unclaimed (it looks every ``pipeline.poll_interval``:
another instance's mail, or its lease run out).

Beside the messages every child understands:

- daemon to child: ``("wake",)`` new mail was committed or imported;
  ``("bursting", yes)`` the SMTP sessions began or ended accepting a burst
  (gateway.pipeline.flow.Bursts); ``("state", policies)`` the policy set in
  force, at the start and after every reload;
- child to daemon: ``("planned",)`` deliveries were planned (the daemon wakes the
  delivery process); ``("finished", count, backlog_since)`` a batch was saved;
  ``("backlog", since)`` its oldest work in hand has waited since then (with the
  metrics, when it changed), from which the daemon's sessions know whether the
  pipeline is behind (``smtp.in_flow_delay``).  The child reports the pipeline's
  metrics and those of the checks of inbound mail.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.connection
import time
from collections.abc import Callable
from typing import Any

from gateway.auth.work import AuthCalls, AuthWork
from gateway.children import Child, ChildLoop, enter
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.pipeline.flow import Acceptance, Bursts, InFlow, overdue
from gateway.pipeline.parse import ParserPool
from gateway.pipeline.worker import PipelineWorker
from gateway.policyset import PolicySet
from gateway.startup import authenticator, open_store
from gateway.store.repository import Store
from gateway.workers import MAX_IDLE, WorkerPool

log = logging.getLogger(__name__)

NAME = "mailflowr-pipe"  # the child's name in ps and top (15 characters at most)
NICE = 5  # below the main process; its worker processes go 10 lower still
OWNED = ("pipeline_messages", "rule_hits", "pipeline_stage", "pipeline_failures",
         "pipeline_held_back", "auth_checks")
WORKER_THREADS = 8  # calls a worker process runs at once: most wait on DNS, not on the CPU
AUTH_CALL_TIMEOUT = 300.0  # seconds before a worker process is taken for stuck and replaced
STOP_GRACE = 10.0  # seconds past pipeline.lease_time a stopping child may take


class Processor(Child):
    """The daemon's side of the pipeline process: wakes it on commits, tells it what
    the sessions are doing, and slows new mail while it is behind (``flow``)."""

    def __init__(self, config: GatewayConfig, metrics: Metrics, store: Store,
                 policies: Callable[[], PolicySet], planned: Callable[[], None]) -> None:
        super().__init__("pipeline process", serve, config, metrics, OWNED,
                         lambda: (policies(),), config.pipeline.lease_time + STOP_GRACE, NICE,
                         max_idle=config.pipeline.max_idle,
                         check_every=config.pipeline.poll_interval)
        self.store = store
        self.planned = planned  # deliveries were planned: the delivery process is woken
        self.burst_delay = config.pipeline.burst_delay
        self.bursts = Bursts(config.pipeline.burst_load, self._tell)
        self.backlog_since: float | None = None  # as the child last said
        self.flow = InFlow(config.smtp.in_flow_delay, self.behind, metrics)  # for the sessions

    async def start(self) -> None:
        await super().start()
        self.store.notify_on_commit(self._committed)
        if self.burst_delay > 0:
            self.bursts.start()

    def _committed(self) -> None:
        if self.burst_delay > 0:
            self.bursts.committed()
        self.wake()

    def _tell(self, bursting: bool) -> None:
        self.send(("bursting", bursting))

    def behind(self) -> bool:
        return overdue(self.backlog_since, self.burst_delay, time.monotonic())

    def received(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "planned":
            self.planned()
        elif kind == "finished":
            self.backlog_since = message[2]
            self.flow.finished(message[1])
        elif kind == "backlog":
            self.backlog_since = message[1]
        else:
            super().received(message)

    def idle(self) -> bool:
        return self.backlog_since is None

    async def needed(self) -> bool:
        # mail another instance stored, or left with its lease run out
        return await asyncio.to_thread(self.store.claimable)

    def restarted(self) -> None:
        self.backlog_since = None
        self._tell(self.bursts.bursting)

    async def stop(self) -> None:
        self.bursts.stop()
        await super().stop()


# ---------------------------------------------------------------- the child
def serve(conn: multiprocessing.connection.Connection, config: GatewayConfig,
          policies: PolicySet) -> None:
    """The pipeline process: runs the pipeline until told to stop or the daemon is
    gone."""
    enter(NAME, config)
    asyncio.run(_process(_Child(conn, config, policies)))


class _Child(ChildLoop):
    def __init__(self, conn: multiprocessing.connection.Connection, config: GatewayConfig,
                 policies: PolicySet) -> None:
        super().__init__(conn, config, OWNED)
        self.policies = policies
        self.acceptance = Acceptance()
        self.worker: PipelineWorker | None = None
        self._told_backlog: float | None = None

    def received(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "bursting":
            self.acceptance.set(message[1])
        elif kind == "state":
            self.policies = message[1]
        else:
            super().received(message)

    def planned(self) -> None:
        self.soon(("planned",))

    def finished(self, count: int) -> None:
        since = self.worker.backlog_since if self.worker is not None else None
        self._told_backlog = since
        self.send(("finished", count, since))

    def report(self) -> None:
        since = self.worker.backlog_since if self.worker is not None else None
        if since != self._told_backlog:
            self._told_backlog = since
            self.send(("backlog", since))
        super().report()


async def _process(child: _Child) -> None:
    config = child.config
    async with child.running():
        store = await asyncio.to_thread(open_store, config, upgrade_sqlite=False)
        # One set of processes parses and authenticates: each is a whole interpreter.
        pool = WorkerPool("work", max(config.pipeline.parse_workers, config.auth.workers),
                          WORKER_THREADS, AuthWork(authenticator(config)), AUTH_CALL_TIMEOUT,
                          max_idle=MAX_IDLE)
        await pool.start()
        auth = AuthCalls(pool, config.auth.workers)
        settings = config.pipeline
        worker = child.worker = PipelineWorker(
            store, ParserPool(pool, settings.parse_workers, settings.parse_timeout),
            batch_size=settings.batch_size,
            poll_interval=settings.poll_interval,
            lease_time=settings.lease_time,
            burst_delay=settings.burst_delay,
            acceptance=child.acceptance,
            policies=lambda: child.policies,
            deliveries_planned=child.planned,
            finished=child.finished,
            metrics=child.metrics,
            auth=auth if auth.checking else None,
            authserv_id=config.authserv_id,
            srs=bool(config.srs.secret_file),
            keep_original={tid: t.keep_original for tid, t in config.tenants.items()
                           if t.keep_original is not None},
            request_address=config.privacy.request_address or "",
            unindexed=frozenset(tid for tid, t in config.tenants.items() if not t.search),
        )
        await child.work(worker, pool, store)
