"""What the daemon prepares before it runs: the database at the current schema, the
TLS certificate, the event loop, enough file descriptors.

Each check that fails raises ``StartupError`` with one line that says why; the
daemon logs it and exits 1.  The command line opens the store through
``open_store`` too (without upgrading PostgreSQL behind the operator's back).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from collections.abc import Callable, Collection

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from gateway.auth.dns import Resolver
from gateway.auth.inbound import Authenticator
from gateway.config import GatewayConfig, parse_hostport
from gateway.keyfiles import KeyFileError
from gateway.privacy import keys as privacy_keys
from gateway.store import database
from gateway.store.keystore import KeyStore
from gateway.store.models import audit_events
from gateway.store.repository import Store
from gateway.zygote import spawn

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
    try:
        engine = database.create(config.database.url, pool_size=config.database.pool_size)
    except ModuleNotFoundError as exc:  # the URL's driver is an extra (psycopg: [postgres])
        raise StartupError(f"database.url needs the Python package {exc.name!r}: install "
                           "mailflowr-gateway[postgres] for postgresql+psycopg://") from None
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
        if not config.privacy.key_file.exists() and _chain_begun(engine):
            raise KeyFileError(
                f"{config.privacy.key_file}: no such file (privacy.key_file), but the audit "
                "chain in the database was made with a key: restore it or correct the path "
                "(a relative one is read from the configuration's folder); a new key would "
                "break the chain")
        key = privacy_keys.load_or_create(config.privacy.key_file)
        try:
            master = config.privacy.master_key()
        except KeyFileError as exc:
            if need_keys:
                raise
            master, problem = None, str(exc)
    except (KeyFileError, OSError) as exc:
        engine.dispose()
        raise StartupError(f"privacy: {exc}") from None
    keystore = None if master is None else KeyStore(config.privacy.keystore, master)
    return Store(
        engine,
        commit_batch_max=config.database.commit_batch_max,
        sqlite_path=config.sqlite_path,
        min_free_space=config.storage.min_free_space,
        on_commit=on_commit,
        audit_key=key.chain,
        keystore=keystore,
        keystore_problem=problem,
    )


def _chain_begun(engine: Engine) -> bool:
    """Whether the audit chain has begun (a privacy key made its events' hashes)."""
    with engine.connect() as conn:
        return conn.execute(select(audit_events.c.id).where(audit_events.c.hash.is_not(None))
                            .limit(1)).first() is not None


def tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The certificate and key for STARTTLS, loaded now (None: TLS is off); read again
    on SIGHUP to pick up a renewed certificate."""
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


def authenticator(config: GatewayConfig) -> Authenticator | None:
    """The checks of inbound mail, as ``auth:`` configures them; None for none."""
    auth = config.auth
    if not (auth.verify_dkim or auth.check_spf or auth.check_arc or auth.check_dmarc):
        return None
    servers = [parse_hostport(s) for s in config.delivery.dns_servers]
    resolver = Resolver(servers, min(config.delivery.dns_timeout, 10.0))
    return Authenticator(resolver, dkim=auth.verify_dkim, spf=auth.check_spf,
                         arc=auth.check_arc, dmarc=auth.check_dmarc)


def check_keys(store: Store, active: Collection[str]) -> None:
    """Every active tenant's data key now: a keystore the master key does not open
    stops the start, instead of failing every message later."""
    keystore = store.keystore
    if keystore is None:
        log.warning("encryption at rest is off: originals are stored in clear "
                    "(set privacy.master_key_file or privacy.master_key_env)")
        return
    try:
        for tid in sorted(active):
            keystore.current(tid)
    except (KeyFileError, OSError) as exc:
        raise StartupError(f"privacy.keystore: {exc}") from None
    log.info("encryption at rest is on: master key %s, data keys in %s",
             keystore.master_id, keystore.directory)


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
