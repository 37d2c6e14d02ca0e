"""Delivery in a process of its own, so that sending copies has a core of its own.

The daemon's main process accepts mail and runs the pipeline; with delivery
beside them on one event loop, that loop was the whole job's limit while the
machine's second core waited (docs/performance.md).  The delivery queue
(gateway.delivery.queue) therefore runs in a child process with its own event
loop and its own database connections, as Postfix's smtp clients run apart
from its smtpd.  Everything it shares with the daemon is in the database: it
claims due deliveries with leases, so it may end at any moment and a new one
takes over (a copy in flight when it dies is sent again once its lease runs
out, as after a crash of the whole daemon).

The two speak over one pipe, in multiprocessing's framing:

- daemon to child: ``("wake",)`` new deliveries were planned; ``("state",
  policies, config, srs)`` the policy set, the configuration whose DKIM keys
  sign, and the SRS secrets in force (at the start and after every reload);
  ``("stop",)`` finish the copies in flight, record them, and exit;
- child to daemon: ``("metrics", families)`` four times a second and at the end: the
  delivery metrics, which the daemon's /metrics shows as its own.

The daemon restarts a child that died (with a pause that grows when it dies
soon after each start) and, at shutdown, waits for it to finish what it has
in hand.  DKIM signing and ARC sealing run in the child's own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

from gateway import logs, memory
from gateway.auth import signing
from gateway.auth.work import AuthCalls, AuthWork
from gateway.config import GatewayConfig
from gateway.delivery.queue import DeliveryWorker
from gateway.metrics import Metrics
from gateway.policyset import PolicySet
from gateway.srs import SRS
from gateway.startup import open_store
from gateway.workers import Process, WorkerPool, spawn

log = logging.getLogger(__name__)

NAME = "mailflowr-deliv"  # the child's name in ps and top (15 characters at most)
OWNED = ("deliveries", "delivery_duration", "delivery_unrecorded", "dsns", "arc_seals",
         "dkim_signatures")
METRICS_EVERY = 0.25  # seconds between the child's reports of its metrics
SIGN_THREADS = 8  # DKIM/ARC calls at once in the child
SIGN_TIMEOUT = 300.0  # seconds (the worker pool's bound; unused with no processes)
SHORT_LIFE = 10.0  # seconds: a child that ends sooner is restarted only after a pause
MAX_PAUSE = 30.0  # seconds: the longest pause before a restart
STOP_GRACE = 10.0  # seconds past delivery.timeout a stopping child may take

State = tuple[PolicySet, GatewayConfig, SRS | None]


class _Families:
    """The child's delivery metrics in the daemon's registry: what it last reported,
    or the daemon's own (empty) families until it has."""

    def __init__(self, fallback: list[Any]) -> None:
        self.fallback = fallback
        self.families: list[Metric] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.families is not None:
            return self.families
        return [f for collector in self.fallback for f in collector.collect()]


class Deliverer:
    """The daemon's side of the delivery process: starts it, tells it of new work and
    of reloads, shows its metrics, restarts it when it dies, stops it."""

    def __init__(self, config: GatewayConfig, metrics: Metrics,
                 state: Callable[[], State]) -> None:
        self.config = config
        self.state = state  # what the child works with, read at every (re)start and reload
        owned = [getattr(metrics, name) for name in OWNED]
        for collector in owned:
            metrics.registry.unregister(collector)
        self.families = _Families(owned)
        metrics.registry.register(self.families)
        self.process: Process | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.stopping = False
        self.restarts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_pending = False
        self._ended: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._send_lock = threading.Lock()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._start_child()
        self._supervisor = asyncio.create_task(self._supervise(), name="deliverer")

    async def _start_child(self) -> None:
        policies, config, srs = self.state()
        process, conn = await asyncio.to_thread(spawn, serve, self.config, policies, config,
                                                srs)
        self.process, self.conn = process, conn
        self._ended = ended = asyncio.Event()
        threading.Thread(target=self._read, args=(conn, ended), name="deliverer-pipe",
                         daemon=True).start()
        log.info("delivery process started (pid %d)", process.pid)

    def _read(self, conn: multiprocessing.connection.Connection, ended: asyncio.Event) -> None:
        """The pipe from the child, in a thread of its own: until it ends."""
        assert self._loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: the child is broken
                log.exception("delivery process: unreadable message")
                break
            if message[0] == "metrics":
                self.families.families = message[1]  # one reference swap: scrapes see either
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone
            self._loop.call_soon_threadsafe(ended.set)

    async def _supervise(self) -> None:
        """Restart the child whenever it ends while the daemon runs."""
        pause = 1.0
        while True:
            started = time.monotonic()
            assert self._ended is not None and self.process is not None
            await self._ended.wait()
            await asyncio.to_thread(self.process.join, 5)
            if self.stopping:
                return
            log.error("delivery process (pid %d) ended with %s; starting another",
                      self.process.pid, self.process.exitcode)
            self.restarts += 1
            if time.monotonic() - started < SHORT_LIFE:
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
            else:
                pause = 1.0
            if self.stopping:
                return
            try:
                await self._start_child()
            except Exception:  # loop boundary: try again after the pause
                log.exception("delivery process could not be started")
                self._ended = asyncio.Event()
                self._ended.set()

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self.conn
        if conn is None:
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)  # a child that died is restarted by the supervisor

    def wake(self) -> None:
        """New deliveries are planned: one message to the child, however many calls."""
        if self._wake_pending or self._loop is None:
            return
        self._wake_pending = True
        self._loop.call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_pending = False
        self._send(("wake",))

    def reloaded(self) -> None:
        """The policy set, the DKIM keys or the SRS secrets changed: the child follows."""
        self._send(("state", *self.state()))

    async def stop(self) -> None:
        self.stopping = True
        process, ended = self.process, self._ended
        self._send(("stop",))
        if process is not None and ended is not None:
            try:
                await asyncio.wait_for(ended.wait(),
                                       self.config.delivery.timeout + STOP_GRACE)
            except TimeoutError:
                log.error("delivery process (pid %d) did not stop in time; killing it",
                          process.pid)
                process.kill()
            await asyncio.to_thread(process.join, 5)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.conn is not None:
            self.conn.close()


# ---------------------------------------------------------------- the child
def serve(conn: multiprocessing.connection.Connection, config: GatewayConfig,
          policies: PolicySet, signing_config: GatewayConfig, srs: SRS | None) -> None:
    """The delivery process: runs the delivery queue until told to stop or the daemon
    is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the daemon decides when we stop
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(NAME)
    logs.setup(config.logging.level, config.logging.format, config.logging.personal_data)
    asyncio.run(_deliver(conn, config, (policies, signing_config, srs)))


class _Child:
    def __init__(self, conn: multiprocessing.connection.Connection, config: GatewayConfig,
                 state: State) -> None:
        self.conn = conn
        self.config = config
        self.policies, signing_config, self.srs = state
        self.signer = signing.from_config(signing_config)
        self.stop = asyncio.Event()
        self.worker: DeliveryWorker | None = None
        self.metrics = Metrics(tenant_labels=config.metrics.tenant_labels)
        self._owned = {getattr(self.metrics, name) for name in OWNED}

    def receive(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "wake" and self.worker is not None:
            self.worker.wakeup.set()
        elif kind == "state":
            self.policies, signing_config, self.srs = message[1:]
            try:
                self.signer = signing.from_config(signing_config)
            except Exception as exc:  # the daemon loaded them; a file changed since
                log.error("delivery process: DKIM keys not reloaded, the keys in use stay: "
                          "%s", exc)
        elif kind == "stop":
            self.stop.set()

    def read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipe from the daemon, in a thread: its end means stop."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self.receive, message)
        loop.call_soon_threadsafe(self.stop.set)

    def report(self) -> None:
        families = [f for c in self._owned for f in c.collect()]
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("metrics", families))

    async def reports(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY)
            self.report()


async def _deliver(conn: multiprocessing.connection.Connection, config: GatewayConfig,
                   state: State) -> None:
    child = _Child(conn, config, state)
    loop = asyncio.get_running_loop()
    threading.Thread(target=child.read, args=(loop,), name="pipe", daemon=True).start()
    store = await asyncio.to_thread(open_store, config, upgrade_sqlite=False)
    pool = WorkerPool("sign", 0, SIGN_THREADS, AuthWork(None), SIGN_TIMEOUT)
    await pool.start()
    worker = child.worker = DeliveryWorker(
        store, config, child.metrics, policies=lambda: child.policies,
        signer=lambda: child.signer, srs=lambda: child.srs, auth=AuthCalls(pool, 0))
    worker.start()
    memory.settle()
    reports = asyncio.create_task(child.reports())
    try:
        await child.stop.wait()
        await worker.stop()
    finally:
        reports.cancel()
        child.report()
        await pool.close()
        store.engine.dispose()
