"""The one place that knows every part: wires them, runs them, stops them.

``App.run()`` opens the database (SQLite is upgraded to the current schema;
PostgreSQL must have been upgraded with ``mailflowr-gateway db upgrade``),
starts the group committer, the parser processes, the pipeline worker, the
metrics endpoint and the SMTP listener on this process's own event loop, and
then waits.  SIGTERM or SIGINT only set a flag; shutdown then stops listening,
lets sessions that are inside a transaction finish (up to
``smtp.shutdown_timeout``), commits what they handed over, and exits 0.
SIGHUP, and a change of a policy file, reload the policy set: the new set
takes effect only if it validates as a whole.  The retention sweeper runs
every ``retention.sweep_interval`` under the policy in force at its start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from prometheus_client import start_http_server
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig, parse_hostport
from gateway.delivery import notices
from gateway.delivery.queue import DeliveryWorker
from gateway.ingress.smtp import ConnectionTracker, IngressHandler, abort, protocol_factory
from gateway.ingress.submission import SubmissionHandler
from gateway.metrics import Metrics
from gateway.pipeline.parse import ParserPool
from gateway.pipeline.worker import PipelineWorker
from gateway.policy.loader import PolicyError, PolicyHolder, PolicySet, snapshot
from gateway.policy.subprocessors import HELD_PREFIX
from gateway.store import database
from gateway.store.repository import Store
from gateway.sweeper import Sweeper
from gateway.tenancy import TenantDirectory

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the text says why, in one line."""


def open_store(
    config: GatewayConfig,
    *,
    upgrade_sqlite: bool = True,
    on_commit: Callable[[int, float], None] | None = None,
) -> Store:
    """Connect, make sure the schema is current, and return the Store."""
    engine = database.create(config.database.url, pool_size=config.database.pool_size)
    try:
        current = database.current_revision(engine)
        head = database.head_revision()
        if current != head:
            if database.is_sqlite(engine) and upgrade_sqlite:
                database.upgrade(engine)
            else:
                raise StartupError(
                    f"database schema is at {current or 'nothing'}, this version needs {head}: "
                    "run 'mailflowr-gateway db upgrade' first"
                )
    except SQLAlchemyError as exc:
        engine.dispose()
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise StartupError(f"database unreachable: {first[0] if first else exc}") from None
    return Store(
        engine,
        commit_batch_max=config.database.commit_batch_max,
        sqlite_path=config.sqlite_path,
        min_free_space=config.storage.min_free_space,
        on_commit=on_commit,
    )


def tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    tls = config.smtp.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"smtp.tls: cannot load certificate/key: {exc}") from None
    return context


class App:
    def __init__(self, config: GatewayConfig, policies: PolicySet) -> None:
        self.config = config
        self.policies = PolicyHolder(config.policies.directory, config.tenants.keys(),
                                     config.destinations.keys(), policies)
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self.sweeper: Sweeper | None = None
        self.store: Store | None = None
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: self._spawn(self.reload_policies("SIGHUP")))
        self.metrics.policy_loaded(self.policies.current.version,
                                   self.policies.current.loaded_at.timestamp())

        store = await asyncio.to_thread(
            lambda: open_store(config, on_commit=self.metrics.observe_commit)
        )
        await asyncio.to_thread(
            store.sync_tenants, {tid: t.name for tid, t in config.tenants.items()}
        )
        context = tls_context(config)
        await store.start()
        parser = ParserPool(config.pipeline.parse_workers, config.pipeline.parse_timeout)
        await parser.start()
        self.store = store
        await self.sync_subprocessors(None)
        delivery = DeliveryWorker(store, config, self.metrics, policies=self.policies.get)
        worker = PipelineWorker(
            store, parser,
            batch_size=config.pipeline.batch_size,
            poll_interval=config.pipeline.poll_interval,
            lease_time=config.pipeline.lease_time,
            policies=self.policies.get,
            deliveries_planned=delivery.wakeup,
            on_outcome=self.metrics.pipeline_outcome,
        )
        worker.start()
        delivery.start()
        if config.policies.watch_interval > 0:
            self._spawn(self._watch_policies(config.policies.watch_interval))
        sweeping = None
        if config.retention.sweep_interval > 0:
            self.sweeper = Sweeper(store, batch_size=config.retention.batch_size,
                                   pause=config.retention.batch_pause)
            sweeping = asyncio.create_task(self._sweep_loop(self.sweeper), name="retention")

        metrics_server = None
        if config.metrics.listen:
            host, port = parse_hostport(config.metrics.listen)
            try:
                metrics_server = start_http_server(port, host, registry=self.metrics.registry)
            except OSError as exc:
                await self._stop_parts(worker, delivery, parser, store)
                raise StartupError(
                    f"metrics.listen {config.metrics.listen}: {exc.strerror}"
                ) from None

        handler = IngressHandler(config.smtp, TenantDirectory(config.tenants), store, self.metrics,
                                 self.policies.workflows)
        listeners: list[tuple[str, IngressHandler | SubmissionHandler, dict[str, bool]]] = [
            (config.smtp.listen, handler, {})
        ]
        if config.submission.listen:
            submission = SubmissionHandler(config.smtp, config.submission, config.tenants,
                                           store, self.metrics)
            listeners.append((config.submission.listen, submission,
                              {"submission": True, "auth_required": True,
                               "auth_require_tls": True}))
        servers: list[tuple[asyncio.Server, ConnectionTracker]] = []
        for listen, listener_handler, options in listeners:
            tracker = ConnectionTracker(config.smtp.max_connections,
                                        config.smtp.max_connections_per_ip)
            host, port = parse_hostport(listen)
            try:
                server = await loop.create_server(
                    protocol_factory(listener_handler, config.smtp, tracker, self.metrics,
                                     context, **options),
                    host, port, reuse_address=True, backlog=1024,
                )
            except OSError as exc:
                for started, _ in servers:
                    started.close()
                await self._stop_parts(worker, delivery, parser, store)
                if metrics_server is not None:
                    metrics_server[0].shutdown()
                raise StartupError(f"{listen}: {exc.strerror}") from None
            servers.append((server, tracker))
        log.info("listening for SMTP on %s%s (%d tenants, database %s)", config.smtp.listen,
                 f", submission on {config.submission.listen}" if config.submission.listen
                 else "", len(config.tenants),
                 store.engine.url.render_as_string(hide_password=True))

        await self.stopping.wait()
        trackers = [tracker for _, tracker in servers]
        log.info("shutting down: no new connections, %d sessions open",
                 sum(len(t.sessions) for t in trackers))
        for server, tracker in servers:
            server.close()
            tracker.shutting_down = True
            for session in list(tracker.sessions):
                session.shutdown()
        try:
            await asyncio.wait_for(asyncio.gather(*(t.idle.wait() for t in trackers)),
                                   config.smtp.shutdown_timeout)
        except TimeoutError:
            for tracker in trackers:
                log.warning("cutting %d sessions open at the deadline", len(tracker.sessions))
                for session in list(tracker.sessions):
                    abort(session.transport)
        if sweeping is not None and self.sweeper is not None:
            self.sweeper.stopping = True  # ends the sweep between two batches
            await sweeping
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._stop_parts(worker, delivery, parser, store)
        if metrics_server is not None:
            metrics_server[0].shutdown()
        log.info("stopped")
        return 0

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_policies(self, why: str) -> None:
        """Validate the policy directory as a whole and swap it in; or keep the one in force."""
        async with self._reload_lock:
            previous = self.policies.current
            try:
                changed = await asyncio.to_thread(self.policies.reload)
            except PolicyError as exc:
                self.metrics.policy_reloads.labels("failure").inc()
                log.error("policy reload (%s) refused, policy %s stays in force: %s", why,
                          previous.version, "; ".join(exc.problems))
                return
            if not changed:
                log.info("policy reload (%s): no change (policy %s)", why, previous.version)
                return
            current = self.policies.current
            self.metrics.policy_reloads.labels("success").inc()
            self.metrics.policy_loaded(current.version, current.loaded_at.timestamp(),
                                       previous.version)
            log.info("policy reloaded (%s): %s -> %s (%s)", why, previous.version,
                     current.version, ", ".join(current.files) or "no files")
            try:
                await self.sync_subprocessors(previous)
            except Exception:  # the database may be away; the next reload or restart retries
                log.exception("recording subprocessor changes failed")

    async def sync_subprocessors(self, previous: PolicySet | None) -> None:
        """Record registry changes with their notices; let held copies try again."""
        routing = self.policies.current.subprocessors
        if routing is None or self.store is None:
            return
        before = previous.subprocessors.registry if previous and previous.subprocessors else {}
        names = {tid: t.name for tid, t in self.config.tenants.items()}
        now = datetime.now(UTC)
        added, removed = await asyncio.to_thread(
            self.store.sync_subprocessors, routing.registry.keys(), now,
            lambda a, r: notices.build(routing, before, names, self.config.smtp.hostname,
                                       now, a, r))
        for name in added:
            log.info("subprocessor %s added: notices queued; usable per tenant after %d days "
                     "without objection", name, routing.window_days)
        for name in removed:
            log.info("subprocessor %s removed: notices queued", name)
        released = await asyncio.to_thread(self.store.release_held, HELD_PREFIX)
        if released:
            log.info("%d held deliveries try again under the new subprocessor policy", released)

    async def _watch_policies(self, interval: float) -> None:
        """Reload when a policy file changes (after it has stayed the same for a moment,
        so an editor's save in several writes is usually read once, whole)."""
        directory = self.config.policies.directory
        last = await asyncio.to_thread(snapshot, directory)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(snapshot, directory)
            if now == last:
                continue
            await asyncio.sleep(min(interval, 0.25))
            settled = await asyncio.to_thread(snapshot, directory)
            if settled != now:
                continue  # still being written: look again at the next tick
            last = settled
            await self.reload_policies("files changed")

    async def _sweep_loop(self, sweeper: Sweeper) -> None:
        interval = self.config.retention.sweep_interval
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), interval)
                return
            except TimeoutError:
                pass
            policy = self.policies.current  # one version for the whole sweep
            log.info("retention sweep started (policy %s)", policy.version)
            try:
                report = await asyncio.to_thread(sweeper.sweep, policy.retention)
            except Exception:  # loop boundary: the database may be away; next interval
                self.metrics.retention_sweeps.labels("failure").inc()
                log.exception("retention sweep failed")
                continue
            if report.skipped:
                self.metrics.retention_sweeps.labels("skipped").inc()
                log.info("retention sweep skipped: %s", report.skipped)
            else:
                self.metrics.retention_sweeps.labels("success").inc()
                self.metrics.retention_deleted.inc(report.expired)
                self.metrics.retention_held.set(report.held)
                self.metrics.retention_last_sweep.set(time.time())
                log.info("retention sweep (policy %s): deleted %d messages, %d kept by holds, "
                         "in %.1f s", policy.version, report.expired, report.held,
                         report.seconds)

    @staticmethod
    async def _stop_parts(worker: PipelineWorker, delivery: DeliveryWorker, parser: ParserPool,
                          store: Store) -> None:
        await worker.stop()
        await delivery.stop()
        await store.close()
        await parser.close()
        store.engine.dispose()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command line, addresses included, at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when chosen (or available, for auto); None: asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError("smtp.event_loop is uvloop, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(config: GatewayConfig, policies: PolicySet) -> int:
    setup_logging(config.logging.level)
    app = App(config, policies)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.smtp.event_loop)) as runner:
            return runner.run(app.run())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1

