"""The one place that knows every part: wires them, runs them, stops them.

``App.run()`` starts the parts of ``App.parts()`` in order: the database
(SQLite is upgraded to the current schema; PostgreSQL must have been upgraded
with ``mailflowr-gateway db upgrade``), the worker processes of the checks
before the 250, the group committer, the delivery and pipeline processes, the
IMAP pull, the retention sweeps, the SMTP listeners and the admin API, and then
waits; the SMTP sessions run on this process's own event loop.  Each part's stop
goes on one exit stack as soon as the part has started, so the parts stop in
reverse order, and a start that fails half-way stops exactly what had started.

SIGTERM or SIGINT only set a flag; shutdown then stops listening, lets sessions
that are inside a transaction finish (up to ``smtp.shutdown_timeout``), commits
what they handed over, and exits 0.  SIGHUP, and a change of a policy file,
reload (gateway.reload).  SIGUSR1 logs the status document.

The metrics port (started first) serves /metrics, /healthz, /readyz and
/status (gateway.health).  Under systemd (Type=notify) the daemon says READY=1
once the listeners are bound, keeps STATUS= current, pings the watchdog from
the event loop (a stalled loop stops the pings), and says STOPPING=1 when
draining.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from gateway import httpd, logs, memory, zygote
from gateway.auth.work import AuthCalls, AuthWork
from gateway.config import GatewayConfig, parse_hostport
from gateway.deliverer import Deliverer
from gateway.errors import one_line
from gateway.health import Health, database_name
from gateway.httpd import HTTPServer
from gateway.ingress.imap_pull import ImapPull
from gateway.ingress.mx import IngressHandler
from gateway.ingress.smtp import ConnectionTracker, abort, protocol_factory
from gateway.ingress.submission import SubmissionHandler
from gateway.metrics import Metrics
from gateway.pipeline.precheck import Precheck
from gateway.policyset import PolicyHolder, PolicySet
from gateway.privacy import keys as privacy_keys
from gateway.privacy.intake import RequestIntake
from gateway.privacy.purge import watch_deactivated
from gateway.processor import AUTH_CALL_TIMEOUT, WORKER_THREADS, Processor
from gateway.reload import Reloader
from gateway.sdnotify import Notifier
from gateway.startup import (
    StartupError,
    authenticator,
    check_keys,
    ensure_open_files,
    loop_factory,
    open_files_needed,
    open_store,
    tls_context,
)
from gateway.store import database
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store
from gateway.sweeper import Sweeper, SweepLoop
from gateway.tenancy import TenantDirectory
from gateway.workers import MAX_IDLE, WorkerPool

if TYPE_CHECKING:
    from gateway.api import AdminAPI

log = logging.getLogger(__name__)

Part = Callable[[AsyncExitStack], Awaitable[None]]


class App:
    def __init__(self, config: GatewayConfig, policies: PolicySet,
                 notifier: Notifier | None = None, config_path: Path | None = None) -> None:
        self.config = config
        self.policies = PolicyHolder(config.policies.directory, config.tenants.keys(),
                                     config.destinations.keys(), policies)
        self.metrics = Metrics(tenant_labels=config.metrics.tenant_labels)
        self.notifier = notifier if notifier is not None else Notifier()
        self.stopping = asyncio.Event()
        self.reloader = Reloader(config, self.policies, self.metrics, self.audit, config_path)
        self.sweeps: SweepLoop | None = None
        self.health = Health(self.policies, self.metrics, self.notifier, self.stopping,
                             reload_refused=self.reloader.refused,
                             last_sweep=lambda: self.sweeps.last_sweep if self.sweeps else None,
                             stats_interval=config.metrics.stats_interval)
        self.store: Store | None = None
        self.inactive: set[str] = set()  # deactivated tenants, as read at the start
        self.servers: list[asyncio.Server] = []
        self._background: set[asyncio.Task[None]] = set()
        # made by the parts that start them, for the parts that start later
        self.auth: AuthCalls | None = None  # the checks before the 250 (DMARC p=reject)
        self.delivery: Deliverer
        self.processor: Processor
        self.directory = TenantDirectory(config.tenants)
        self.submission: SubmissionHandler | None = None

    def parts(self) -> list[Part]:
        """Every part of the daemon, in the order it starts (it stops in reverse)."""
        return [self._database, self._worker_processes, self._committer,
                self._subprocessors, self._delivery, self._pipeline, self._imap_pull,
                self._background_tasks, self._sweeps, self._listeners, self._admin_api,
                self._watchers]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGUSR1, self.health.log_status)
        self.metrics.policy_loaded(self.policies.current.version,
                                   self.policies.current.loaded_at.timestamp())
        self.metrics.signing_keys(
            k for keys in self.reloader.signer.by_domain.values() for k in keys)
        async with AsyncExitStack() as stack:
            stack.callback(self.notifier.close)
            stack.callback(self.health.close)
            await self._http(stack)  # first: /healthz answers while the rest starts
            stack.push(_log_stopped)
            for start in self.parts():
                await start(stack)
            memory.settle()
            config = self.config
            assert self.store is not None
            log.info("listening for SMTP on %s%s (%d tenants, database %s)",
                     config.smtp.listen,
                     f", submission on {config.submission.listen}" if config.submission.listen
                     else "", len(config.tenants), database_name(self.store))
            self.notifier.ready(self.health.status_line())
            await self.stopping.wait()
            await self._drain()
        return 0

    async def _drain(self) -> None:
        """Stop listening; let open sessions finish, up to ``smtp.shutdown_timeout``."""
        trackers = list(self.health.trackers.values())
        open_sessions = sum(len(t.sessions) for t in trackers)
        self.health.listening.clear()  # not ready any more: balancers stop sending
        self.notifier.stopping(f"stopping: draining {open_sessions} sessions")
        log.info("shutting down: no new connections, %d sessions open", open_sessions)
        for server in self.servers:
            server.close()
        for tracker in trackers:
            tracker.shutting_down = True
            for session in list(tracker.sessions):
                session.shutdown()
        try:
            await asyncio.wait_for(asyncio.gather(*(t.idle.wait() for t in trackers)),
                                   self.config.smtp.shutdown_timeout)
        except TimeoutError:
            for tracker in trackers:
                log.warning("cutting %d sessions open at the deadline", len(tracker.sessions))
                for session in list(tracker.sessions):
                    abort(session.transport)

    def _step(self, what: str) -> None:
        """A step of the start, for the log and systemctl status (a start that hangs
        shows where)."""
        log.info("starting: %s", what)
        self.notifier.status(what)

    # ------------------------------------------------------------ the parts
    async def _http(self, stack: AsyncExitStack) -> None:
        listen = self.config.metrics.listen
        if not listen:
            return
        host, port = parse_hostport(listen)
        try:
            http = HTTPServer(host, port, httpd.app(self.metrics.registry, self.health.routes()))
        except OSError as exc:
            raise StartupError(f"metrics.listen {listen}: {exc.strerror}") from None
        stack.callback(http.close)

    async def _database(self, stack: AsyncExitStack) -> None:
        config = self.config
        self._step("opening the database")
        store = await asyncio.to_thread(
            lambda: open_store(config, on_commit=self.metrics.observe_commit)
        )
        stack.callback(store.engine.dispose)
        await asyncio.to_thread(
            store.sync_tenants, {tid: t.name for tid, t in config.tenants.items()}
        )
        self.inactive = await asyncio.to_thread(PrivacyStore(store).inactive_tenants)
        await asyncio.to_thread(check_keys, store, config.tenants.keys() - self.inactive)
        for tid in sorted(self.inactive & config.tenants.keys()):
            log.warning("tenant %s is deactivated: its mail is refused; remove it from the "
                        "configuration", tid)
        self.health.database_up = True
        self.metrics.database_up.set(1)
        self.reloader.tls = tls_context(config)
        self.store = store

    async def _worker_processes(self, stack: AsyncExitStack) -> None:
        """Worker processes for the checks a tenant with ``dmarc: reject`` needs before
        the 250; the pipeline process has its own for the rest."""
        config = self.config
        checks = authenticator(config)
        if checks is None or not any(t.dmarc == "reject" for t in config.tenants.values()):
            return
        self._step("starting the worker processes")
        pool = WorkerPool("work", config.auth.workers, WORKER_THREADS, AuthWork(checks),
                          AUTH_CALL_TIMEOUT, max_idle=MAX_IDLE)
        await pool.start()
        stack.push_async_callback(pool.close)
        self.auth = AuthCalls(pool, config.auth.workers)

    async def _committer(self, stack: AsyncExitStack) -> None:
        assert self.store is not None
        await self.store.start()
        stack.push_async_callback(self.store.close)
        self.health.store = self.reloader.store = self.store

    async def _subprocessors(self, stack: AsyncExitStack) -> None:
        self._step("reading the subprocessor registry")
        await self.reloader.sync_subprocessors(None)

    async def _delivery(self, stack: AsyncExitStack) -> None:
        reloader = self.reloader
        self._step("starting the delivery process")
        self.delivery = Deliverer(self.config, self.metrics, lambda: (
            self.policies.current, reloader.signer_config, reloader.srs))
        await self.delivery.start()
        stack.push_async_callback(self.delivery.stop)

    async def _pipeline(self, stack: AsyncExitStack) -> None:
        assert self.store is not None
        self._step("starting the pipeline process")
        self.processor = Processor(self.config, self.metrics, self.store, self.policies.get,
                                   planned=self.delivery.wake)
        await self.processor.start()
        stack.push_async_callback(self.processor.stop)
        self.reloader.on_change = self._reloaded

    def _reloaded(self) -> None:
        """The policy set, keys or SRS secrets changed: the child processes follow."""
        self.delivery.reloaded()
        self.processor.reloaded()

    async def _imap_pull(self, stack: AsyncExitStack) -> None:
        assert self.store is not None
        imap_pull = ImapPull(self.config, self.store, self.metrics,
                             imported=self.processor.wake)
        imap_pull.start()
        stack.push_async_callback(imap_pull.stop)

    async def _background_tasks(self, stack: AsyncExitStack) -> None:
        """Tasks that run until the end: cancelled together (those spawned later too)."""
        stack.push_async_callback(self._stop_background)
        self._spawn(self.health.beat())
        if self.config.policies.watch_interval > 0:
            self._spawn(self.reloader.watch(self.config.policies.watch_interval))

    async def _sweeps(self, stack: AsyncExitStack) -> None:
        """The retention sweeper, and the reader of data-subject requests by mail."""
        assert self.store is not None
        if self.config.privacy.request_address:
            key = await asyncio.to_thread(privacy_keys.load_or_create,
                                          self.config.privacy.key_file)
            intake = RequestIntake(self.store, self.config, self.policies.get, key,
                                   self.config.pipeline.poll_interval)
            intake.start()
            stack.push_async_callback(intake.stop)
        retention = self.config.retention
        if retention.sweep_interval <= 0:
            return
        sweeper = Sweeper(self.store, batch_size=retention.batch_size,
                          pause=retention.batch_pause)
        self.sweeps = SweepLoop(sweeper, retention.sweep_interval, self.policies, self.metrics)
        self.sweeps.start()
        stack.push_async_callback(self.sweeps.stop)

    async def _listeners(self, stack: AsyncExitStack) -> None:
        assert self.store is not None
        config, store, reloader = self.config, self.store, self.reloader
        precheck = Precheck(self.policies.workflows, auth=self.auth,
                            dmarc_rejecting={t for t, tenant in config.tenants.items()
                                             if tenant.dmarc == "reject"})
        handler = IngressHandler(config.smtp, self.directory, store, self.metrics, precheck,
                                 srs=lambda: reloader.srs, flow=self.processor.flow)
        listeners: list[tuple[str, str, IngressHandler | SubmissionHandler, dict[str, Any]]] = [
            ("smtp", config.smtp.listen, handler, {})
        ]
        if config.submission.listen:
            self.submission = SubmissionHandler(config.smtp, config.submission, config.tenants,
                                                store, self.metrics, flow=self.processor.flow)
            listeners.append(("submission", config.submission.listen, self.submission,
                              {"submission": True, "auth_required": True,
                               "auth_require_tls": True}))
        loop = asyncio.get_running_loop()
        for name, listen, listener_handler, options in listeners:
            tracker = ConnectionTracker(config.smtp.max_connections,
                                        config.smtp.max_connections_per_ip)
            host, port = parse_hostport(listen)
            try:
                server = await loop.create_server(
                    protocol_factory(listener_handler, config.smtp, tracker, self.metrics,
                                     lambda: reloader.tls, listener=name, **options),
                    host, port, reuse_address=True, backlog=1024,
                )
            except OSError as exc:
                raise StartupError(f"{listen}: {exc.strerror}") from None
            stack.callback(server.close)
            self.servers.append(server)
            self.health.trackers[name] = tracker
            self.health.listening[name] = listen

    async def _admin_api(self, stack: AsyncExitStack) -> None:
        settings = self.config.admin_api
        if not settings.listen:
            return
        assert self.store is not None
        context = None
        if settings.tls_cert_file and settings.tls_key_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"admin_api TLS: {exc}") from None
        from gateway.api import AdminAPI  # aiohttp is loaded only when the API is on

        admin: AdminAPI = AdminAPI(self.config, self.store, self.policies.get,
                                   self.metrics)
        host, port = parse_hostport(settings.listen)
        try:
            await admin.start(host, port, context)
        except OSError as exc:
            await admin.close()
            raise StartupError(f"admin_api.listen {settings.listen}: {exc.strerror}") from None
        stack.push_async_callback(admin.close)
        log.info("admin API on %s://%s", "https" if context else "http", settings.listen)

    async def _watchers(self, stack: AsyncExitStack) -> None:
        """The stats watch, memory returns and the deactivated-tenant watch (all stop
        with the background tasks)."""
        assert self.store is not None
        self._spawn(self.health.watch_stats())
        trim = memory.trimmer()
        if trim is not None:
            self._spawn(memory.keep_returning(trim))
        self._spawn(watch_deactivated(PrivacyStore(self.store), self.config, self.inactive,
                                      self._refuse_tenants, self.audit))

    # ------------------------------------------------------------ wiring helpers
    def _refuse_tenants(self, inactive: frozenset[str]) -> None:
        """Deactivated tenants, for the listeners that refuse their mail."""
        self.directory.inactive = inactive
        if self.submission is not None:
            self.submission.inactive = inactive

    async def reload(self, why: str) -> None:
        """SIGHUP: the policy set, then the TLS certificate; READY=1 again when done."""
        self.notifier.reloading()
        try:
            await self.reloader.reload(why)
        finally:
            self.notifier.ready(self.health.status_line())

    async def audit(self, action: str, detail: dict[str, Any],
                    tenant_id: str | None = None) -> None:
        """Record a daemon event in the audit log; the database may be away."""
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.store.audit, "daemon", action, tenant_id=tenant_id,
                                    detail=detail)
        except SQLAlchemyError as exc:
            log.error("audit event %s not recorded: %s", action, one_line(exc))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def _log_stopped(exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
    """After every part has stopped: "stopped", when the daemon had run (not a failed start)."""
    if exc_type is None:
        log.info("stopped")
    return False


def serve(config: GatewayConfig, policies: PolicySet, config_path: Path | None = None) -> int:
    logs.setup(config.logging.level, config.logging.format, config.logging.personal_data)
    ensure_open_files(open_files_needed(config))
    database.preload(config.database.url)
    zygote.start()  # before the first thread: every child is forked from it
    app = App(config, policies, config_path=config_path)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.smtp.event_loop)) as runner:
            return runner.run(app.run())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        zygote.stop()
