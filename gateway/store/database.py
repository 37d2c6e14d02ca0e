"""Open the database the way durability needs, and keep its schema current.

SQLite runs in WAL mode with synchronous=FULL (a commit is on disk when it
returns), foreign keys on, and write transactions that take the write lock at
BEGIN (``BEGIN IMMEDIATE``), so two writers wait for each other instead of
failing half-way.  PostgreSQL runs with synchronous_commit on.  Alembic
migrations ship inside the package; ``upgrade()`` applies them.

Alembic (with Mako and Pygments, 11 MiB) is loaded only to upgrade: the daemon
reads the schema's revision with one query and, when a SQLite database needs
an upgrade at start, has ``upgrade_child`` do it in a short-lived process.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# The revision this code works with: the newest in migrations/versions (a test checks).
HEAD = "0008"
VERSION_TABLE = "alembic_version"  # where Alembic records a database's revision
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def create(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for ``url`` with the session settings durability depends on."""
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=4,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "options": "-c synchronous_commit=on"},
    )


def lock_key(name: str) -> int:
    """The PostgreSQL advisory lock that stands for ``name`` (a signed 64-bit key)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def take_turn(conn: Any, name: str) -> None:
    """Hold ``name``'s lock until ``conn``'s transaction ends: instances sharing a
    PostgreSQL database take turns at what follows (a read, then writes that depend
    on it).  On SQLite every write transaction holds the database's write lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(lock_key(name))))


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the driver so that BEGIN IMMEDIATE is ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Deleted content is overwritten, so erased mail does not linger in free pages.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
    conn.exec_driver_sql(f"BEGIN {mode}")


def _alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest revision among the migrations, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None for an empty database."""
    with engine.connect().execution_options(readonly=True) as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending migration; returns (revision before, revision after)."""
    from alembic import command

    before = current_revision(engine)
    command.upgrade(_alembic_config(engine), "head")
    after = current_revision(engine)
    assert after is not None
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, after


def upgrade_child(conn: Connection, url: str) -> None:
    """``upgrade()`` in a process of its own (see gateway.workers.spawn): sends back
    (True, (before, after)), or (False, the error in one line)."""
    engine = create(url, pool_size=1)
    try:
        result: tuple[bool, Any] = (True, upgrade(engine))
    except Exception as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        result = (False, first[0] if first else exc.__class__.__name__)
    finally:
        engine.dispose()
    conn.send(result)
