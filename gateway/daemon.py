"""The one place that knows every part: wires them, runs them, stops them.

``App.run()`` opens the database (SQLite is upgraded to the current schema;
PostgreSQL must have been upgraded with ``mailflowr-gateway db upgrade``),
starts the group committer, the worker processes, the pipeline worker, the
metrics endpoint and the SMTP listener on this process's own event loop, and
then waits.  SIGTERM or SIGINT only set a flag; shutdown then stops listening,
lets sessions that are inside a transaction finish (up to
``smtp.shutdown_timeout``), commits what they handed over, and exits 0.
SIGHUP, and a change of a policy file, reload the policy set: the new set
takes effect only if it validates as a whole; SIGHUP also reloads the TLS
certificate.  SIGUSR1 logs the status document.  The retention sweeper runs
every ``retention.sweep_interval`` under the policy in force at its start.

The metrics port (started first) serves /metrics, /healthz, /readyz and
/status.  Under systemd (Type=notify) the daemon says READY=1 once the
listeners are bound, keeps STATUS= current, pings the watchdog from the event
loop (a stalled loop stops the pings), and says STOPPING=1 when draining.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import resource
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from gateway import __version__, httpd, logs, memory
from gateway.auth import signing
from gateway.auth.dns import Resolver
from gateway.auth.inbound import Authenticator
from gateway.auth.keys import KeyFileError
from gateway.auth.srs import SRS, load_secrets
from gateway.auth.work import AuthCalls, AuthWork
from gateway.config import GatewayConfig, parse_hostport
from gateway.config import load as load_config
from gateway.delivery import notices
from gateway.delivery.queue import DeliveryWorker
from gateway.errors import ConfigError
from gateway.httpd import HTTPServer
from gateway.ingress.imap_pull import ImapPull
from gateway.ingress.mx import IngressHandler
from gateway.ingress.smtp import ConnectionTracker, abort, protocol_factory
from gateway.ingress.submission import SubmissionHandler
from gateway.metrics import Metrics, QueueStats
from gateway.pipeline.parse import ParserPool
from gateway.pipeline.precheck import Precheck
from gateway.pipeline.worker import PipelineWorker
from gateway.policy.loader import PolicyError, PolicyHolder, PolicySet, snapshot
from gateway.policy.subprocessors import HELD_PREFIX
from gateway.privacy import keys as privacy_keys
from gateway.privacy.erasure import purge_tenant
from gateway.sdnotify import Notifier
from gateway.store import database
from gateway.store.keystore import KeyStore
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store, one_line
from gateway.sweeper import Sweeper
from gateway.tenancy import TenantDirectory
from gateway.workers import WorkerPool, spawn

if TYPE_CHECKING:
    from gateway.api import AdminAPI

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the text says why, in one line."""


def upgrade_apart(url: str) -> None:
    """Upgrade the database's schema in a process of its own, so the daemon does not
    carry Alembic for its whole life (see gateway.store.database)."""
    process, conn = spawn(database.upgrade_child, url)
    try:
        ok, value = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        raise StartupError("database schema upgrade failed: the upgrading process ended "
                           f"(exit code {process.exitcode})") from None
    finally:
        conn.close()
        process.join(30)
    if not ok:
        raise StartupError(f"database schema upgrade failed: {value}")
    before, after = value
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def open_store(
    config: GatewayConfig,
    *,
    upgrade_sqlite: bool = True,
    on_commit: Callable[[int, float], None] | None = None,
    need_keys: bool = True,
) -> Store:
    """Connect, make sure the schema is current, and return the Store.  Without
    ``need_keys`` a master key that cannot be had only matters once an encrypted
    original is read (commands that never read one still work)."""
    engine = database.create(config.database.url, pool_size=config.database.pool_size)
    try:
        current = database.current_revision(engine)
        if current != database.HEAD:
            if database.is_sqlite(engine) and upgrade_sqlite:
                upgrade_apart(config.database.url)
            else:
                raise StartupError(
                    f"database schema is at {current or 'nothing'}, this version needs "
                    f"{database.HEAD}: run 'mailflowr-gateway db upgrade' first"
                )
    except SQLAlchemyError as exc:
        engine.dispose()
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise StartupError(f"database unreachable: {first[0] if first else exc}") from None
    problem = None
    try:
        key = privacy_keys.load_or_create(config.privacy.key_file)
        try:
            master = config.privacy.master_key()
        except KeyFileError as exc:
            if need_keys:
                raise
            master, problem = None, str(exc)
    except KeyFileError as exc:
        engine.dispose()
        raise StartupError(f"privacy: {exc}") from None
    keystore = None if master is None else KeyStore(config.privacy.keystore, master)
    return Store(
        engine,
        commit_batch_max=config.database.commit_batch_max,
        sqlite_path=config.sqlite_path,
        min_free_space=config.storage.min_free_space,
        on_commit=on_commit,
        privacy_key=key,
        keystore=keystore,
        keystore_problem=problem,
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


LISTENERS = ("smtp", "submission")
STATS_INTERVAL = 5.0  # seconds between looks at the backlog (gauges, STATUS=, readiness)
TRIM_INTERVAL = 60.0  # seconds between returns of freed memory to the system
TENANTS_INTERVAL = 2.0  # seconds between looks for tenants deactivated meanwhile
LOOP_STALL = 10.0  # seconds without a heartbeat before /healthz reports the loop stalled
PROBE_TIMEOUT = 3.0  # seconds a readiness probe waits for the database
WORKER_THREADS = 8  # calls a worker process runs at once: most wait on DNS, not on the CPU
AUTH_CALL_TIMEOUT = 300.0  # seconds before a worker process is taken for stuck and replaced
SHOWN_PROBLEMS = 20  # problems of a refused policy reload in its log line and in /status


class App:
    def __init__(self, config: GatewayConfig, policies: PolicySet,
                 notifier: Notifier | None = None, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP for the DKIM keys
        self.signer = signing.from_config(config)
        self.srs = (SRS(load_secrets(config.srs.secret_file), config.srs.max_age_days)
                    if config.srs.secret_file else None)
        self.policies = PolicyHolder(config.policies.directory, config.tenants.keys(),
                                     config.destinations.keys(), policies)
        self.metrics = Metrics(tenant_labels=config.metrics.tenant_labels)
        self.notifier = notifier if notifier is not None else Notifier()
        self.stopping = asyncio.Event()
        self.sweeper: Sweeper | None = None
        self.inactive: set[str] = set()  # deactivated tenants, as last read
        self.store: Store | None = None
        self.tls: ssl.SSLContext | None = None
        self.started = time.time()
        self.heartbeat = time.monotonic()
        self.listening: dict[str, str] = {}  # listener name -> address, while bound
        self.trackers: dict[str, ConnectionTracker] = {}
        self.queue: QueueStats | None = None
        self.database_up = False
        self.last_sweep: float | None = None
        self._probe = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="probe")
        self._reload_lock = asyncio.Lock()
        self.reload_problems: list[str] = []  # why the last policy reload was refused
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGUSR1, self.log_status)
        self.metrics.policy_loaded(self.policies.current.version,
                                   self.policies.current.loaded_at.timestamp())
        self.metrics.signing_keys(k for keys in self.signer.by_domain.values() for k in keys)
        http = self._start_http()  # first: /healthz answers while the rest starts
        try:
            return await self._run(loop)
        finally:
            if http is not None:
                http.close()
            self._probe.shutdown(wait=False, cancel_futures=True)
            self.notifier.close()

    def _step(self, what: str) -> None:
        """A step of the start, for the log and systemctl status (a start that hangs
        shows where)."""
        log.info("starting: %s", what)
        self.notifier.status(what)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        config = self.config
        self._step("opening the database")
        store = await asyncio.to_thread(
            lambda: open_store(config, on_commit=self.metrics.observe_commit)
        )
        await asyncio.to_thread(
            store.sync_tenants, {tid: t.name for tid, t in config.tenants.items()}
        )
        if store.keystore is None:
            log.warning("encryption at rest is off: originals are stored in clear "
                        "(set privacy.master_key_file or privacy.master_key_env)")
        self.inactive = await asyncio.to_thread(PrivacyStore(store).inactive_tenants)
        if store.keystore is not None:
            # every active tenant's key now: a keystore the master key does not open
            # stops the start, instead of failing every message later
            keystore = store.keystore
            try:
                for tid in sorted(config.tenants.keys() - self.inactive):
                    await asyncio.to_thread(keystore.current, tid)
            except (KeyFileError, OSError) as exc:
                raise StartupError(f"privacy.keystore: {exc}") from None
            log.info("encryption at rest is on: master key %s, data keys in %s",
                     keystore.master_id, keystore.directory)
        for tid in sorted(self.inactive & config.tenants.keys()):
            log.warning("tenant %s is deactivated: its mail is refused; remove it from the "
                        "configuration", tid)
        self.database_up = True
        self.metrics.database_up.set(1)
        self.tls = tls_context(config)
        await store.start()
        self._step("starting the worker processes")
        # One set of processes parses and authenticates: each is a whole interpreter.
        pool = WorkerPool("work", max(config.pipeline.parse_workers, config.auth.workers),
                          WORKER_THREADS, AuthWork(self._authenticator()), AUTH_CALL_TIMEOUT)
        await pool.start()
        parser = ParserPool(pool, config.pipeline.parse_workers, config.pipeline.parse_timeout)
        auth = AuthCalls(pool, config.auth.workers)
        self.store = store
        self._step("reading the subprocessor registry")
        await self.sync_subprocessors(None)
        delivery = DeliveryWorker(store, config, self.metrics, policies=self.policies.get,
                                  signer=lambda: self.signer, srs=lambda: self.srs, auth=auth)
        worker = PipelineWorker(
            store, parser,
            batch_size=config.pipeline.batch_size,
            poll_interval=config.pipeline.poll_interval,
            lease_time=config.pipeline.lease_time,
            burst_delay=config.pipeline.burst_delay,
            in_flow_delay=config.smtp.in_flow_delay,
            policies=self.policies.get,
            deliveries_planned=delivery.wakeup,
            metrics=self.metrics,
            auth=auth if auth.checking else None,
            authserv_id=config.authserv_id,
            srs=self.srs is not None,
            keep_original={tid: t.keep_original for tid, t in config.tenants.items()
                           if t.keep_original is not None},
        )
        worker.start()
        delivery.start()
        imap_pull = ImapPull(config, store, self.metrics, imported=worker.wakeup.set)
        imap_pull.start()
        self._spawn(self._heartbeat())
        if config.policies.watch_interval > 0:
            self._spawn(self._watch_policies(config.policies.watch_interval))
        sweeping = None
        if config.retention.sweep_interval > 0:
            self.sweeper = Sweeper(store, batch_size=config.retention.batch_size,
                                   pause=config.retention.batch_pause)
            sweeping = asyncio.create_task(self._sweep_loop(self.sweeper), name="retention")

        directory = TenantDirectory(config.tenants)
        precheck = Precheck(self.policies.workflows, auth=auth if auth.checking else None,
                            dmarc_rejecting={t for t, tenant in config.tenants.items()
                                             if tenant.dmarc == "reject"})
        handler = IngressHandler(config.smtp, directory, store, self.metrics, precheck,
                                 srs=lambda: self.srs, flow=worker.flow)
        listeners: list[tuple[str, str, IngressHandler | SubmissionHandler, dict[str, Any]]] = [
            ("smtp", config.smtp.listen, handler, {})
        ]
        submission = None
        if config.submission.listen:
            submission = SubmissionHandler(config.smtp, config.submission, config.tenants,
                                           store, self.metrics, flow=worker.flow)
            listeners.append(("submission", config.submission.listen, submission,
                              {"submission": True, "auth_required": True,
                               "auth_require_tls": True}))
        servers: list[asyncio.Server] = []
        for name, listen, listener_handler, options in listeners:
            tracker = ConnectionTracker(config.smtp.max_connections,
                                        config.smtp.max_connections_per_ip)
            host, port = parse_hostport(listen)
            try:
                server = await loop.create_server(
                    protocol_factory(listener_handler, config.smtp, tracker, self.metrics,
                                     lambda: self.tls, listener=name, **options),
                    host, port, reuse_address=True, backlog=1024,
                )
            except OSError as exc:
                for started in servers:
                    started.close()
                await self._stop_sweeping(sweeping)
                await self._stop_background()
                await self._stop_parts(imap_pull, worker, delivery, pool, store)
                raise StartupError(f"{listen}: {exc.strerror}") from None
            servers.append(server)
            self.trackers[name] = tracker
            self.listening[name] = listen
        try:
            admin = await self._start_admin_api(store)
        except StartupError:
            for started in servers:
                started.close()
            await self._stop_sweeping(sweeping)
            await self._stop_background()
            await self._stop_parts(imap_pull, worker, delivery, pool, store)
            raise
        self._spawn(self._watch_stats())
        trim = memory.trimmer()
        if trim is not None:
            self._spawn(self._return_memory(trim))
        self._spawn(self._watch_tenants(directory, submission))
        # Everything made so far lives as long as the daemon (modules, configuration,
        # policies, pools): keep it out of the collector's full passes, which otherwise
        # walk it all and stalled 1-5% of acceptances for 100-250 ms at 100 sessions.
        gc.collect()
        gc.freeze()
        log.info("listening for SMTP on %s%s (%d tenants, database %s)", config.smtp.listen,
                 f", submission on {config.submission.listen}" if config.submission.listen
                 else "", len(config.tenants), _database_name(store))
        self.notifier.ready(self.status_line())

        await self.stopping.wait()
        trackers = list(self.trackers.values())
        open_sessions = sum(len(t.sessions) for t in trackers)
        self.listening.clear()  # not ready any more: balancers stop sending
        self.notifier.stopping(f"stopping: draining {open_sessions} sessions")
        log.info("shutting down: no new connections, %d sessions open", open_sessions)
        for server in servers:
            server.close()
        for tracker in trackers:
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
        if admin is not None:
            await admin.close()
        await self._stop_sweeping(sweeping)
        await self._stop_background()
        await self._stop_parts(imap_pull, worker, delivery, pool, store)
        log.info("stopped")
        return 0

    def _authenticator(self) -> Authenticator | None:
        """The checks of inbound mail, as ``auth:`` configures them; None for none."""
        auth = self.config.auth
        if not (auth.verify_dkim or auth.check_spf or auth.check_arc or auth.check_dmarc):
            return None
        servers = [parse_hostport(s) for s in self.config.delivery.dns_servers]
        resolver = Resolver(servers, min(self.config.delivery.dns_timeout, 10.0))
        return Authenticator(resolver, dkim=auth.verify_dkim, spf=auth.check_spf,
                             arc=auth.check_arc, dmarc=auth.check_dmarc)

    def _start_http(self) -> HTTPServer | None:
        listen = self.config.metrics.listen
        if not listen:
            return None
        host, port = parse_hostport(listen)
        routes = {"/healthz": self.healthz, "/readyz": self.readyz, "/status": self.status}
        try:
            return HTTPServer(host, port, httpd.app(self.metrics.registry, routes))
        except OSError as exc:
            raise StartupError(f"metrics.listen {listen}: {exc.strerror}") from None

    async def _start_admin_api(self, store: Store) -> AdminAPI | None:
        settings = self.config.admin_api
        if not settings.listen:
            return None
        context = None
        if settings.tls_cert_file and settings.tls_key_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
            except (OSError, ssl.SSLError) as exc:
                raise StartupError(f"admin_api TLS: {exc}") from None
        from gateway.api import AdminAPI  # aiohttp is loaded only when the API is on

        admin = AdminAPI(self.config, store, lambda: self.policies.get().retention)
        host, port = parse_hostport(settings.listen)
        try:
            await admin.start(host, port, context)
        except OSError as exc:
            await admin.close()
            raise StartupError(f"admin_api.listen {settings.listen}: {exc.strerror}") from None
        log.info("admin API on %s://%s", "https" if context else "http", settings.listen)
        return admin

    async def _stop_sweeping(self, sweeping: asyncio.Task[None] | None) -> None:
        if sweeping is not None and self.sweeper is not None:
            self.sweeper.stopping = True  # ends the sweep between two batches
            self.stopping.set()  # and the wait for the next one (a start that failed)
            await sweeping

    async def _stop_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------ health and status
    def healthz(self) -> tuple[int, dict[str, Any]]:
        """Alive: the process answers and its event loop has run in the last seconds."""
        lag = time.monotonic() - self.heartbeat
        alive = lag < LOOP_STALL
        return (200 if alive else 503), {
            "status": "ok" if alive else "event loop stalled",
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "event_loop_heartbeat_age_seconds": round(lag, 3),
        }

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """Ready: listeners bound, the database answers now, a policy set is in force."""
        listeners_ok = bool(self.listening) and not self.stopping.is_set()
        database_error = self._check_database()
        policy = self.policies.current
        checks: dict[str, dict[str, Any]] = {
            "listeners": {"ok": listeners_ok, "bound": dict(self.listening)},
            "database": {"ok": database_error is None, "error": database_error},
            "policy": {"ok": bool(policy.version), "version": policy.version},
        }
        ready = all(c["ok"] for c in checks.values())
        return (200 if ready else 503), {"ready": ready, "checks": checks}

    def _check_database(self) -> str | None:
        store = self.store
        if store is None:
            return "not opened yet"
        try:
            self._probe.submit(store.ping).result(timeout=PROBE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:g} s"
        except Exception as exc:  # any failure means "not reachable"; the text says which
            return one_line(exc)
        return None

    def status(self) -> tuple[int, dict[str, Any]]:
        """What `mailflowr-gateway status` prints and SIGUSR1 logs."""
        policy = self.policies.current
        queue = self.queue
        deliveries: dict[str, int] = {}
        if queue is not None:
            for _, state, count, _ in queue.deliveries:
                deliveries[state] = deliveries.get(state, 0) + count
        return 200, {
            "version": __version__,
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - self.started, 1),
            "state": ("stopping" if self.stopping.is_set()
                      else "running" if self.listening else "starting"),
            "listeners": {name: {"address": address,
                                 "sessions": len(self.trackers[name].sessions)}
                          for name, address in self.listening.items()},
            "database": {"up": self.database_up,
                         "name": _database_name(self.store) if self.store else None},
            "policy": {"version": policy.version,
                       "loaded_at": policy.loaded_at.isoformat(timespec="seconds"),
                       "reload_refused": self.reload_problems[:SHOWN_PROBLEMS]},
            "pipeline": {"waiting": queue.pipeline_waiting if queue else None,
                         "oldest_seconds": round(queue.pipeline_oldest, 1) if queue else None},
            "deliveries": {"pending": deliveries.get("pending", 0),
                           "held": deliveries.get("held", 0),
                           "oldest_pending_seconds": round(max(
                               (age for _, state, _, age in queue.deliveries
                                if state == "pending"), default=0.0), 1) if queue else None},
            "retention": {"last_sweep": datetime.fromtimestamp(self.last_sweep, UTC)
                          .isoformat(timespec="seconds") if self.last_sweep else None},
        }

    def status_line(self) -> str:
        """One line for systemctl status (STATUS=) and the log."""
        doc = self.status()[1]
        sessions = sum(v["sessions"] for v in doc["listeners"].values())
        where = ", ".join(v["address"] for v in doc["listeners"].values()) or "nothing"
        waiting = doc["pipeline"]["waiting"]
        return (f"{doc['state']} on {where}; {sessions} sessions; "
                f"{'?' if waiting is None else waiting} to process; "
                f"{doc['deliveries']['pending']} deliveries pending "
                f"(oldest {doc['deliveries']['oldest_pending_seconds'] or 0:.0f} s), "
                f"{doc['deliveries']['held']} held; policy {doc['policy']['version']}"
                f"{'; POLICY RELOAD REFUSED' if doc['policy']['reload_refused'] else ''}"
                f"{'' if doc['database']['up'] else '; DATABASE DOWN'}")

    def log_status(self) -> None:
        log.info("status: %s", json.dumps(self.status()[1], sort_keys=True))

    async def _heartbeat(self) -> None:
        """Beat every second; ping systemd's watchdog only while the loop beats."""
        interval = self.notifier.watchdog
        last_ping = 0.0
        while True:
            self.heartbeat = time.monotonic()
            if interval is not None and self.heartbeat - last_ping >= interval:
                self.notifier.ping()
                last_ping = self.heartbeat
            await asyncio.sleep(min(1.0, interval or 1.0))

    async def _watch_stats(self) -> None:
        """Every few seconds: backlog gauges, database up or not, STATUS= for systemd."""
        store = self.store
        assert store is not None
        while True:
            try:
                self.queue = await asyncio.to_thread(store.queue_stats)
            except Exception as exc:  # loop boundary: the database may be away
                if self.database_up:
                    log.error("database check failed: %s", one_line(exc))
                self.database_up = False
            else:
                if not self.database_up:
                    log.info("database reachable again")
                self.database_up = True
                self.metrics.queue_levels(self.queue)
            self.metrics.database_up.set(1 if self.database_up else 0)
            self.metrics.ready.set(1 if self.database_up and self.listening
                                   and not self.stopping.is_set() else 0)
            self.notifier.status(self.status_line())
            await asyncio.sleep(STATS_INTERVAL)

    async def _return_memory(self, trim: Callable[[], None]) -> None:
        """Every minute: what the C allocator holds free goes back to the system."""
        while True:
            await asyncio.sleep(TRIM_INTERVAL)
            await asyncio.to_thread(trim)

    async def _watch_tenants(self, directory: TenantDirectory,
                             submission: SubmissionHandler | None) -> None:
        """Every few seconds: which tenants `tenant deactivate` has switched off (on
        this or another instance); their mail is refused from then on, and whatever
        of theirs was stored meanwhile is deleted."""
        store = self.store
        assert store is not None
        privacy = PrivacyStore(store)
        purged: set[str] = set()
        while True:
            directory.inactive = frozenset(self.inactive)
            if submission is not None:
                submission.inactive = frozenset(self.inactive)
            try:
                for tid in sorted(self.inactive - purged):
                    done = await asyncio.to_thread(purge_tenant, privacy, self.config, tid,
                                                   "daemon")
                    if done.shredded:  # made again by mail stored meanwhile
                        await self._audit("tenant.shred", {"data_key_destroyed": True},
                                          tenant_id=tid)
                    removed = done.removed
                    if removed.messages or removed.deliveries:
                        log.info("tenant %s is deactivated: deleted %d messages and %d "
                                 "deliveries stored meanwhile", tid, removed.messages,
                                 removed.deliveries)
                    purged.add(tid)
                await asyncio.sleep(TENANTS_INTERVAL)
                self.inactive = await asyncio.to_thread(privacy.inactive_tenants)
            except SQLAlchemyError as exc:  # the database may be away; _watch_stats says so
                log.debug("tenant states not read: %s", one_line(exc))
                await asyncio.sleep(TENANTS_INTERVAL)

    async def reload(self, why: str) -> None:
        """SIGHUP: the policy set, then the TLS certificate; READY=1 again when done."""
        self.notifier.reloading()
        try:
            await self.reload_policies(why)
            self.reload_tls()
            await asyncio.to_thread(self.reload_dkim)
            self.reload_srs()
        finally:
            self.notifier.ready(self.status_line())

    def reload_dkim(self) -> None:
        """Read ``dkim.keys`` from the configuration file again and load the keys it
        names (a new selector listed after the old one takes over signing). Other
        changes in the file wait for a restart. Keys that do not load are refused
        and the keys in use stay."""
        if self.config_path is None:
            return
        try:
            fresh = load_config(self.config_path)
            signer = signing.from_config(fresh)
        except (ConfigError, KeyFileError) as exc:
            self.metrics.dkim_reloads.labels("failure").inc()
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("DKIM key reload refused, the keys in use stay: %s", "; ".join(problems))
            return
        keys = [k for ks in signer.by_domain.values() for k in ks]
        before = {repr(k) for ks in self.signer.by_domain.values() for k in ks}
        self.signer = signer
        self.metrics.dkim_reloads.labels("success").inc()
        self.metrics.signing_keys(keys)
        if {repr(k) for k in keys} != before:
            log.info("DKIM signing keys now: %s",
                     ", ".join(f"{k.record_name} ({k.algorithm})" for k in keys) or "none")

    def reload_srs(self) -> None:
        """Read the SRS secrets again: to rotate, put the new secret on the first line
        and keep the old ones below it until their bounces are past max_age_days."""
        if self.srs is None or not self.config.srs.secret_file:
            return
        try:
            secrets = load_secrets(self.config.srs.secret_file)
        except KeyFileError as exc:
            log.error("SRS secret reload refused, the secrets in use stay: %s", exc)
            return
        if list(secrets) != list(self.srs.secrets):
            self.srs = SRS(secrets, self.config.srs.max_age_days)
            log.info("SRS secrets reloaded: %d in use", len(secrets))

    def reload_tls(self) -> None:
        """Load a renewed certificate and key; new connections use them, open ones
        keep theirs. A file that cannot be loaded leaves the one in use."""
        if not self.config.smtp.tls.enabled:
            return
        try:
            self.tls = tls_context(self.config)
        except StartupError as exc:
            self.metrics.tls_reloads.labels("failure").inc()
            log.error("TLS reload refused, the certificate in use stays: %s", exc)
            return
        self.metrics.tls_reloads.labels("success").inc()
        log.info("TLS certificate reloaded from %s", self.config.smtp.tls.cert_file)

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
                self._refuse_reload(why, exc.problems)
                return
            except Exception as exc:  # whatever fails, the reload is refused, never the watcher
                self._refuse_reload(why, [f"{self.policies.directory}: {one_line(exc)}"], exc)
                return
            self.reload_problems = []
            self.metrics.policy_reload_failing.set(0)
            if not changed:
                log.info("policy reload (%s): no change (policy %s)", why, previous.version)
                return
            current = self.policies.current
            self.metrics.policy_reloads.labels("success").inc()
            self.metrics.policy_loaded(current.version, current.loaded_at.timestamp(),
                                       previous.version)
            log.info("policy reloaded (%s): %s -> %s (%s)", why, previous.version,
                     current.version, ", ".join(current.files) or "no files")
            await self._audit("policy.reload", {
                "from": previous.version, "to": current.version, "why": why,
                "files": sorted(current.files)})
            try:
                await self.sync_subprocessors(previous)
            except Exception:  # the database may be away; the next reload or restart retries
                log.exception("recording subprocessor changes failed")

    def _refuse_reload(self, why: str, problems: list[str],
                       unexpected: BaseException | None = None) -> None:
        """The policy in force stays; the log, the metrics and /status say why."""
        self.reload_problems = problems
        self.metrics.policy_reloads.labels("failure").inc()
        self.metrics.policy_reload_failing.set(1)
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = len(problems) - SHOWN_PROBLEMS
        log.error("policy reload (%s) refused, policy %s stays in force: %s%s", why,
                  self.policies.current.version, shown,
                  f" (and {more} more problems)" if more > 0 else "", exc_info=unexpected)

    async def _audit(self, action: str, detail: dict[str, Any],
                     tenant_id: str | None = None) -> None:
        """Record a daemon event in the audit log; the database may be away."""
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.store.audit, "daemon", action, tenant_id=tenant_id,
                                    detail=detail)
        except SQLAlchemyError as exc:
            log.error("audit event %s not recorded: %s", action, one_line(exc))

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
        so an editor's save in several writes is usually read once, whole).

        Waiting longer would only narrow the window in which a file is read while it
        is written, never close it: a writer may pause for any time, and the part
        written so far may be a valid, shorter policy.  What closes it is a rename
        into place (docs/policies.md); what is refused for sure is an empty file."""
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
                for tenant, counts in report.per_tenant().items():
                    self.metrics.retention_deleted.labels(
                        self.metrics.tenant(tenant)).inc(sum(counts.values()))
                self.metrics.retention_held.set(report.held)
                self.last_sweep = time.time()
                self.metrics.retention_last_sweep.set(self.last_sweep)
                log.info("retention sweep (policy %s): deleted %d messages, %d kept by holds, "
                         "in %.1f s", policy.version, report.expired, report.held,
                         report.seconds)

    @staticmethod
    async def _stop_parts(imap_pull: ImapPull, worker: PipelineWorker, delivery: DeliveryWorker,
                          pool: WorkerPool[AuthWork], store: Store) -> None:
        await imap_pull.stop()
        await worker.stop()
        await delivery.stop()
        await store.close()
        await pool.close()
        store.engine.dispose()


def _database_name(store: Store) -> str:
    """The database without user or password: the log shows which one, not who."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite":
        return f"sqlite {url.database}"
    where = f"{url.host or 'local socket'}{f':{url.port}' if url.port else ''}"
    return f"{url.get_backend_name()} {url.database} on {where}"


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


def open_files_needed(config: GatewayConfig) -> int:
    """File descriptors the configured caps may use at once: every SMTP session at its
    cap on each listener, the delivery connections, the database pool, and a reserve
    for logs, the metrics port and the worker processes."""
    listeners = 2 if config.submission.listen else 1
    return (listeners * config.smtp.max_connections + 2 * config.delivery.concurrency
            + config.database.pool_size + 10 + 256)


def ensure_open_files(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (up to the hard limit), so that the
    connection caps, not the descriptor table, are what stop new sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open files limit is %d, below the %d smtp.max_connections needs: raise "
                    "it (LimitNOFILE= in the unit, ulimit -n) or lower the caps", soft, needed)


def serve(config: GatewayConfig, policies: PolicySet, config_path: Path | None = None) -> int:
    logs.setup(config.logging.level, config.logging.format, config.logging.personal_data)
    ensure_open_files(open_files_needed(config))
    app = App(config, policies, config_path=config_path)
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.smtp.event_loop)) as runner:
            return runner.run(app.run())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1

